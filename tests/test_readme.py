"""The README's commands, example and links stay true (the pages it links to are tested by
tests/test_docs.py and tests/test_docs_claims.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]
    assert len(commands) == 2, commands
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1
    assert test_cmd[0] in (ROOT / ".ci" / "run").read_text()


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The front page's ```python block(s), run in order in one namespace, as a reader would
    paste them."""
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 1
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README python block {i}", "exec"), namespace)  # noqa: S102
    layer, x = namespace["layer"], namespace["x"]
    assert layer.num_batches_tracked == 1 and not layer.training
    assert namespace["dx"].shape == x.shape and layer.dgamma.shape == (64,)
    assert (tmp_path / "bn.npz").exists()
    import batchnorm as bn

    saved = bn.BatchNorm(64).load(tmp_path / "bn.npz")
    np.testing.assert_array_equal(saved.running_mean, layer.running_mean)


# ------------------------------------------------------------------------ the front page
def _links() -> list[str]:
    """The README's relative link targets (not web addresses or anchors)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_relative_link_of_the_readme_exists():
    links = _links()
    assert len(links) >= 10
    missing = [t for t in links if not (ROOT / t.split("#", 1)[0]).exists()]
    assert missing == []


def test_the_link_check_would_catch_a_broken_link(monkeypatch):
    """Negative control: a link to a file that is not in the tree is found."""
    monkeypatch.setattr(sys.modules[__name__], "README", README + "\n[gone](docs/nosuch.md)\n")
    assert "docs/nosuch.md" in _links()
    assert not (ROOT / "docs/nosuch.md").exists()


def test_the_readme_is_a_front_page():
    """About 150 lines: what it is, the two commands, one example, the headline findings and
    speed, links into the documentation (which holds the rest)."""
    lines = README.splitlines()
    assert len(lines) <= 170, len(lines)
    headings = [line for line in lines if line.startswith("## ")]
    for needed in ("## Set up", "## A first example", "## What the demo found"):
        assert needed in headings, headings
    assert "docs/evidence.md" in README and "docs/guide/index.md" in README


# ----------------------------------------------------------------------------- bash blocks
# The README's set-up creates .venv with `python3 -m venv`; every other command must name
# what that set-up installed: .venv/bin/python, .venv/bin/pip, the package's own scripts and
# the executables of the distributions its extras pull in (mpiexec comes from mpich).
VENV = ".venv/bin/"
VENV_BASE = {"python", "python3", "pip", "pip3"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomli = pytest.importorskip("tomli")
        return tomli.loads((ROOT / "pyproject.toml").read_text())
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _extra_executables() -> dict[str, str]:
    """Executable name -> the distribution (named in an extra) that installs it."""
    from importlib import metadata

    names: dict[str, str] = {}
    for reqs in _pyproject()["project"]["optional-dependencies"].values():
        for req in reqs:
            dist = re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0]
            try:
                files = metadata.distribution(dist).files or []
            except metadata.PackageNotFoundError:
                continue
            for f in files:
                parts = Path(str(f)).parts
                if len(parts) >= 2 and parts[-2] in ("bin", "Scripts"):
                    names.setdefault(parts[-1], dist)
    return names


def _script_flags(path: Path) -> set[str]:
    """The options a script in the tree declares with argparse (read, not run)."""
    return set(re.findall(r"add_argument\(\s*\"(--?[\w-]+)\"", path.read_text()))


def _commands(block: str) -> list[list[str]]:
    """The simple commands of a bash block (comments dropped, split at && || ; |)."""
    import shlex

    out = []
    for line in block.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        cmd: list[str] = []
        for tok in lex:
            if tok in ("&&", "||", ";", "|", "&"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
        if cmd:
            out.append(cmd)
    return out


def _batchnorm_problems(args: list[str]) -> list[str]:
    from batchnorm_demo.cli import build_parser

    subs = build_parser()._subparsers._group_actions[0].choices
    if not args or args[0] not in subs:
        return [f"batchnorm has no subcommand {args[:1]} (it has {sorted(subs)})"]
    known = subs[args[0]]._option_string_actions
    return [
        f"batchnorm {args[0]} has no option {a}"
        for a in args[1:]
        if a.startswith("-") and a.split("=", 1)[0] not in known
    ]


def _python_problems(args: list[str]) -> list[str]:
    import importlib.util

    if not args:
        return []
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        if module in ("batchnorm", "batchnorm_demo"):
            return _batchnorm_problems(rest)
        if importlib.util.find_spec(module) is None:
            return [f"python -m {module}: no such module after the set-up"]
        return []
    script = args[0]
    path = ROOT / script
    if not path.is_file():
        if f"as `{script}`" in README:  # a file the README tells the reader to write
            return []
        return [f"{script}: no such script in the tree"]
    flags = _script_flags(path)
    return [
        f"{script} has no option {a}"
        for a in args[1:]
        if a.startswith("-") and a.split("=", 1)[0] not in flags
    ]


def _pip_problems(args: list[str]) -> list[str]:
    extras = _pyproject()["project"]["optional-dependencies"]
    problems = []
    for a in args:
        m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", a)
        if m and m.group(1):
            problems += [f"pip: no extra [{e}]" for e in m.group(1).split(",") if e not in extras]
    return problems


def command_problems(cmd: list[str]) -> list[str]:
    """What is wrong with one command of the README, after the README's set-up (static)."""
    while cmd and re.fullmatch(r"[A-Za-z_]\w*=.*", cmd[0]):  # VAR=value prefixes
        cmd = cmd[1:]
    if not cmd:
        return []
    exe, args = cmd[0], cmd[1:]
    if exe == "python3":  # the system interpreter, only to create the environment
        return [] if args[:2] == ["-m", "venv"] else [f"{cmd}: use {VENV}python, not python3"]
    if not exe.startswith(VENV):
        return [f"{' '.join(cmd)}: {exe} is not in {VENV} (bare commands may not exist)"]
    name = exe[len(VENV) :]
    scripts = _pyproject()["project"].get("scripts", {})
    provided = _extra_executables()
    bin_dir = Path(sys.executable).parent
    if name not in VENV_BASE | set(scripts) | set(provided):
        return [f"{exe}: nothing the set-up installs provides it"]
    if not (bin_dir / name).exists():
        return [f"{exe}: not in this environment's {bin_dir} after the set-up"]
    if name in ("python", "python3"):
        return _python_problems(args)
    if name in ("pip", "pip3"):
        return _pip_problems(args)
    if name in scripts:
        return _batchnorm_problems(args)
    if name in ("mpiexec", "mpirun"):
        i = 0
        while i < len(args) and args[i].startswith("-"):
            i += 2 if args[i] in ("-n", "-np") else 1
        return command_problems(args[i:])
    return []


def test_every_readme_bash_command_names_what_the_set_up_installs():
    """Each command of each ```bash block, checked statically (nothing long is run)."""
    blocks = _blocks("bash")
    assert len(blocks) >= 3
    commands = [c for b in blocks for c in _commands(b)]
    assert len(commands) >= 8
    problems = [p for c in commands for p in command_problems(c)]
    assert problems == []


@pytest.mark.parametrize(
    "line",
    [
        'pip install -e ".[mpi]"',
        "mpiexec -n 2 .venv/bin/batchnorm sync-demo",
        "python benchmarks/run_full.py",
        ".venv/bin/batchnorm nosuch",
        ".venv/bin/batchnorm demo --nosuch 3",
        '.venv/bin/pip install -e ".[nosuch]"',
        ".venv/bin/python benchmarks/missing.py",
        ".venv/bin/python benchmarks/run_full.py --nosuch",
        ".venv/bin/python -m nosuch_module_here",
        ".venv/bin/mpiexec -n 2 .venv/bin/batchnorm sync-demo --nosuch",
        ".venv/bin/nosuch-tool --help",
    ],
)
def test_the_bash_check_catches_commands_that_would_fail(line):
    """Negative controls: each of these fails on a fresh clone after the set-up."""
    (cmd,) = _commands(line)
    assert command_problems(cmd)


def test_the_benchmark_script_writes_outside_the_tree_by_default(tmp_path, monkeypatch):
    """run_full.py writes to bench-out/ (ignored by git) or --out, never benchmarks/ unasked."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_full", ROOT / "benchmarks" / "run_full.py")
    run_full = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_full)
    default = run_full.parse_args([]).out
    assert not (ROOT / default).resolve().is_relative_to(ROOT / "benchmarks")
    assert f"{default.rstrip('/')}/" in (ROOT / ".gitignore").read_text().splitlines()
    tracked = {p: p.read_bytes() for p in (ROOT / "benchmarks").glob("results.*")}
    monkeypatch.setattr(run_full, "run_bench", lambda suite, repeats: {"rows": [], "suite": suite})
    monkeypatch.setattr(run_full, "format_bench", lambda result: "| table |")
    monkeypatch.chdir(tmp_path)
    run_full.main(["--repeats", "1"])
    assert (tmp_path / default / "results.md").read_text() == "| table |\n"
    run_full.main(["--repeats", "1", "--out", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "results.json").exists()
    assert {p: p.read_bytes() for p in (ROOT / "benchmarks").glob("results.*")} == tracked
    with pytest.raises(SystemExit):
        run_full.parse_args(["--repeats", "0"])
