"""The documentation stays true: docstring examples and guide-page code run, every public
name has an API page, the version is stated once, and (slow) the site builds with warnings as
errors and fetches nothing from the network."""

from __future__ import annotations

import doctest
import importlib
import json
import pkgutil
import re
import shutil
import subprocess
import sys
import types
from importlib.util import find_spec
from pathlib import Path

import pytest

import batchnorm

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# a module or page that imports one of these is skipped when it is not installed
OPTIONAL = ("jax", "torch", "mpi4py", "safetensors")


# ------------------------------------------------------------------------ docstring examples
def _library_modules() -> list[str]:
    names = ["batchnorm"]
    for info in pkgutil.walk_packages(batchnorm.__path__, "batchnorm."):
        names.append(info.name)
    return names


def _needs_absent(module_name: str) -> str | None:
    """The optional framework a library module needs, when it is not installed."""
    parts = module_name.split(".")
    for name in ("jax", "torch"):
        if name in parts and find_spec(name) is None:
            return name
    return None


def run_doctests(module: types.ModuleType) -> tuple[int, int, str]:
    """(failed, attempted, report) for the examples in ``module``'s docstrings."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    lines: list[str] = []
    runner = doctest.DocTestRunner(optionflags=flags, verbose=False)
    for test in finder.find(module, module.__name__):
        if test.examples:
            runner.run(test, out=lines.append)
    result = runner.summarize(verbose=False)
    return result.failed, result.attempted, "".join(lines)


def test_docstring_examples_run():
    """Every ``>>>`` example in the library's docstrings gives the output it shows."""
    attempted, failures = 0, []
    for name in _library_modules():
        if _needs_absent(name):
            continue
        failed, n, report = run_doctests(importlib.import_module(name))
        attempted += n
        if failed:
            failures.append(report)
    assert not failures, "\n".join(failures)
    assert attempted >= 40  # the kernels, layers and tools carry examples


def test_the_doctest_runner_reports_a_wrong_example():
    """Negative control: an example whose output is wrong fails."""
    module = types.ModuleType("fake_doc")
    module.__doc__ = ">>> 1 + 1\n3\n>>> 2 * 2\n4\n"
    failed, attempted, report = run_doctests(module)
    assert (failed, attempted) == (1, 2) and "Expected:\n    3" in report


# ---------------------------------------------------------------------------- guide pages
PAGES = sorted(
    p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_build" not in p.parts
)


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _absent_imports(blocks: list[str]) -> list[str]:
    imported = set()
    for block in blocks:
        imported |= set(re.findall(r"^\s*(?:import|from) (\w+)", block, flags=re.M))
    return [name for name in OPTIONAL if name in imported and find_spec(name) is None]


PAGES_WITH_CODE = [p for p in PAGES if _python_blocks((DOCS / p).read_text())]


# the JAX page jit-compiles (seconds): slow, like the project's other JAX compilations
SLOW_PAGES = {"guide/jax.md"}


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in PAGES_WITH_CODE],
)
def test_every_python_block_of_a_page_runs_in_order(page, tmp_path):
    """A page's ```python blocks, run in order in one namespace of a fresh interpreter, as a
    reader would paste them (skipped when a block needs an optional package that is not
    installed). A fresh process: the state earlier tests leave in this one (torch's
    thread-local modes, a gloo group) must not decide the outcome; a hang fails after
    ``BLOCKS_TIMEOUT_S``."""
    blocks = _python_blocks((DOCS / page).read_text())
    absent = _absent_imports(blocks)
    if absent:
        pytest.skip(f"{page} needs {', '.join(absent)}")
    proc = run_blocks(page, blocks, tmp_path)
    assert proc.returncode == 0, f"{page}:\n{proc.stderr[-3000:]}"


#: The seconds a page's blocks may take in their interpreter before the test fails.
BLOCKS_TIMEOUT_S = 600
_RUNNER = """
import json, sys
ns = {"__name__": "__docs__"}
for i, block in enumerate(json.load(open(sys.argv[2]))):
    exec(compile(block, f"{sys.argv[1]} python block {i}", "exec"), ns)
"""


def run_blocks(page: str, blocks: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``blocks`` in order in one namespace of a new interpreter in ``cwd``."""
    src = cwd / "_blocks.json"
    src.write_text(json.dumps(blocks))
    cmd = [sys.executable, "-c", _RUNNER, page, str(src)]
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, cwd=cwd, timeout=BLOCKS_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{page}: its blocks ran over {BLOCKS_TIMEOUT_S} s:\n{exc.stderr!s:.3000}")


def test_the_guide_pages_have_code_to_run():
    """The parametrized test above covers the pages that teach with code."""
    with_code = set(PAGES_WITH_CODE)
    assert {"getting_started.md", "guide/layers.md", "guide/variants.md"} <= with_code
    assert len(with_code) >= 9


def test_a_failing_block_would_fail(tmp_path):
    """Negative control: the block extraction finds code, the blocks share one namespace
    and an error in one fails the run, naming the block."""
    text = "intro\n\n```python\nx = 1\n```\n\n```python\nassert x == 2\n```\n"
    blocks = _python_blocks(text)
    assert blocks == ["x = 1\n", "assert x == 2\n"]
    proc = run_blocks("page.md", blocks, tmp_path)
    assert proc.returncode != 0 and "AssertionError" in proc.stderr
    assert "page.md python block 1" in proc.stderr
    assert run_blocks("page.md", [blocks[0], "assert x == 1\n"], tmp_path).returncode == 0


# ------------------------------------------------------------------------- the API pages
def _api_entries() -> set[str]:
    text = (DOCS / "api" / "index.rst").read_text()
    entries = set()
    for block in re.findall(r"\.\. autosummary::\n(?:   :.*\n)*\n((?:   \S.*\n)+)", text):
        entries |= {line.strip() for line in block.splitlines()}
    return entries


def missing_api_pages(names, entries) -> list[str]:
    """The public names that the API index does not list."""
    return [name for name in names if name not in entries]


def test_every_public_name_and_submodule_has_an_api_page():
    entries = _api_entries()
    assert not missing_api_pages(batchnorm.__all__, entries)
    submodules = (
        "functional conventions checkpoint renorm variants recalibrate convert fold "
        "diagnostics nn distributed gradcheck walk jax"
    ).split()
    assert not missing_api_pages(submodules, entries)
    # negative control: a name that is not listed is reported
    assert missing_api_pages(["not_a_public_name"], entries) == ["not_a_public_name"]


# -------------------------------------------------------------------------------- version
def test_the_version_is_stated_once():
    """pyproject.toml, batchnorm.__version__ and the changelog agree."""
    text = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', text, flags=re.M).group(1)
    assert declared == batchnorm.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{batchnorm.__version__}] - " in changelog
    assert "## [Unreleased]" in changelog


# ---------------------------------------------------------------------- the built site
EXTERNAL = re.compile(
    r"<(?:script|img|iframe|source|audio|video)\b[^>]*\bsrc=[\"'](?:https?:)?//"
    r"|<link\b[^>]*\bhref=[\"'](?:https?:)?//"
    r"|url\([\"']?(?:https?:)?//",
    flags=re.I,
)


def external_resources(html: str) -> list[str]:
    """Scripts, styles, images and fonts a page would fetch from the network."""
    return [m.group(0) for m in EXTERNAL.finditer(html)]


def test_the_offline_check_finds_network_resources():
    """Negative control for the check the build test makes."""
    assert external_resources('<script src="https://cdn.example/x.js"></script>')
    assert external_resources('<link rel="stylesheet" href="//fonts.example/css">')
    assert external_resources("<style>@font-face{src:url(https://f.example/a.woff)}</style>")
    assert not external_resources('<a href="https://example.org">a link</a>')
    assert not external_resources('<script src="_static/mathjax/tex-chtml.js"></script>')


@pytest.mark.slow
def test_the_site_builds_without_warnings_and_works_offline(tmp_path):
    """``sphinx -W`` on a copy of docs/ (the gallery writes its output beside its sources);
    then no page, script or style sheet refers to a network resource, math is bundled and
    every gallery page has its figure."""
    for module in ("sphinx", "numpydoc", "myst_parser", "sphinx_gallery", "pydata_sphinx_theme"):
        pytest.importorskip(module)
    src = tmp_path / "docs"
    shutil.copytree(
        DOCS, src, ignore=shutil.ignore_patterns("_build", "generated", "gallery", "tutorial")
    )
    shutil.copy(ROOT / "CHANGELOG.md", tmp_path / "CHANGELOG.md")
    out = tmp_path / "html"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(src),
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    pages = list(out.rglob("*.html"))
    assert len(pages) > 40
    found = {p.relative_to(out).as_posix(): external_resources(p.read_text()) for p in pages}
    assert not {k: v for k, v in found.items() if v}
    for css in out.rglob("*.css"):
        assert not external_resources(css.read_text(errors="replace")), css
    assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for name in ("plot_momentum", "plot_large_offset", "plot_fold_linear"):
        assert (out / "_images" / f"sphx_glr_{name}_001.png").is_file(), name
    assert "$$" not in (out / "guide" / "conventions.html").read_text()  # math was parsed


@pytest.mark.slow
def test_the_examples_run_as_the_site_renders_them(tmp_path):
    """``sphinx -b doctest``: the docstring examples after the docs' own processing (the
    escapes of conf.py once broke one), every one run and passing."""
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    src = tmp_path / "docs"
    shutil.copytree(
        DOCS, src, ignore=shutil.ignore_patterns("_build", "generated", "gallery", "tutorial")
    )
    shutil.copy(ROOT / "CHANGELOG.md", tmp_path / "CHANGELOG.md")
    out = tmp_path / "doctest"
    cmd = [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "doctest", str(src), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    report = (out / "output.txt").read_text() if (out / "output.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tests = int(re.findall(r"(\d+) tests", report)[-1])  # the summary at the end
    assert tests >= 40 and "0 failures in tests" in report, report[-2000:]


def test_the_layout_fixes_checked_in_a_browser_stay():
    """Checked with headless Chromium at 1400 and 900 px (issue 26): the header fits one row
    with the search as an icon, and code lines wrap instead of running off the right edge."""
    import ast

    conf = ast.parse((DOCS / "conf.py").read_text())
    options = next(
        ast.literal_eval(node.value)
        for node in conf.body
        if isinstance(node, ast.Assign)
        and getattr(node.targets[0], "id", "") == "html_theme_options"
    )
    assert options["navbar_persistent"] == ["search-button"]
    css = (DOCS / "_static" / "batchnorm.css").read_text()
    assert ".bd-article div.highlight pre { white-space: pre-wrap;" in css
