"""What users of batchnorm 0.1.0 rely on keeps working: every public name, and checkpoints
written by that release (fixtures saved before the core redesign)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
PUBLIC = json.loads((FIXTURES / "public_api_v0_1_0.json").read_text())


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_name_of_0_1_0_still_imports(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lost {missing}"


@pytest.mark.parametrize("name", ["batchnorm", "renorm", "ghost"])
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_checkpoints_of_0_1_0_load_unchanged(name, suffix):
    pytest.importorskip("safetensors") if suffix == ".safetensors" else None
    expected = json.loads((FIXTURES / f"v0_1_0_{name}.expected.json").read_text())
    path = FIXTURES / f"v0_1_0_{name}{suffix}"
    _, meta = checkpoint.load_state(path)
    assert checkpoint.state_version(meta) == 0  # 0.1.0 recorded no version
    layer = bn.NormLayer.from_config(expected["config"])
    layer.load(path)
    for key, value in expected["state"].items():
        got = getattr(layer, key)
        if key == "num_batches_tracked":
            assert got == value
        else:
            np.testing.assert_array_equal(got, np.asarray(value))
    assert layer.config() == expected["config"]


def test_state_dicts_and_checkpoints_carry_a_version(tmp_path):
    layer = bn.BatchNorm(3)
    layer.forward(np.random.default_rng(0).normal(size=(8, 3)))
    sd = layer.state_dict()
    assert sd.version == checkpoint.STATE_VERSION and isinstance(sd, dict)
    layer.save(tmp_path / "l.npz")
    _, meta = checkpoint.load_state(tmp_path / "l.npz")
    assert meta["state_version"] == checkpoint.STATE_VERSION
    assert meta["library_version"] == bn.__version__
    other = bn.BatchNorm(3).load(tmp_path / "l.npz")
    np.testing.assert_array_equal(other.running_mean, layer.running_mean)


def test_a_future_version_is_refused_and_nothing_changes():
    layer = bn.BatchNorm(2)
    sd = layer.state_dict()
    sd["running_mean"] = np.ones(2)
    before = layer.state_dict()
    with pytest.raises(ValueError, match="version 99 is not supported"):
        layer.load_state_dict(sd, version=99)
    np.testing.assert_array_equal(layer.running_mean, before["running_mean"])


def test_migrations_run_from_old_versions(monkeypatch):
    seen = []

    def v0_to_v1(state):
        seen.append(dict(state))
        return dict(state)

    monkeypatch.setitem(checkpoint.MIGRATIONS, 0, v0_to_v1)
    layer = bn.BatchNorm(2)
    layer.load_state_dict(layer.state_dict(), version=0)
    assert len(seen) == 1
    layer.load_state_dict(layer.state_dict())  # current version: no migration
    assert len(seen) == 1
