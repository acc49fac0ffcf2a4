"""The README's commands and example stay true."""

from __future__ import annotations

import re
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


def test_every_readme_python_block_runs_in_order(tmp_path, monkeypatch):
    """Every ```python block, run in order in one namespace, as a reader would paste them."""
    pytest.importorskip("safetensors")
    pytest.importorskip("mpi4py")
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 3
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README python block {i}", "exec"), namespace)  # noqa: S102
        if i == 1:  # the pure kernels
            assert namespace["dx"].shape == namespace["x"].shape
            assert namespace["dgamma"].shape == (64,)
    layer = namespace["layer"]
    assert not layer.training and (tmp_path / "bn.npz").exists()
    metrics = namespace["metrics"]  # the data-parallel loop, here on a single rank
    assert len(metrics) == 1 and np.isfinite(metrics[0]["loss"])


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
