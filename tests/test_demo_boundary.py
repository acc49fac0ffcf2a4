"""The library never imports the demo, and the demo uses only the library's public modules."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LIBRARY = SRC / "batchnorm"
DEMO = SRC / "batchnorm_demo"

PUBLIC_MODULES = (
    "batchnorm",
    "batchnorm.nn",
    "batchnorm.distributed",
    "batchnorm.checkpoint",
    "batchnorm.conventions",
    "batchnorm.recalibrate",
    "batchnorm.diagnostics",
    "batchnorm.fold",
    "batchnorm.convert",
    "batchnorm.variants",
    "batchnorm.renorm",
)
DEMO_ONLY = ("matplotlib", "mlxtend", "mnist1d")

_PROBE = """
import json, sys
import {modules}
print(json.dumps(sorted(sys.modules)))
"""


def _imported(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a file under ``root``);
    ``from X import a`` also yields ``X.a``, since ``a`` may be a submodule."""
    package = path.relative_to(root).with_suffix("").parts[:-1]  # the file's package
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_importing_the_library_loads_no_demo_module():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    res = subprocess.run(
        [sys.executable, "-c", _PROBE.format(modules=", ".join(PUBLIC_MODULES))],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert "batchnorm.diagnostics" in loaded  # the probe really imported the library
    demo = [m for m in loaded if m == "batchnorm_demo" or m.startswith("batchnorm_demo.")]
    assert not demo, f"the library imported the demo: {demo}"
    heavy = [m for m in loaded if m.split(".", 1)[0] in DEMO_ONLY]
    assert not heavy, f"the library imported the demo's dependencies: {heavy}"


def test_no_library_module_imports_the_demo():
    files = sorted(p for p in LIBRARY.rglob("*.py") if p.name != "__main__.py")
    assert len(files) > 10
    bad = [
        f"{p.relative_to(SRC)}:{line}: {mod}"
        for p in files
        for line, mod in _imported(p)
        if mod.split(".", 1)[0] == "batchnorm_demo"
    ]
    assert not bad, "library modules import the demo:\n" + "\n".join(bad)


def test_the_demo_imports_only_public_library_modules():
    files = sorted(DEMO.rglob("*.py"))
    assert len(files) > 5
    bad = []
    for p in files:
        for line, mod in _imported(p):
            parts = mod.split(".")
            if parts[0] != "batchnorm" or len(parts) == 1:
                continue
            if _private(parts[1]) or parts[1] == "layers":
                bad.append(f"{p.relative_to(SRC)}:{line}: {mod}")
    assert not bad, "demo modules import private library modules:\n" + "\n".join(bad)


def test_the_import_walk_sees_relative_and_private_imports(tmp_path):
    """The static checks above would catch what they look for."""
    fake = tmp_path / "batchnorm_demo" / "experiments"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text(
        "from .. import data\nfrom ..report import pm\nfrom batchnorm import _dispatch\n"
        "import batchnorm.layers\nfrom batchnorm.nn import Linear\n"
        "def f():\n    from batchnorm import _validation\n"
    )
    mods = {m for _, m in _imported(fake / "x.py", tmp_path)}
    assert {"batchnorm_demo.data", "batchnorm_demo.report", "batchnorm.nn.Linear"} <= mods
    assert {"batchnorm._dispatch", "batchnorm.layers", "batchnorm._validation"} <= mods
    assert not _private("__version__") and _private("_dispatch")
