"""Regression tests for the defects a hostile user found in the layer family (issue 8)."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
from conftest import snapshot

import batchnorm as bn
from batchnorm import BatchRenorm, FrozenBatchNorm, GhostBatchNorm
from batchnorm.diagnostics import averaging_window, describe_checkpoint, train_eval_gap
from batchnorm.nn import Linear, Sequential, Sigmoid

ALL_LAYERS = {
    "BatchNorm": lambda: bn.BatchNorm(3),
    "BatchRenorm": lambda: BatchRenorm(3, rmax=2.0, dmax=1.0),
    "GhostBatchNorm": lambda: GhostBatchNorm(3, virtual_batch_size=4),
}


def _trained(make, rng, steps=3):
    layer = make()
    for _ in range(steps):
        layer(rng.standard_normal((10, 3)) * 2 + 1)
    return layer


# ----------------------------------------------------------------- errors that escaped
@pytest.mark.parametrize(
    "build",
    [
        lambda: bn.BatchNorm(3, eps=10**400),
        lambda: bn.BatchNorm(3, momentum=10**400),
        lambda: BatchRenorm(3, rmax=10**400),
        lambda: BatchRenorm(3, dmax=-(10**400)),
        lambda: bn.BatchNorm([float("inf")]),
        lambda: bn.BatchNorm(2.5),
        lambda: bn.BatchNorm(True),
        lambda: GhostBatchNorm(3, virtual_batch_size=float("inf")),
        lambda: GhostBatchNorm(3, virtual_batch_size=2.5),
        lambda: bn.BatchNorm(3, eps=float("nan")),
        lambda: bn.BatchNorm(3, axis=1.5),
        lambda: bn.BatchNorm(3, axis=np.True_),
        lambda: bn.BatchNorm(3, dtype=np.longdouble),
        lambda: bn.BatchNorm(3, dtype="int32"),
        lambda: bn.BatchNorm(3, dtype="not a dtype"),
        lambda: bn.BatchNorm(3, backend="gpu"),
    ],
)
def test_constructor_errors_are_type_or_value_errors(build):
    with pytest.raises((TypeError, ValueError)):
        build()


def test_non_native_dtype_is_stored_native():
    layer = bn.BatchNorm(3, dtype=">f8")
    assert layer.dtype == np.dtype(np.float64) and layer.running_var.dtype.isnative
    layer(np.random.default_rng(0).standard_normal((4, 3)))


@pytest.mark.parametrize("axis", [1.5, None, np.True_, "1", [], (1, 1.0)])
def test_kernel_axis_errors_say_what_is_wrong(axis, rng):
    x = rng.standard_normal((4, 3))
    with pytest.raises((TypeError, ValueError), match="axis"):
        bn.batch_norm_train(x, None, None, axis=axis)


def test_big_endian_input_is_converted(rng):
    x = rng.standard_normal((6, 3))
    big = x.astype(">f4")
    y, _ = bn.batch_norm_train(big, None, None)
    ref, _ = bn.batch_norm_train(x.astype(np.float32), None, None)
    np.testing.assert_array_equal(y, ref)
    assert y.dtype == np.float32
    layer = bn.BatchNorm(3)
    layer(big)
    assert layer.num_batches_tracked == 1


def test_masked_arrays_are_refused(rng):
    x = np.ma.masked_array(rng.standard_normal((6, 3)), mask=np.eye(6, 3, dtype=bool))
    layer = bn.BatchNorm(3)
    before = snapshot(layer)
    with pytest.raises(TypeError, match="masked"):
        layer(x)
    with pytest.raises(TypeError, match="masked"):
        bn.batch_norm_train(x, None, None)
    assert snapshot(layer) == before


def test_backward_before_forward_is_a_value_error(rng):
    for layer in [bn.BatchNorm(3), BatchRenorm(3), GhostBatchNorm(3, virtual_batch_size=2),
                  FrozenBatchNorm(3), Linear(3, 2, rng=rng), Sigmoid()]:
        with pytest.raises(bn.NoForwardError, match="before any forward") as info:
            layer.backward(np.ones((4, 3)))
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


# ----------------------------------------------------------------- rejected calls change nothing
def test_ghost_rejects_empty_batch_without_changing_state(rng):
    g = GhostBatchNorm(3, virtual_batch_size=4)
    g(rng.standard_normal((8, 3)))
    before = snapshot(g)
    with pytest.raises(ValueError, match="empty"):
        g(np.zeros((0, 3)))
    assert snapshot(g) == before
    g.backward(rng.standard_normal((8, 3)))  # the cache of the good batch is still there


def test_recalibrate_failure_keeps_the_cached_forward(rng):
    net = Sequential(Linear(5, 3, rng=rng, bias=False), bn.BatchNorm(3), Sigmoid())
    net.forward(rng.standard_normal((8, 5)), training=True)
    layer = net.modules[1]
    before = snapshot(layer)
    for bad in ([rng.standard_normal((8, 4))], [np.full((8, 5), np.nan)]):
        with pytest.raises(ValueError):
            bn.recalibrate(net, bad)
        assert snapshot(layer) == before
    dx = net.backward(rng.standard_normal((8, 3)))
    assert dx.shape == (8, 5)


@pytest.mark.parametrize("momentum", [5.0, float("nan"), -0.1, "0.1"])
def test_import_state_refuses_bad_momentum(momentum, rng):
    layer = _trained(lambda: bn.BatchNorm(3, convention="torch"), rng)
    state, cfg = bn.export_state(layer, "torch")
    target = bn.BatchNorm(3, convention="torch")
    before = snapshot(target)
    with pytest.raises((TypeError, ValueError), match="momentum"):
        bn.import_state(state, "torch", layer=target, momentum=momentum)
    assert snapshot(target) == before


def test_renorm_state_with_zero_std_is_refused_when_eps_is_zero(rng):
    layer = BatchRenorm(2, eps=0.0)
    state = layer.state_dict()
    state["running_var"] = np.zeros(2)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="running std"):
        layer.load_state_dict(state)
    assert snapshot(layer) == before


# ----------------------------------------------------------------- non-finite never stored
@pytest.mark.parametrize("dtype,scale", [(np.float16, 1000.0), (np.float32, 1e20)])
def test_recalibrate_refuses_statistics_that_overflow_the_layer_dtype(dtype, scale, rng):
    layer = bn.BatchNorm(3, dtype=dtype)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="not finite"):
        bn.recalibrate(layer, [rng.standard_normal((16, 3)).astype(dtype) * dtype(scale)])
    assert snapshot(layer) == before


def test_export_refuses_nan_eps(rng):
    layer = _trained(lambda: bn.BatchNorm(3), rng)
    with pytest.raises(ValueError, match="eps"):
        bn.export_state(layer, "torch", eps=float("nan"))


def test_momentum_and_eps_assignments_are_validated_and_recorded():
    layer = bn.BatchNorm(3)
    with pytest.raises(ValueError):
        layer.momentum = 2.0
    with pytest.raises(ValueError):
        layer.eps = -1.0
    layer.momentum = 0.5
    assert layer.config()["momentum"] == 0.5 and "momentum=0.5" in repr(layer)


# ----------------------------------------------------------------- every tool, every layer
@pytest.mark.parametrize("name", sorted(ALL_LAYERS))
def test_every_tool_accepts_every_layer(name, rng, tmp_path):
    layer = _trained(ALL_LAYERS[name], rng)
    x = rng.standard_normal((12, 3)) * 2 + 1
    layer.gamma[:] = [1.0, 2.0, 0.5]
    expected = layer.eval()(x)
    frozen = FrozenBatchNorm.from_batchnorm(layer)
    np.testing.assert_allclose(frozen(x), expected, rtol=1e-12, atol=1e-12)
    w, b = bn.fold_linear(np.eye(3), np.zeros(3), layer)
    np.testing.assert_allclose(x @ w + b, expected, rtol=1e-12, atol=1e-12)
    state, cfg = bn.export_state(layer, "torch")
    back = bn.import_state(state, "torch", eps=cfg["eps"])
    np.testing.assert_allclose(back.eval()(x), expected, rtol=1e-10, atol=1e-10)
    assert train_eval_gap(layer, x)["max_abs_mean_shift_in_std"] >= 0
    assert averaging_window(layer)["batches_tracked"] == 3
    layer.train()
    report = bn.recalibrate(layer, [x])
    assert report[0]["values_per_feature"] == 12
    np.testing.assert_allclose(layer.running_mean, x.mean(0), rtol=1e-12)
    # config and repr name the class and every constructor argument; save/load round trip
    cfg = layer.config()
    assert cfg["class"] == name and repr(layer).startswith(name + "(")
    assert {"nonfinite", "backend", "dtype"} <= set(cfg)
    layer.save(tmp_path / "layer.npz")
    info = describe_checkpoint(tmp_path / "layer.npz")
    assert info["config"] == cfg
    rebuilt = bn.NormLayer.from_config(cfg).load(tmp_path / "layer.npz")
    assert type(rebuilt) is type(layer)
    np.testing.assert_array_equal(rebuilt.eval()(x), layer.eval()(x))


def test_frozen_layer_round_trips_through_a_checkpoint(rng, tmp_path):
    frozen = FrozenBatchNorm.from_batchnorm(_trained(ALL_LAYERS["BatchNorm"], rng))
    frozen.save(tmp_path / "f.npz")
    info = describe_checkpoint(tmp_path / "f.npz")
    assert info["config"]["class"] == "FrozenBatchNorm"
    assert info["averaging_window"]["kind"] == "frozen"


def test_tools_refuse_foreign_objects_with_type_errors(rng):
    for call in (
        lambda: FrozenBatchNorm.from_batchnorm(Sigmoid()),
        lambda: bn.fold_linear(np.eye(3), None, Sigmoid()),
        lambda: bn.export_state(Sigmoid(), "torch"),
        lambda: averaging_window(Sigmoid()),
    ):
        with pytest.raises(TypeError, match="Sigmoid"):
            call()


def test_last_batch_statistics_record(rng):
    layer = bn.BatchNorm(3)
    assert layer.last_batch_stats is None
    x = rng.standard_normal((10, 3, 4))
    layer(x)
    rec = layer.last_batch_stats
    assert isinstance(rec, bn.BatchStats) and rec.count == 40
    np.testing.assert_allclose(rec.mean, x.mean((0, 2)), rtol=1e-13)
    np.testing.assert_allclose(rec.var, x.var((0, 2)), rtol=1e-12)
    layer.eval()(x)
    assert layer.last_batch_stats is rec  # evaluation does not replace it
    g = GhostBatchNorm(3, virtual_batch_size=4)
    g(x)
    assert len(g.last_batch_stats.parts) == 3 and g.last_batch_stats.count == 40
    np.testing.assert_allclose(g.last_batch_stats.var, x.var((0, 2)), rtol=1e-12)


# ----------------------------------------------------------------- copies and threads
def test_layers_deepcopy(rng):
    layer = _trained(ALL_LAYERS["BatchNorm"], rng)
    twin = copy.deepcopy(layer)
    x = rng.standard_normal((6, 3))
    np.testing.assert_array_equal(twin(x), layer(x))
    np.testing.assert_array_equal(twin.running_mean, layer.running_mean)


def test_concurrent_training_forwards_lose_no_update(rng):
    """The running update is atomic: 4 threads x 50 forwards count 200 batches, and with a
    cumulative average (momentum=None) the running mean is the mean of all batch means."""
    layer = bn.BatchNorm(64, momentum=None, backend="numpy")
    batches = [rng.standard_normal((32, 64)) + i for i in range(200)]

    def work(part):
        for x in part:
            layer(x)

    threads = [threading.Thread(target=work, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert layer.num_batches_tracked == 200
    expected = np.mean([x.mean(0) for x in batches], axis=0)
    np.testing.assert_allclose(layer.running_mean, expected, rtol=1e-10)
