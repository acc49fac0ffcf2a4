"""Size limits of the source (issue 22, item 4; docs/contributing.md, "Style"): no module over
420 lines and no function over 60 lines of code (docstrings, comments and blank lines not
counted), in the library and in the demo, so each piece can be read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src"
MAX_MODULE_LINES = 420
MAX_FUNCTION_CODE_LINES = 60


def code_lines(func: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Lines of code in ``func``'s body: its docstring, comments and blank lines excluded."""
    body = func.body
    first = body[0]
    has_doc = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )
    start = first.end_lineno if has_doc else first.lineno - 1
    text = lines[start : func.end_lineno]
    return sum(1 for t in text if t.strip() and not t.strip().startswith("#"))


def long_functions(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    return [
        (f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", n)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (n := code_lines(node, lines)) > MAX_FUNCTION_CODE_LINES
    ]


SOURCES = sorted(ROOT.rglob("*.py"))


def test_no_module_is_too_long():
    long = {
        str(p.relative_to(ROOT)): n
        for p in SOURCES
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_too_long():
    long = [item for p in SOURCES for item in long_functions(p)]
    assert not long, f"functions over {MAX_FUNCTION_CODE_LINES} lines of code: {long}"


def test_the_size_checker_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_CODE_LINES + 1))
    src = f'def f():\n    """doc\n\n    more doc"""\n    # a comment\n\n{body}\n'
    path = tmp_path / "m.py"
    path.write_text(src)
    # the checker reports paths relative to ROOT; use a file inside a temporary ROOT
    lines = src.splitlines()
    func = ast.parse(src).body[0]
    assert code_lines(func, lines) == MAX_FUNCTION_CODE_LINES + 1
    short = src.replace(f"    x{MAX_FUNCTION_CODE_LINES} = {MAX_FUNCTION_CODE_LINES}\n", "")
    assert code_lines(ast.parse(short).body[0], short.splitlines()) == MAX_FUNCTION_CODE_LINES


@pytest.mark.parametrize("n", [1, MAX_FUNCTION_CODE_LINES + 5])
def test_code_lines_ignores_docstrings_and_comments(n):
    body = "\n".join(["    # c", "", *(f"    y = {i}" for i in range(n))])
    src = f'def g():\n    """one\n    two\n    three"""\n{body}\n'
    assert code_lines(ast.parse(src).body[0], src.splitlines()) == n
