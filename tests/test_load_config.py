"""``layer.load(path)`` checks the file's configuration: garbage is refused naming the
field, a field that decides what the state means or how it evolves must equal the layer's,
and a refused load changes nothing (it used to check only the class and the feature
shape: a file's eps, momentum, convention ... were silently ignored)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


def _snapshot(layer) -> dict:
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _trained(layer, rng):
    layer.forward(rng.standard_normal((8, 3)) * 3 + 1)
    return layer


def _file(tmp_path, source, **changes) -> Path:
    """``source``'s state with its configuration changed (None removes a field)."""
    cfg = {**source.config(), **changes}
    cfg = {k: v for k, v in cfg.items() if v is not None or k == "momentum"}
    path = tmp_path / "layer.npz"
    checkpoint.save_npz(path, source.state_dict(), meta={"batchnorm": cfg})
    return path


GARBAGE = [
    ("eps", "garbage"),
    ("eps", -1.0),
    ("eps", float("nan")),
    ("momentum", 2.5),
    ("momentum", "fast"),
    ("convention", "nope"),
    ("affine", "yes"),
    ("nonfinite", "ignore"),
    ("backend", "gpu"),
    ("dtype", "int7"),
    ("axis", "x"),
]


@pytest.mark.parametrize(("field", "bad"), GARBAGE)
def test_garbage_in_a_file_is_refused_naming_the_field(rng, tmp_path, field, bad):
    source = _trained(bn.BatchNorm(3), rng)
    target = _trained(bn.BatchNorm(3), np.random.default_rng(7))
    before = _snapshot(target)
    with pytest.raises(ValueError, match=field):
        target.load(_file(tmp_path, source, **{field: bad}))
    assert _same(_snapshot(target), before)
    target.load(_file(tmp_path, source))  # the control: the truthful file loads
    assert _same(_snapshot(target), _snapshot(source))


def test_an_unknown_field_is_refused_naming_it(rng, tmp_path):
    source = _trained(bn.BatchNorm(3), rng)
    target = bn.BatchNorm(3)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="colour"):
        target.load(_file(tmp_path, source, colour="blue"))
    assert _same(_snapshot(target), before)


DIFFERENT = [
    ("eps", 1e-3),
    ("momentum", 0.5),
    ("momentum", None),
    ("convention", "keras"),
    ("unbiased", True),
    ("nonfinite", "skip"),
]


@pytest.mark.parametrize(("field", "other"), DIFFERENT)
def test_a_file_of_another_configuration_is_refused(rng, tmp_path, field, other):
    source = _trained(bn.BatchNorm(3, **{field: other}), rng)
    target = _trained(bn.BatchNorm(3), np.random.default_rng(7))
    before = _snapshot(target)
    path = tmp_path / "other.npz"
    source.save(path)
    with pytest.raises(ValueError, match=f"file's {field}="):
        target.load(path)
    assert _same(_snapshot(target), before)
    # the control: a layer of the file's configuration loads it
    twin = bn.BatchNorm(3, **{field: other}).load(path)
    assert _same(_snapshot(twin), _snapshot(source))


def test_variant_arguments_are_compared_too(rng, tmp_path):
    source = _trained(bn.GhostBatchNorm(3, virtual_batch_size=4), rng)
    source.save(tmp_path / "g.npz")
    with pytest.raises(ValueError, match="virtual_batch_size=4"):
        bn.GhostBatchNorm(3, virtual_batch_size=2).load(tmp_path / "g.npz")
    bn.GhostBatchNorm(3, virtual_batch_size=4).load(tmp_path / "g.npz")
    renorm = _trained(bn.BatchRenorm(3, rmax=2.0), rng)
    renorm.save(tmp_path / "r.npz")
    with pytest.raises(ValueError, match="rmax=2.0"):
        bn.BatchRenorm(3).load(tmp_path / "r.npz")


def test_how_and_where_a_layer_computes_may_differ(rng, tmp_path):
    source = _trained(bn.BatchNorm(3, backend="numpy"), rng)
    source.save(tmp_path / "a.npz")
    for target in (
        bn.BatchNorm(3, backend="auto"),
        bn.BatchNorm(3, dtype=np.float32),
        bn.BatchNorm(3, axis=-1),
    ):
        target.load(tmp_path / "a.npz")
        np.testing.assert_allclose(target.running_mean, source.running_mean, rtol=1e-7)


def test_a_field_an_older_file_lacks_counts_as_the_default(rng, tmp_path):
    source = _trained(bn.BatchNorm(3), rng)
    path = _file(tmp_path, source, nonfinite=None)
    del_cfg = checkpoint.load_state(path)[1]["batchnorm"]
    assert "nonfinite" not in del_cfg
    bn.BatchNorm(3).load(path)  # the default: as recorded
    with pytest.raises(ValueError, match="nonfinite='raise' differs"):
        bn.BatchNorm(3, nonfinite="skip").load(path)


@pytest.mark.parametrize("name", ["batchnorm", "renorm", "ghost"])
def test_files_of_0_1_0_still_load(name):
    expected = json.loads((FIXTURES / f"v0_1_0_{name}.expected.json").read_text())
    layer = bn.NormLayer.from_config(expected["config"]).load(FIXTURES / f"v0_1_0_{name}.npz")
    assert layer.num_batches_tracked == expected["state"]["num_batches_tracked"]


@pytest.mark.parametrize("meta", [None, {}, {"batchnorm": None}, {"state_version": 1}])
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_file_without_a_configuration_is_refused_naming_what_is_missing(
    rng, tmp_path, meta, suffix
):
    """A hand-made or edited file without the 'batchnorm' metadata used to load into a
    layer of any configuration (the check was skipped): a file whose eps, momentum or
    convention cannot be compared is refused, naming the missing entry and the way to load
    the arrays alone; the layer is unchanged. Every file ``save`` writes has the entry."""
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    source = _trained(bn.BatchNorm(3, eps=1e-3, momentum=0.5, convention="keras"), rng)
    target = _trained(bn.BatchNorm(3), np.random.default_rng(7))
    before = _snapshot(target)
    path = tmp_path / f"bare{suffix}"
    checkpoint.save_state(path, source.state_dict(), meta=meta)
    with pytest.raises(ValueError, match=r"no 'batchnorm' entry.*load_state_dict") as info:
        target.load(path)
    assert str(path) in str(info.value)
    assert _same(_snapshot(target), before)
    # the arrays alone load through the documented route, on purpose
    target.load_state_dict(checkpoint.load_state(path)[0])
    assert _same(_snapshot(target), _snapshot(source))
    # the control: what save writes (npz and safetensors) round-trips into its configuration
    source.save(tmp_path / f"saved{suffix}")
    twin = bn.BatchNorm(3, eps=1e-3, momentum=0.5, convention="keras")
    assert _same(_snapshot(twin.load(tmp_path / f"saved{suffix}")), _snapshot(source))


def test_a_configuration_without_a_class_is_refused_naming_the_field(rng, tmp_path):
    """A configuration that lacks ``class`` (or has a non-string one) is refused naming
    'batchnorm.class' (it read "the file holds a None layer, not a BatchNorm")."""
    source = _trained(bn.BatchNorm(3), rng)
    target = bn.BatchNorm(3)
    before = _snapshot(target)
    for cls in (None, 7):
        with pytest.raises(ValueError, match=r"'batchnorm\.class' must be a class name"):
            target.load(_file(tmp_path, source, **{"class": cls}))
        assert _same(_snapshot(target), before)
    target.load(_file(tmp_path, source))  # the control: the class given, it loads
    assert _same(_snapshot(target), _snapshot(source))
