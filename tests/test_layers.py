"""Tests of the stateful BatchNorm layer: presets, running statistics, torch parity, state."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import ref_eval, ref_train, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm.gradcheck import numerical_gradient, relative_error

pytestmark = pytest.mark.usefixtures("backend")


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize(
    "name,momentum,eps,unbiased,axis",
    [
        ("seed", 0.9, 1e-5, False, 1),
        ("torch", 0.1, 1e-5, True, 1),
        ("keras", 0.99, 1e-3, False, -1),
        ("flax", 0.99, 1e-5, False, -1),
    ],
)
def test_preset_defaults(name, momentum, eps, unbiased, axis):
    layer = bn.BatchNorm(4, convention=name)
    assert (layer.momentum, layer.eps, layer.unbiased, layer.axis) == (
        momentum,
        eps,
        unbiased,
        axis,
    )
    np.testing.assert_array_equal(layer.gamma, np.ones(4))
    np.testing.assert_array_equal(layer.beta, np.zeros(4))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(4))
    np.testing.assert_array_equal(layer.running_var, np.ones(4))
    for arr in (layer.gamma, layer.beta, layer.running_mean, layer.running_var):
        assert arr.dtype == np.float64
    assert layer.num_batches_tracked == 0 and layer.training is True


def test_explicit_arguments_override_preset():
    layer = bn.BatchNorm(3, convention="keras", axis=1, momentum=0.5, eps=0.1, unbiased=True)
    assert (layer.axis, layer.momentum, layer.eps, layer.unbiased) == (1, 0.5, 0.1, True)
    layer = bn.BatchNorm(3, convention="torch", momentum=None)
    assert layer.momentum is None


def test_modes_return_layer():
    layer = bn.BatchNorm(2)
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False).training is False


def _batches(rng, n_steps, shape=(6, 3), offset=2.0):
    return [rng.standard_normal(shape) * (1 + i) + offset * i for i in range(n_steps)]


# momentum is the weight of the old value in seed/keras/flax and of the new value in torch
@pytest.mark.parametrize(
    "name,old_weight", [("seed", 0.9), ("torch", 0.9), ("keras", 0.99), ("flax", 0.99)]
)
def test_running_stats_hand_derived(rng, name, old_weight):
    axis = 1
    layer = bn.BatchNorm(3, convention=name, axis=axis)
    rm, rv = np.zeros(3), np.ones(3)
    for x in _batches(rng, 3):
        layer(x)
        m = x.shape[0]
        var = x.var(0) * (m / (m - 1) if name == "torch" else 1.0)
        rm = old_weight * rm + (1 - old_weight) * x.mean(0)
        rv = old_weight * rv + (1 - old_weight) * var
    np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, rv, rtol=1e-13)
    assert layer.num_batches_tracked == 3


@pytest.mark.parametrize("name", ["seed", "torch", "keras", "flax"])
def test_momentum_none_is_cumulative_average(rng, name):
    layer = bn.BatchNorm(3, convention=name, axis=1, momentum=None)
    batches = _batches(rng, 4)
    for x in batches:
        layer(x)
    unb = (6 / 5) if name == "torch" else 1.0
    np.testing.assert_allclose(
        layer.running_mean, np.mean([b.mean(0) for b in batches], 0), rtol=1e-13
    )
    np.testing.assert_allclose(
        layer.running_var, np.mean([b.var(0) * unb for b in batches], 0), rtol=1e-13
    )


def test_seed_article_formula_explicitly(rng):
    """The article: running = momentum * running + (1 - momentum) * batch, momentum 0.9."""
    layer = bn.BatchNorm(2)
    x = rng.standard_normal((10, 2)) + 3
    layer(x)
    np.testing.assert_allclose(layer.running_mean, 0.9 * 0 + 0.1 * x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(layer.running_var, 0.9 * 1 + 0.1 * x.var(0), rtol=1e-14)


def test_eval_uses_running_stats_and_changes_nothing(rng):
    layer = bn.BatchNorm(3, eps=1e-3)
    for x in _batches(rng, 3):
        layer(x)
    layer.gamma[:] = [1.0, 2.0, -1.0]
    layer.beta[:] = [0.0, 0.5, 1.0]
    layer.eval()
    before = snapshot(layer)
    x = rng.standard_normal((5, 3))
    y = layer(x)
    np.testing.assert_allclose(
        y,
        ref_eval(x, layer.gamma, layer.beta, layer.running_mean, layer.running_var, 1, 1e-3),
        atol=1e-13,
    )
    after = snapshot(layer)
    after.pop("_cache"), before.pop("_cache")
    assert after == before
    # training=False on a training layer does the same for one call
    layer.train()
    y2 = layer(x, training=False)
    np.testing.assert_array_equal(y, y2)
    assert layer.num_batches_tracked == 3


def test_keras_layer_channels_last(rng):
    layer = bn.BatchNorm(4, convention="keras")
    x = rng.standard_normal((3, 5, 5, 4)) + 1
    y = layer(x)
    np.testing.assert_allclose(y, ref_train(x, None, None, -1, 1e-3), atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, 0.01 * x.mean((0, 1, 2)), rtol=1e-13)


def test_backward_train_and_eval_gradcheck(rng):
    layer = bn.BatchNorm(3)
    layer.gamma[:] = rng.standard_normal(3)
    layer.beta[:] = rng.standard_normal(3)
    x = 5 * rng.standard_normal((6, 3, 2)) + 12
    dy = rng.standard_normal(x.shape)
    layer(x)
    dx = layer.backward(dy)
    num = numerical_gradient(lambda t: layer.forward(t, training=True), x, dy)
    assert relative_error(dx, num) < 1e-7
    np.testing.assert_allclose(layer.dbeta, dy.sum((0, 2)), rtol=1e-13)
    layer.eval()
    layer(x)
    dx = layer.backward(dy)
    num = numerical_gradient(layer.forward, x, dy)
    assert relative_error(dx, num) < 1e-7
    np.testing.assert_allclose(
        dx, dy * (layer.gamma / np.sqrt(layer.running_var + 1e-5))[:, None], rtol=1e-13
    )


def test_affine_false_and_no_tracking(rng):
    layer = bn.BatchNorm(3, affine=False)
    assert layer.gamma is None and layer.beta is None
    x = rng.standard_normal((8, 3))
    layer(x)
    layer.backward(rng.standard_normal(x.shape))
    assert layer.dgamma is None and layer.dbeta is None
    assert layer.parameters() == {}

    layer = bn.BatchNorm(3, track_running_stats=False).eval()
    assert layer.running_mean is None and layer.running_var is None
    y = layer(x)
    np.testing.assert_allclose(y, ref_train(x, None, None, 1, 1e-5), atol=1e-13)
    assert layer.num_batches_tracked == 0
    assert "running_mean" not in layer.state_dict()


# ----------------------------------------------------------------------------- torch parity
@pytest.mark.parametrize("shape", [(10, 4), (6, 4, 5), (4, 4, 3, 5), (3, 4, 2, 3, 2)])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_torch_convention_matches_torch(rng, shape, momentum):
    torch = pytest.importorskip("torch")
    cls = {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }[len(shape)]
    ref = cls(shape[1], momentum=momentum).double()
    layer = bn.BatchNorm(shape[1], convention="torch", momentum=momentum)
    with torch.no_grad():
        g, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
        ref.weight.copy_(torch.tensor(g))
        ref.bias.copy_(torch.tensor(b))
    layer.gamma[:], layer.beta[:] = g, b
    for step in range(4):
        x = rng.standard_normal(shape) * (step + 1) + 3 * step
        dy = rng.standard_normal(shape)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        ref.zero_grad()
        yt.backward(torch.tensor(dy))
        y = layer(x)
        dx = layer.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-11)
        np.testing.assert_allclose(layer.dgamma, ref.weight.grad.numpy(), atol=1e-10)
        np.testing.assert_allclose(layer.dbeta, ref.bias.grad.numpy(), atol=1e-10)
        np.testing.assert_allclose(layer.running_mean, ref.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(layer.running_var, ref.running_var.numpy(), rtol=1e-12)
        assert layer.num_batches_tracked == int(ref.num_batches_tracked)
    ref.eval(), layer.eval()
    x = rng.standard_normal(shape) + 1
    dy = rng.standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer(x), yt.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), atol=1e-12)


def test_torch_parity_float32_input(rng):
    torch = pytest.importorskip("torch")
    ref = torch.nn.BatchNorm2d(3)
    layer = bn.BatchNorm(3, convention="torch")
    for _ in range(3):
        x = (rng.standard_normal((4, 3, 5, 5)) + 2).astype(np.float32)
        y = layer(x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, ref(torch.tensor(x)).detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(layer.running_var, ref.running_var.numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------- bad input
def _trained_layer(rng, **kw):
    layer = bn.BatchNorm(3, **kw)
    for x in _batches(rng, 2):
        layer(x)
    layer.backward(rng.standard_normal((6, 3)))
    return layer


BAD_CALLS = [
    (lambda: np.arange(6).reshape(2, 3), TypeError, "int64"),
    (lambda: np.ones((2, 3), bool), TypeError, "bool"),
    (lambda: np.ones((2, 3), complex), TypeError, "complex"),
    (lambda: np.ones(3), ValueError, r"\(3,\)"),
    (lambda: np.ones((4, 5)), ValueError, r"\(4, 5\).*num_features=\(3,\)"),
    (lambda: np.ones((1, 3)), ValueError, "more than 1 value per feature"),
    (lambda: np.ones((0, 3)), ValueError, "more than 1 value"),
    (lambda: np.array([[1.0, np.nan, 2.0], [2.0, 1.0, 0.0]]), ValueError, "non-finite"),
    (lambda: np.array([[1.0, np.inf, 2.0], [2.0, 1.0, 0.0]]), ValueError, "non-finite"),
]


@pytest.mark.parametrize("make_x,exc,match", BAD_CALLS)
def test_bad_input_leaves_state_bit_identical(rng, make_x, exc, match):
    layer = _trained_layer(rng)
    before = snapshot(layer)
    with pytest.raises(exc, match=match):
        layer(make_x())
    assert snapshot(layer) == before


def test_axis_out_of_range_leaves_state(rng):
    layer = bn.BatchNorm(3, axis=3)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="out of range"):
        layer(np.ones((4, 3)))
    assert snapshot(layer) == before


def test_backward_errors_leave_state(rng):
    layer = _trained_layer(rng)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"dy has shape \(5, 3\).*\(6, 3\)"):
        layer.backward(np.ones((5, 3)))
    with pytest.raises(TypeError, match="int64"):
        layer.backward(np.ones((6, 3), dtype=np.int64))
    assert snapshot(layer) == before
    with pytest.raises(RuntimeError, match="before any forward"):
        bn.BatchNorm(3).backward(np.ones((6, 3)))


def test_nonfinite_skip_option(rng):
    layer = _trained_layer(rng, nonfinite="skip")
    rm, rv, nbt = layer.running_mean.copy(), layer.running_var.copy(), layer.num_batches_tracked
    x = rng.standard_normal((4, 3))
    x[1, 2] = np.inf
    y = layer(x)
    assert not np.isfinite(y[:, 2]).any()
    np.testing.assert_array_equal(layer.running_mean, rm)
    np.testing.assert_array_equal(layer.running_var, rv)
    assert layer.num_batches_tracked == nbt and layer.skipped_updates == 1


def test_float16_overflowing_statistics_rejected(rng):
    layer = bn.BatchNorm(2, dtype=np.float16)
    x = np.array([[6e4, 1.0], [-6e4, 2.0]], dtype=np.float16)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="overflow"):
        layer(x)  # variance 3.6e9 does not fit the float16 running statistics
    assert snapshot(layer) == before


def test_constructor_validation():
    with pytest.raises(ValueError, match="unknown convention 'pytorch'"):
        bn.BatchNorm(3, convention="pytorch")
    with pytest.raises(ValueError, match="momentum"):
        bn.BatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="num_features"):
        bn.BatchNorm(0)
    with pytest.raises(ValueError, match="feature axes"):
        bn.BatchNorm(3, axis=(1, 2))
    with pytest.raises(ValueError, match="eps"):
        bn.BatchNorm(3, eps=-1)


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip(rng):
    layer = _trained_layer(rng)
    state = layer.state_dict()
    assert set(state) == {"gamma", "beta", "running_mean", "running_var", "num_batches_tracked"}
    assert isinstance(state["num_batches_tracked"], int)
    assert all(isinstance(v, np.ndarray) for k, v in state.items() if k != "num_batches_tracked")
    state["running_mean"][0] = 123.0  # a copy: the layer is unaffected
    assert layer.running_mean[0] != 123.0
    other = bn.BatchNorm(3).load_state_dict(layer.state_dict())
    assert snapshot(other)["running_var"] == snapshot(layer)["running_var"]
    assert other.num_batches_tracked == layer.num_batches_tracked


def _corrupt(state, key, value):
    s = dict(state)
    if value is KeyError:
        del s[key]
    else:
        s[key] = value
    return s


@pytest.mark.parametrize(
    "key,value,exc,match",
    [
        ("gamma", KeyError, ValueError, r"missing \['gamma'\]"),
        ("extra", np.ones(3), ValueError, r"unexpected \['extra'\]"),
        ("beta", np.ones(4), ValueError, r"shape \(4,\).*\(3,\)"),
        ("running_mean", np.arange(3), TypeError, "int64"),
        ("running_mean", np.array([0.0, np.nan, 0.0]), ValueError, "non-finite"),
        ("running_var", np.array([1.0, -0.5, 1.0]), ValueError, "negative"),
        ("num_batches_tracked", -1, ValueError, "non-negative integer"),
        ("num_batches_tracked", 2.5, ValueError, "non-negative integer"),
    ],
)
def test_load_state_dict_rejects_and_changes_nothing(rng, key, value, exc, match):
    layer = _trained_layer(rng)
    good = layer.state_dict()
    target = _trained_layer(np.random.default_rng(99))
    before = snapshot(target)
    with pytest.raises(exc, match=match):
        target.load_state_dict(_corrupt(good, key, value))
    assert snapshot(target) == before


def test_save_load_file(rng, tmp_path):
    layer = _trained_layer(rng)
    path = tmp_path / "bn.npz"
    layer.save(path)
    assert sorted(os.listdir(tmp_path)) == ["bn.npz"]  # no temporary file left behind
    other = bn.BatchNorm(3).load(path)
    for k in ("gamma", "beta", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(other, k), getattr(layer, k))
    assert other.num_batches_tracked == layer.num_batches_tracked


def test_load_rejects_bad_files_and_changes_nothing(rng, tmp_path):
    layer = _trained_layer(rng)
    path = tmp_path / "bn.npz"
    layer.save(path)
    target = bn.BatchNorm(3)
    before = snapshot(target)
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable npz"):
        target.load(tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable npz"):
        target.load(tmp_path / "junk.npz")
    # an object array would need pickle to load: refused
    np.savez(tmp_path / "obj.npz", gamma=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        target.load(tmp_path / "obj.npz")
    bn.BatchNorm(4).save(tmp_path / "four.npz")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        target.load(tmp_path / "four.npz")
    assert snapshot(target) == before


def test_repr_mentions_configuration():
    text = repr(bn.BatchNorm(8, convention="torch", momentum=None))
    assert "convention='torch'" in text and "momentum=None" in text


def test_tuple_feature_axes_layer(rng):
    layer = bn.BatchNorm((3, 4), axis=(1, 2), momentum=None)
    x = rng.standard_normal((6, 3, 4, 5)) * 2 + 1
    y = layer(x)
    np.testing.assert_allclose(y, ref_train(x, None, None, (1, 2), 1e-5), atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, x.mean((0, 3)), rtol=1e-13)
    assert layer.running_var.shape == (3, 4)
    dx = layer.backward(rng.standard_normal(x.shape))
    assert dx.shape == x.shape and layer.dgamma.shape == (3, 4)
    with pytest.raises(ValueError, match=r"\(3, 5\) features"):
        layer(rng.standard_normal((6, 3, 5, 5)))


@settings(max_examples=60, deadline=None)
@given(
    convention=st.sampled_from(["seed", "torch", "keras", "flax"]),
    momentum=st.sampled_from(["default", None, 0.5]),
    ops=st.lists(
        st.sampled_from(["good", "nan", "one_row", "wrong_c", "int", "eval", "back"]),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_call_sequences_keep_state_consistent(convention, momentum, ops, seed):
    """Interleave good and bad calls: bad ones change nothing, good ones follow the formula."""
    rng = np.random.default_rng(seed)
    kw = {} if momentum == "default" else {"momentum": momentum}
    layer = bn.BatchNorm(3, convention=convention, axis=1, **kw)
    conv = bn.get_convention(convention)
    rm, rv, t = np.zeros(3), np.ones(3), 0
    for op in ops:
        before = snapshot(layer)
        x = rng.standard_normal((5, 3)) * 2 + 1
        if op == "good":
            layer.train()(x)
            t += 1
            w = (
                1 / t
                if layer.momentum is None
                else (layer.momentum if conv.momentum_weights == "new" else 1 - layer.momentum)
            )
            var = x.var(0) * (5 / 4 if layer.unbiased else 1)
            rm, rv = (1 - w) * rm + w * x.mean(0), (1 - w) * rv + w * var
        elif op == "eval":
            y = layer.eval()(x)
            np.testing.assert_allclose(
                y, ref_eval(x, layer.gamma, layer.beta, rm, rv, 1, layer.eps), atol=1e-12
            )
            layer.train()
        elif op == "back":
            if layer._cache is not None:
                layer.backward(rng.standard_normal(layer._cache.x.shape))
        else:
            bad = {
                "nan": np.where(np.arange(15).reshape(5, 3) == 4, np.nan, x),
                "one_row": x[:1],
                "wrong_c": rng.standard_normal((5, 4)),
                "int": np.ones((5, 3), dtype=np.int32),
            }[op]
            with pytest.raises((ValueError, TypeError)):
                layer(bad, training=True)
            assert snapshot(layer) == before
        np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(layer.running_var, rv, rtol=1e-12)
        assert layer.num_batches_tracked == t
