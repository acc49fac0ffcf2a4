"""The README's commands and example stay true."""

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


def _section(title):
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _jax_blocks():
    return re.findall(r"```python\n(.*?)```", _section("Use it from JAX"), flags=re.S)


def _absent_framework(block: str) -> str | None:
    """The optional framework (jax) a README block imports when it is not installed: the
    block is then skipped, as the README says it needs that extra."""
    from importlib.util import find_spec

    for name in ("jax",):
        if re.search(rf"^(import|from) {name}\b", block, flags=re.M) or block in _jax_blocks():
            if find_spec(name) is None:
                return name
    return None


def test_every_readme_python_block_runs_in_order(tmp_path, monkeypatch):
    """Every ```python block, run in order in one namespace, as a reader would paste them."""
    pytest.importorskip("safetensors")
    pytest.importorskip("mpi4py")
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 3
    namespace: dict = {}
    for i, block in enumerate(blocks):
        if _absent_framework(block):
            continue
        exec(compile(block, f"README python block {i}", "exec"), namespace)  # noqa: S102
        if i == 1:  # the pure kernels
            assert namespace["dx"].shape == namespace["x"].shape
            assert namespace["dgamma"].shape == (64,)
    layer = namespace["layer"]
    assert not layer.training and (tmp_path / "bn.npz").exists()
    metrics = namespace["metrics"]  # the data-parallel loop, here on a single rank
    assert len(metrics) == 1 and np.isfinite(metrics[0]["loss"])


def test_readme_jax_section_runs_and_gives_what_it_says():
    """The "Use it from JAX" blocks on their own: the results against the library's own
    single-device call (skipped without jax)."""
    jax = pytest.importorskip("jax")
    blocks = _jax_blocks()
    assert len(blocks) == 2 and all(_absent_framework(b) is None for b in blocks)
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README JAX block {i}", "exec"), ns)  # noqa: S102
    jnp, bnj = jax.numpy, ns["bnj"]
    assert ns["yj"].shape == ns["yr"].shape == ns["yg"].shape == (256, 16)
    mean = np.asarray(ns["xj"], np.float64).mean(0)
    np.testing.assert_allclose(np.asarray(ns["stats"][0]), 0.01 * mean, rtol=1e-6)
    # d/dgamma_c of mean(y^2 c) = 2 c gamma var/(var + eps) / 16 = c/8 (unit variance data)
    np.testing.assert_allclose(np.asarray(ns["grads"][0]), np.arange(16) / 8, rtol=2e-3)
    stats = ns["stats"]

    def single(g, b):
        y, _ = bnj.batch_norm(ns["xs"], g, b, *stats, training=True)
        return jnp.sum(y * ns["xs"])

    for a, e in zip(
        (ns["dg"], ns["db"]), jax.grad(single, argnums=(0, 1))(ns["gj"], ns["bj"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-3)


def test_readme_blocks_needing_an_absent_framework_are_skipped(monkeypatch):
    """Negative control for the skip: a block that imports jax is skipped only when jax is
    missing, and a NumPy block never."""
    import importlib.util

    jax_block, numpy_block = _jax_blocks()[0], _blocks("python")[0]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert _absent_framework(jax_block) == "jax"
    assert _absent_framework(numpy_block) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert _absent_framework(jax_block) is None


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = _blocks("python")[0]
    namespace: dict = {}
    exec(compile(example, "README example", "exec"), namespace)  # noqa: S102
    layer = namespace["layer"]
    assert layer.num_batches_tracked == 1 and not layer.training
    assert (tmp_path / "bn.npz").exists()


def test_readme_variants_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _blocks("python")[:3]:
        exec(compile(block, "README examples", "exec"), namespace)  # noqa: S102
    x, model = namespace["x"], namespace["model"]
    assert namespace["y"].shape == x.shape
    assert namespace["report"][0]["batches"] == 10
    z = np.random.default_rng(1).standard_normal((4, 20))
    expected = model.modules[1].eval()(z @ model.modules[0].W)
    np.testing.assert_allclose(
        z @ namespace["W_folded"] + namespace["b_folded"], expected, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        namespace["same"].running_var, namespace["layer"].running_var, rtol=1e-12
    )
    assert (tmp_path / "bn.safetensors").exists()


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
