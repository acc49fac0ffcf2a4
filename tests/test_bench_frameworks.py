"""``batchnorm bench --torch`` / ``--jax``: the framework comparisons of ``benchmarks/``, run
through their ``main(argv)`` from a source checkout, refused with directions elsewhere."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from batchnorm_demo.bench import frameworks
from batchnorm_demo.cli import main

REPO = Path(__file__).resolve().parents[1]

_FAKE = """
import json, sys

def main(argv=None):
    print("FAKE {name} " + json.dumps(argv))
    return {{"argv": argv}}
"""


def _fake_repo(root: Path) -> Path:
    """A repository whose benchmarks/ scripts print the argv their main was given."""
    (root / "benchmarks").mkdir(parents=True)
    for name, _ in frameworks.SCRIPTS.values():
        (root / "benchmarks" / name).write_text(textwrap.dedent(_FAKE.format(name=name)))
    return root


def test_the_scripts_the_flags_name_are_the_repositorys_benchmarks():
    """In this checkout the package finds benchmarks/ at the repository root, and each script
    there has the ``main(argv)`` the command calls."""
    import ast

    for flag, (name, _) in frameworks.SCRIPTS.items():
        path = frameworks.script_path(name)
        assert path == REPO / "benchmarks" / name, flag
        tree = ast.parse(path.read_text())
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        assert mains and mains[0].args.args[0].arg == "argv", name


@pytest.mark.parametrize("flag", ["torch", "jax"])
def test_bench_flag_calls_the_scripts_main_with_the_repeats(flag, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(frameworks, "_REPO", _fake_repo(tmp_path))
    name = frameworks.SCRIPTS[flag][0]
    assert main(["bench", f"--{flag}", "--repeats", "3"]) == 0
    assert capsys.readouterr().out == f'FAKE {name} ["--repeats", "3"]\n'
    assert main(["bench", f"--{flag}"]) == 0  # the command's default repeats, passed on
    assert capsys.readouterr().out == f'FAKE {name} ["--repeats", "10"]\n'


@pytest.mark.parametrize("flag", ["torch", "jax"])
def test_without_a_checkout_the_flag_says_where_the_script_is(flag, tmp_path, monkeypatch, capsys):
    """An installed package has no benchmarks/: exit status 2 and one line saying how to run
    the script, nothing run."""
    monkeypatch.setattr(frameworks, "_REPO", tmp_path)
    name = frameworks.SCRIPTS[flag][0]
    assert main(["bench", f"--{flag}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"python benchmarks/{name}" in captured.err
    assert str(tmp_path / "benchmarks" / name) in captured.err


@pytest.mark.parametrize("other", ["--json", "--full"])
def test_kernel_only_flags_are_refused_with_a_framework(other, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(frameworks, "_REPO", _fake_repo(tmp_path))
    assert main(["bench", "--torch", other]) == 2
    captured = capsys.readouterr()
    assert "FAKE" not in captured.out  # the script did not run
    assert other in captured.err and "--torch" in captured.err


def test_torch_and_jax_together_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--torch", "--jax"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_failing_script_fails_the_command(tmp_path, monkeypatch):
    """What the script raises is not swallowed (a missing framework is an ImportError)."""
    root = _fake_repo(tmp_path)
    (root / "benchmarks" / "jax_flax.py").write_text("import no_such_framework_here\n")
    monkeypatch.setattr(frameworks, "_REPO", root)
    assert main(["bench", "--jax"]) == 2  # ModuleNotFoundError: the CLI's one-line refusal
