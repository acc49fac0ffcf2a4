"""``import batchnorm.torch`` / ``batchnorm.jax`` without the framework: the install line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_without(framework: str, module: str) -> subprocess.CompletedProcess:
    """Import ``module`` in a fresh interpreter where ``framework`` cannot be imported."""
    code = f"import sys; sys.modules[{framework!r}] = None; import {module}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("framework", "module", "extra"),
    [("torch", "batchnorm.torch", "batchnorm[torch]"), ("jax", "batchnorm.jax", "batchnorm[jax]")],
)
def test_a_missing_framework_names_the_install_command(framework, module, extra):
    proc = _import_without(framework, module)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ModuleNotFoundError: {module} needs "), last
    assert f"pip install '{extra}'" in last


def test_the_library_without_the_frameworks_still_imports():
    """Negative control: ``import batchnorm`` needs neither framework."""
    code = "import sys; sys.modules['torch'] = sys.modules['jax'] = None; import batchnorm"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_with_the_framework_the_module_imports():
    pytest.importorskip("torch")
    import batchnorm.torch as bt

    assert hasattr(bt, "BatchNorm2d")
