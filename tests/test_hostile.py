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
from batchnorm.variants import ghost_slices

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
    for layer in [
        bn.BatchNorm(3),
        BatchRenorm(3),
        GhostBatchNorm(3, virtual_batch_size=2),
        FrozenBatchNorm(3),
        Linear(3, 2, rng=rng),
        Sigmoid(),
    ]:
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


def test_renorm_needs_positive_eps_so_its_running_std_stays_positive(rng):
    """With eps = 0 a dead channel made the running std 0: a state it then refused."""
    with pytest.raises(ValueError, match="eps > 0"):
        BatchRenorm(2, eps=0.0)
    layer = BatchRenorm(2, momentum=None)
    layer(np.column_stack([np.zeros(4), np.arange(4.0)]))  # a dead channel
    before = snapshot(layer)
    with pytest.raises(ValueError, match="eps > 0"):
        layer.eps = 0.0
    assert snapshot(layer) == before
    layer.load_state_dict(layer.state_dict())
    layer(rng.standard_normal((4, 2)))  # still trains
    assert np.all(layer.running_std > 0)


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


# ----------------------------------------------------------------- found by the hostile probe
def test_recalibrate_is_all_or_nothing_across_layers(rng):
    """A later layer refusing its new state must not leave earlier layers changed."""
    a, b = bn.BatchNorm(2), bn.BatchNorm(2, dtype=np.float16)
    model = Sequential(a, Linear(2, 2, rng=rng), b)
    model.forward(rng.standard_normal((8, 2)), training=True)
    model.modules[1].W[:] = [[1e3, 0.0], [0.0, 1e3]]
    before = [snapshot(a), snapshot(b)]
    with pytest.raises(ValueError):  # b's statistics overflow float16
        bn.recalibrate(model, [rng.standard_normal((8, 2)) * 100])
    assert [snapshot(a), snapshot(b)] == before


def test_recording_keeps_updates_and_other_threads_out():
    layer = bn.BatchNorm(2)
    x = np.arange(16.0).reshape(8, 2)
    with layer.recording() as rec:
        layer(x)  # update_stats=True: the running statistics still move
        done = threading.Event()
        t = threading.Thread(target=lambda: (layer(x + 100), done.set()))
        t.start()
        t.join()
    assert done.is_set() and layer.num_batches_tracked == 2
    assert len(rec) == 1  # only this thread's forward was recorded
    np.testing.assert_allclose(layer.last_batch_stats.mean, (x + 100).mean(0))


def test_deepcopy_inside_recording_starts_clean():
    layer = bn.BatchNorm(2)
    x = np.arange(16.0).reshape(8, 2)
    with layer.recording():
        twin = copy.deepcopy(layer)
    twin(x)
    twin.backward(np.ones_like(x))
    assert twin.num_batches_tracked == 1


def test_import_state_refuses_foreign_layers_and_keeps_cumulative_momentum(rng):
    src = bn.BatchNorm(2, convention="torch", momentum=None)
    src(rng.standard_normal((6, 2)))
    state, cfg = bn.export_state(src, "torch")
    assert cfg["momentum"] is None
    assert bn.import_state(state, "torch", momentum=cfg["momentum"]).momentum is None
    with pytest.raises(TypeError, match="norm layer"):
        bn.import_state(state, "torch", layer="foo")
    with pytest.raises(TypeError, match="dict"):
        bn.import_state(None, "torch")
    with pytest.raises(ValueError, match="framework"):
        bn.export_state(src, ["torch"])


def test_reassigned_arguments_are_validated_and_recorded(rng):
    g = GhostBatchNorm(3, virtual_batch_size=2)
    g.virtual_batch_size = 4
    assert bn.NormLayer.from_config(g.config()).virtual_batch_size == 4
    with pytest.raises(TypeError):
        g.virtual_batch_size = 2.5
    r = BatchRenorm(3)
    r.rmax, r.dmax = 1.0, 0.0
    assert r.config()["rmax"] == 1.0 and r.limits() == (1.0, 0.0)
    with pytest.raises(ValueError):
        r.rmax = 0.5
    n = bn.BatchNorm(3)
    n.unbiased = True
    assert n.config()["unbiased"] is True
    with pytest.raises(TypeError):
        n.unbiased = "yes"
    for fixed in ("affine", "axis", "dtype", "track_running_stats"):
        with pytest.raises(AttributeError, match="fixed at construction"):
            setattr(n, fixed, getattr(n, fixed))
    with pytest.raises(TypeError, match="training"):
        n(rng.standard_normal((4, 3)), training="False")
    with pytest.raises(TypeError, match="update_stats"):
        n(rng.standard_normal((4, 3)), update_stats="no")
    assert n.num_batches_tracked == 0


@pytest.mark.parametrize(
    "weight,fold",
    [
        (np.ones(3), "linear"),
        (np.float64(2.0), "linear"),
        (None, "linear"),
        (np.ones((2, 3, 3)), "linear"),
        (np.ones(3), "conv"),
        (np.ones((3, 2)), "conv"),
    ],
)
def test_fold_refuses_weights_of_the_wrong_rank(weight, fold, rng):
    layer = _trained(ALL_LAYERS["BatchNorm"], rng)
    call = bn.fold_linear if fold == "linear" else bn.fold_conv
    with pytest.raises((TypeError, ValueError), match="weight"):
        call(weight, None, layer)


def test_huge_feature_counts_are_refused_before_allocating():
    with pytest.raises(ValueError, match="features"):
        bn.BatchNorm(10**13)
    with pytest.raises(ValueError, match="features"):
        bn.NormLayer.from_config({"class": "BatchNorm", "num_features": [10**13]})


def test_tensors_that_need_grad_give_a_type_error():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(TypeError, match="requires grad.*detach"):
        bn.BatchNorm(3)(x)


def test_update_running_validates_its_inputs():
    running = bn.RunningStats(np.zeros(2), np.ones(2), 0)
    batch = bn.BatchStats(4, np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    for kwargs in (
        {"momentum": 2.0, "momentum_weights": "new"},
        {"momentum": float("nan"), "momentum_weights": "new"},
        {"momentum": 0.1, "momentum_weights": "foo"},
        {"momentum": 0.1, "momentum_weights": "new", "smooth": "bar"},
    ):
        with pytest.raises(ValueError):
            bn.update_running(running, batch, **kwargs)
    with pytest.raises(ValueError, match=">= 0"):
        bn.update_running(
            running, bn.BatchStats(4, np.ones(2), -np.ones(2)), momentum=0.5, momentum_weights="new"
        )
    with pytest.raises(TypeError):
        bn.update_running(None, batch, momentum=0.1, momentum_weights="new")


def test_custom_conventions_are_validated_and_round_trip(tmp_path):
    mine = bn.Convention("mine", "new", 0.2, 1e-4, True, 1)
    layer = bn.BatchNorm(3, convention=mine)
    layer.save(tmp_path / "c.npz")
    back = bn.NormLayer.from_config(layer.config())
    assert back.convention == mine and back.momentum == 0.2
    state, cfg = bn.export_state(layer, "keras")
    assert cfg["momentum"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="momentum_weights"):
        bn.Convention("odd", "sideways", 0.3, 1e-5, False, 1)


def test_ghost_merges_only_a_remainder_without_variance(rng):
    assert ghost_slices(4, 1, values_per_sample=5) == [slice(i, i + 1) for i in range(4)]
    g = GhostBatchNorm(3, virtual_batch_size=1)
    g(rng.standard_normal((4, 3, 5)))
    assert [p.count for p in g.last_batch_stats.parts] == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="virtual_batch_size=1"):
        g(np.ones((5, 3)))
    with pytest.raises(ValueError, match="axis 0"):
        GhostBatchNorm(3, virtual_batch_size=2, axis=0)


def test_renorm_schedule_is_validated_at_construction():
    with pytest.raises(ValueError, match="rmax"):
        bn.RenormSchedule(rmax=0.5, warmup_steps=0, rmax_steps=1)
    with pytest.raises(ValueError):
        bn.RenormSchedule(warmup_steps=-1)


def test_num_batches_tracked_beyond_int64_is_refused():
    layer = bn.BatchNorm(2)
    state = layer.state_dict()
    state["num_batches_tracked"] = np.uint64(2**64 - 1)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        layer.load_state_dict(state)


def test_from_config_of_another_class_says_so():
    cfg = bn.FrozenBatchNorm(3).config()
    with pytest.raises(ValueError, match="not a BatchNorm"):
        bn.BatchNorm.from_config(cfg)


# ----------------------------------------------------------------- batchnorm inspect
def test_inspect_json_is_strict_json_for_every_layer(rng, tmp_path, capsys):
    import json

    from batchnorm_demo.cli import main

    frozen = FrozenBatchNorm.from_batchnorm(_trained(ALL_LAYERS["BatchNorm"], rng))
    frozen.save(tmp_path / "f.npz")  # its averaging window is infinite
    one = bn.BatchNorm(3)
    one(rng.standard_normal((4, 3)))
    one.save(tmp_path / "one.npz")
    np.save(tmp_path / "single.npy", rng.standard_normal((1, 3)))
    assert main(["inspect", str(tmp_path / "f.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # strict: no Infinity
    assert info["averaging_window"]["effective_batches"] == "inf"
    assert (
        main(
            [
                "inspect",
                str(tmp_path / "one.npz"),
                "--batch",
                str(tmp_path / "single.npy"),
                "--json",
            ]
        )
        == 0
    )
    json.loads(capsys.readouterr().out)
    for path in (tmp_path / "f.npz", tmp_path / "one.npz"):
        assert main(["inspect", str(path)]) == 0
        assert type(bn.diagnostics.layer_from_checkpoint(path)).__name__ in capsys.readouterr().out


def test_inspect_refuses_bad_files_with_exit_code_2(rng, tmp_path, capsys):
    from batchnorm_demo.cli import main

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    layer = _trained(ALL_LAYERS["BatchNorm"], rng)
    layer.save(tmp_path / "bn.npz")
    np.savez(tmp_path / "two.npz", a=np.ones((2, 3)))
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert main(["inspect", str(tmp_path)]) == 2  # a folder
    assert main(["inspect", str(tmp_path / "bn.npz"), "--batch", str(tmp_path / "two.npz")]) == 2
    err = capsys.readouterr().err
    assert "allow_pickle" not in err and "error" in err


def test_reused_buffers_are_per_thread(rng):
    """Found by the second probe: threads sharing a reuse_buffers layer overwrote each other."""
    xs = [np.random.default_rng(i).standard_normal((16, 8, 8, 8)) for i in range(4)]
    layer = bn.BatchNorm(8, reuse_buffers=True).eval()
    want = [layer(x).copy() for x in xs]
    wrong = []

    def work(i):
        for _ in range(20):
            if not np.array_equal(layer(xs[i]), want[i]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_tiny_float32_data_keep_their_variance(backend):
    x = (np.random.default_rng(0).standard_normal((64, 3)) * 1e-25).astype(np.float32)
    ref = x.astype(np.float64).var(0)
    _, var = bn.moments(x, backend=backend)
    np.testing.assert_allclose(var, ref, rtol=1e-6)
    y, _ = bn.batch_norm_train(x, None, None, eps=0.0, backend=backend)
    x64 = x.astype(np.float64)
    y_ref = (x64 - x64.mean(0)) / np.sqrt(ref)
    assert np.all(np.isfinite(y)) and np.max(np.abs(y - y_ref)) < 1e-5


def test_ghost_backward_refuses_a_masked_dy():
    layer = bn.GhostBatchNorm(3, virtual_batch_size=4)
    x = np.random.default_rng(0).normal(size=(8, 3))
    layer.forward(x)
    with pytest.raises(TypeError, match="masked"):
        layer.backward(np.ma.masked_array(np.ones((8, 3)), mask=np.zeros((8, 3), bool)))


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("gamma", np.ones(2), ValueError),  # the numba kernels once read past its end
        ("beta", np.zeros(7), ValueError),
        ("gamma", np.ones(5, complex), TypeError),
        ("gamma", [1, 2, 3, 4, 5], TypeError),
        ("running_var", -np.ones(5), ValueError),
        ("running_mean", np.full(5, np.nan), ValueError),
        ("num_batches_tracked", 2.5, TypeError),
        ("num_batches_tracked", -3, ValueError),
        ("skipped_updates", "x", TypeError),
        ("feature_shape", (4,), AttributeError),
        ("training", "False", TypeError),
    ],
)
def test_reassigned_state_attributes_are_checked_and_change_nothing(name, value, error):
    layer = bn.BatchNorm(5)
    x = np.random.default_rng(0).normal(size=(8, 5))
    layer.forward(x)
    before = {k: np.asarray(v).copy() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=name):
        setattr(layer, name, value)
    after = layer.state_dict()
    assert all(np.array_equal(before[k], np.asarray(after[k])) for k in before)
    assert layer.training is True
    layer.gamma = np.full(5, 2.0, np.float32)  # a valid one is stored in the layer's dtype
    assert layer.gamma.dtype == np.float64 and np.all(layer.gamma == 2.0)


def test_train_mode_flags_must_be_bools():
    from batchnorm.nn import Linear, Sequential

    for module in (bn.BatchNorm(3), Sequential(Linear(3, 3, rng=np.random.default_rng(0)))):
        with pytest.raises(TypeError, match="True or False"):
            module.train("no")
        assert module.training is True


def test_accuracy_refuses_labels_that_would_broadcast():
    from batchnorm.nn import accuracy

    assert accuracy(np.eye(4), np.arange(4)) == 1.0
    for labels in (np.arange(4).reshape(4, 1), np.array([0])):
        with pytest.raises(ValueError, match="labels of shape"):
            accuracy(np.eye(4), labels)


def test_sgd_and_linear_backward_change_nothing_when_they_refuse():
    from batchnorm.nn import SGD, Linear

    lin = Linear(3, 2, rng=np.random.default_rng(0))
    lin.forward(np.ones((4, 3)))
    dw0 = lin.dW.copy()
    with pytest.raises(ValueError, match="dy has shape"):
        lin.backward(np.ones((4, 5)))
    np.testing.assert_array_equal(lin.dW, dw0)
    lin.backward(np.ones((4, 2)))
    lin.dW = np.ones((5, 5))  # a broken gradient: refused before W changes
    w = lin.W.copy()
    with pytest.raises(ValueError, match="gradient of 'W'"):
        SGD(lin, 0.1).step()
    np.testing.assert_array_equal(lin.W, w)


def test_renorm_eval_and_update_running_check_their_statistics():
    x = np.random.default_rng(0).normal(size=(8, 3))
    with pytest.raises(ValueError, match="running_std must be > 0"):
        bn.batch_renorm_eval(x, None, None, np.zeros(3), -np.ones(3))
    batch = bn.BatchStats(4, np.zeros(3), np.ones(3))
    for running, match in (
        (bn.RunningStats(np.zeros(3), -np.ones(3), 0), "running.var must be >= 0"),
        (bn.RunningStats(np.zeros(3, int), np.ones(3, int), 0), "floating"),
        (bn.RunningStats(np.zeros(3), np.ones(3), 2.5), "num_batches_tracked"),
    ):
        with pytest.raises((TypeError, ValueError), match=match):
            bn.update_running(running, batch, momentum=0.1, momentum_weights="new")


def test_a_checkpoint_of_another_layer_class_is_refused(tmp_path):
    bn.BatchNorm(3).save(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="holds a 'BatchNorm' layer"):
        bn.BatchRenorm(3).load(tmp_path / "a.npz")


def test_shard_helpers_check_their_arguments():
    from batchnorm import distributed

    with pytest.raises(TypeError):
        distributed.shard_bounds(10.0, 2, 0)
    with pytest.raises(TypeError, match="communicator"):
        distributed.shard(np.ones((4, 2)), None)


def test_masks_non_finite_and_complex_values_are_refused_by_the_tools():
    layer = bn.BatchNorm(3)
    masked = np.ma.masked_array(np.ones(3), mask=[False, True, False])
    sd = layer.state_dict()
    sd["gamma"] = masked
    with pytest.raises(TypeError, match="masked"):
        layer.load_state_dict(sd)
    with pytest.raises(TypeError, match="masked"):
        bn.fold_linear(np.ma.masked_array(np.ones((2, 3))), None, layer)
    with pytest.raises(TypeError, match="bias"):
        bn.fold_linear(np.ones((2, 3)), np.ones(3, complex), layer)
    with pytest.raises(ValueError, match="non-finite"):
        bn.fold_linear(np.full((2, 3), np.nan), None, layer)


def test_presets_cannot_be_changed_and_axes_cannot_repeat():
    with pytest.raises(TypeError):
        bn.CONVENTIONS["junk"] = 5
    with pytest.raises(ValueError, match="twice"):
        bn.BatchNorm((3, 4), axis=(1, 1))


def test_gradcheck_checks_its_step_and_inputs():
    from batchnorm.gradcheck import numerical_gradient

    f = lambda v: v * 2  # noqa: E731
    for h in (0, -1e-5, float("nan")):
        with pytest.raises(ValueError):
            numerical_gradient(f, np.ones(3), np.ones(3), h)
    with pytest.raises(TypeError, match="real"):
        numerical_gradient(f, np.ones(3, complex), np.ones(3))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_eps_zero_with_underflowing_variance_is_refused_not_inf(backend):
    rng = np.random.default_rng(0)
    for x in (rng.normal(size=(8, 3)) * 1e-170, (rng.normal(size=(8, 3)) * 1e-40).astype("f4")):
        with pytest.raises(ValueError, match="eps"):
            bn.batch_norm_train(x, None, None, eps=0.0, backend=backend)
    x = rng.normal(size=(8, 3))
    x[0, 1] = np.nan  # NaN data still propagate silently
    y, _ = bn.batch_norm_train(x, None, None, eps=0.0, backend=backend)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, 0]).all()
