"""The import rules of the library (docs/contributing.md, "Import rules"): every module sits
on a level and imports only downward or sideways, there are no cycles, and the maths and
kernels never see mpi4py, torch or jax."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "batchnorm"

# level of each module (dotted, relative to the package); a package's modules share its level
LEVELS = {
    "_version": 0,
    "_xp": 0,
    "_plans": 0,
    "_validation": 1,
    "_statedict": 1,
    "_checkpoint_io": 1,
    "_checkpoint_write": 1,
    "_checkpoint_meta": 1,
    "core": 2,
    "backends": 3,
    "_sync": 3,
    "module": 4,
    "_cache": 4,
    "_inputs": 4,
    "_compose": 4,
    "functional": 4,
    "conventions": 4,
    "checkpoint": 4,
    "layers": 5,
    "walk": 6,
    "renorm": 6,
    "variants": 6,
    "recalibrate": 6,
    "convert": 6,
    "fold": 6,
    "diagnostics": 6,
    "nn": 6,
    "gradcheck": 6,
    "distributed": 7,
    "adapters": 7,  # framework wrappers (torch, jax) over functional + reducers
    "torch": 8,  # public batchnorm.torch / batchnorm.jax: re-exports of adapters
    "jax": 8,
    "flax": 8,  # public batchnorm.flax: re-exports of the Flax adapter
}
#: Private names still imported across modules (file, name): none.
PRIVATE_ALLOWED: set[tuple[str, str]] = set()
ENTRY = {"__init__", "__main__"}  # re-exports and the command-line shim: above everything
FORBIDDEN_LOW = ("mpi4py", "torch", "jax")  # never imported by core/ or backends/


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _level(mod: str) -> int | None:
    if mod in ENTRY:
        return None
    return LEVELS[mod.split(".")[0]]


def _imports(mod: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, lazy ones included; relative
    imports resolved to package-relative dotted names, absolute ones kept with a '!' mark."""
    tree = ast.parse(path.read_text())
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                if node.module is None:  # from . import a, b
                    for alias in node.names:
                        found.append((".".join([*base, alias.name]), node.lineno))
                    continue
                found.append((target, node.lineno))
            else:
                found.append(("!" + node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend(("!" + a.name, node.lineno) for a in node.names)
    return found


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        deps = set()
        for name, _ in _imports(mod, path):
            if name.startswith("!batchnorm."):
                name = name[len("!batchnorm.") :]
            elif name.startswith("!"):
                continue
            target = _resolve(name, mods)
            if target and target != mod:
                deps.add(target)
        graph[mod] = deps
    return graph


def test_every_module_has_a_level():
    missing = [m for m in _modules() if m not in ENTRY and m.split(".")[0] not in LEVELS]
    assert not missing, f"modules without a level in LEVELS: {missing}"


def test_nothing_imports_upward():
    bad = []
    for mod, deps in _graph().items():
        lv = _level(mod)
        if lv is None:
            continue
        for dep in deps:
            dl = _level(dep)
            if dl is None or dl > lv:
                bad.append(f"{mod} (level {lv}) imports {dep} (level {dl})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    # a package's __init__ importing its own submodules is not a cycle of meaning
    real = [c for c in cycles if len({m.split(".")[0] for m in c}) > 1]
    assert not real, f"import cycles: {real}"


@pytest.mark.parametrize("package", ["core", "backends"])
def test_maths_and_kernels_never_import_frameworks(package):
    bad = []
    for mod, path in _modules().items():
        if mod.split(".")[0] != package:
            continue
        for name, line in _imports(mod, path):
            root = name.lstrip("!").split(".")[0]
            if name.startswith("!") and root in FORBIDDEN_LOW:
                bad.append(f"{path.name}:{line} imports {name[1:]}")
    assert not bad, bad


def test_the_checker_sees_violations(tmp_path, monkeypatch):
    """Negative control: the rules fail on a planted upward import and a planted cycle."""
    fake = tmp_path / "batchnorm"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "bad.py").write_text("from ..layers import x\nimport torch\n")
    (fake / "layers").mkdir()
    (fake / "layers" / "__init__.py").write_text("from ..walk import y\n")
    (fake / "walk.py").write_text("from .layers import z\n")
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    with pytest.raises(AssertionError, match="core.bad"):
        test_nothing_imports_upward()
    with pytest.raises(AssertionError, match="imports torch"):
        test_maths_and_kernels_never_import_frameworks("core")
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycles()


def _private_imports() -> list[str]:
    """``file:line name`` for every private name (one leading underscore, not a dunder)
    taken from another module of the package by ``from X import _name`` or ``module._name``
    on a module imported from the package."""
    bad = []
    for path in _modules().values():
        rel = path.relative_to(SRC).as_posix()
        tree = ast.parse(path.read_text())
        modules = set()  # local names bound to modules of the package
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            for alias in node.names:
                name = alias.name
                if node.module is None:  # from . import module (as m)
                    modules.add(alias.asname or name)
                elif name.startswith("_") and not name.startswith("__"):
                    if (rel, name) not in PRIVATE_ALLOWED:
                        bad.append(f"{rel}:{node.lineno} imports {name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{rel}:{node.lineno} reads {node.value.id}.{node.attr}")
    return bad


def test_no_private_name_crosses_a_module():
    bad = _private_imports()
    assert not bad, "\n".join(bad)


def test_the_private_name_checker_sees_violations(tmp_path, monkeypatch):
    """Negative control: a planted ``from .a import _x`` and a ``mod._y`` are reported."""
    fake = tmp_path / "batchnorm"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("_x = 1\n_y = 2\n")
    (fake / "b.py").write_text("from .a import _x\nfrom . import a as m\nz = m._y\n")
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    bad = _private_imports()
    assert any("b.py:1 imports _x" in b for b in bad)
    assert any("b.py:3 reads m._y" in b for b in bad)


# the reducers themselves and the checks of a reducer assignment; everything else hands
# both of its passes to ``reducer.dispatch`` (issue 22: synchronization without branches)
DISTRIBUTED_READERS = ("core/reduce.py", "_sync/", "distributed.py", "layers/sync.py", "_inputs.py")


def _distributed_reads() -> list[str]:
    """``<expr>.distributed`` read outside :data:`DISTRIBUTED_READERS` (``torch.distributed``
    and ``dist.`` module paths aside)."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(DISTRIBUTED_READERS):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Attribute) and node.attr == "distributed"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("torch", "bn", "batchnorm"):
                continue
            bad.append(f"{rel}:{node.lineno} reads .distributed")
    return bad


def test_only_the_reducers_ask_whether_a_call_is_distributed():
    bad = _distributed_reads()
    assert not bad, "\n".join(bad)


def test_the_distributed_reader_check_sees_violations(tmp_path, monkeypatch):
    """Negative control: a planted ``if reducer.distributed:`` in a layer is reported."""
    fake = tmp_path / "batchnorm"
    (fake / "layers").mkdir(parents=True)
    (fake / "layers" / "base.py").write_text("def f(reducer):\n    return reducer.distributed\n")
    (fake / "layers" / "sync.py").write_text("def g(r):\n    return r.distributed\n")
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    assert _distributed_reads() == ["layers/base.py:2 reads .distributed"]
