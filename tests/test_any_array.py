"""The public kernels and the layers with arrays of every namespace: results in the input's
library, device and dtype, agreeing with NumPy; state kept in the layer's namespace; clear
refusals (mixed libraries, integer or grad-requiring tensors, out=) that change nothing."""

from __future__ import annotations

import numpy as np
import pytest
from namespaces import Case, _namespace, namespace_param

import batchnorm as bn
from batchnorm import _xp

CASES = ["strict", "strict-device1", "torch", "jax", "jax-x64"]


@pytest.fixture(params=[namespace_param(n) for n in CASES])
def case(request):
    with _namespace(request.param) as (xp, device):
        dt = "float64" if _xp.stats_dtype(xp, device) == xp.float64 else "float32"
        yield Case(request.param, xp, device, dt)


def _same_kind(case: Case, a) -> None:
    assert _xp.namespace(a).__name__ == case.xp.__name__
    assert _xp.same_device_obj(_xp.device(a), case.device)


def _data(shape=(32, 4, 3), offset=3.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(offset, 2.0, shape), rng.normal(size=shape[1]), rng.normal(size=shape[1])


def test_kernels_agree_with_numpy_and_keep_the_array_kind(case):
    x, g, b = _data()
    xa, ga, ba = case.arr(x), case.arr(g), case.arr(b)
    x_before = case.np(xa).copy()
    y, cache = bn.batch_norm_train(xa, ga, ba, axis=1)
    _same_kind(case, y)
    assert y.dtype == xa.dtype and tuple(y.shape) == x.shape
    y_ref, c_ref = bn.batch_norm_train(case.np(xa), case.np(ga), case.np(ba), axis=1)
    case.close(y, y_ref, what="train y")
    dy = np.random.default_rng(1).normal(size=x.shape)
    dx, dg, db = bn.batch_norm_backward(case.arr(dy), cache)
    dx_ref, dg_ref, db_ref = bn.batch_norm_backward(case.np(case.arr(dy)), c_ref)
    _same_kind(case, dx)
    case.close(dx, dx_ref, what="dx")
    case.close(dg, dg_ref, tol=1e-4 if case.dtype_name == "float32" else None, what="dgamma")
    case.close(db, db_ref, tol=1e-4 if case.dtype_name == "float32" else None, what="dbeta")
    ye = bn.batch_norm_eval(xa, ga, ba, cache.mean, cache.var, axis=1)
    case.close(
        ye,
        bn.batch_norm_eval(case.np(xa), case.np(ga), case.np(ba), c_ref.mean, c_ref.var, axis=1),
        what="eval y",
    )
    mean, var = bn.moments(xa, axis=1)
    _same_kind(case, mean)
    case.close(mean, c_ref.mean, what="mean")
    np.testing.assert_array_equal(case.np(xa), x_before)  # never modified


def test_large_offset_in_every_namespace(case):
    rng = np.random.default_rng(3)
    x = (1e6 + rng.normal(size=(4096, 64))).astype(np.float32)
    xa = case.arr(x, case.xp.float32)
    y, _ = bn.batch_norm_train(xa, None, None, axis=1)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    assert np.max(np.abs(case.np(y) - ref)) < 2e-6


def test_layer_runs_in_the_namespace_of_its_first_batch(case):
    x, _, _ = _data((16, 3))
    layer, ref = (
        bn.BatchNorm(3, dtype=np.float32 if case.dtype_name == "float32" else "float64"),
        None,
    )
    ref = bn.BatchNorm(3, dtype=layer.dtype)
    dy = np.random.default_rng(2).normal(size=x.shape)
    for step in range(3):
        xa = case.arr(x + step)
        y = layer.forward(xa)
        _same_kind(case, y)
        case.close(y, ref.forward(case.np(xa)), what="layer y")
        dx = layer.backward(case.arr(dy))
        case.close(dx, ref.backward(case.np(case.arr(dy))), what="layer dx")
    _same_kind(case, layer.running_mean)
    case.close(layer.running_mean, ref.running_mean, what="running mean")
    case.close(layer.running_var, ref.running_var, what="running var")
    assert layer.num_batches_tracked == 3
    layer.eval()
    case.close(layer.forward(case.arr(x)), ref.eval().forward(case.np(case.arr(x))), what="eval")
    # state goes out as NumPy and back into the layer's namespace
    sd = layer.state_dict()
    assert all(isinstance(v, np.ndarray) for k, v in sd.items() if k != "num_batches_tracked")
    other = bn.BatchNorm(3, dtype=layer.dtype).to(case.arr(x)).load_state_dict(sd)
    _same_kind(case, other.running_var)
    np.testing.assert_array_equal(case.np(other.running_var), case.np(layer.running_var))


def test_layer_refuses_another_library_and_changes_nothing(case):
    layer = bn.BatchNorm(3)
    layer.forward(case.arr(_data((8, 3))[0]))
    before = layer.state_dict()
    with pytest.raises(TypeError, match="keeps its state in"):
        layer.forward(np.zeros((8, 3)))
    after = layer.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_mixed_libraries_integer_data_and_out_are_refused(case):
    x, g, b = _data((8, 3))
    xa = case.arr(x)
    with pytest.raises(TypeError, match="same library"):
        bn.batch_norm_train(xa, g, b)  # NumPy gamma with a non-NumPy x
    with pytest.raises(TypeError, match="floating dtype"):
        bn.batch_norm_train(
            case.xp.asarray(np.ones((8, 3), np.int32), device=case.device), None, None
        )
    with pytest.raises(TypeError, match="NumPy arrays only"):
        bn.batch_norm_train(xa, None, None, out=np.empty((8, 3)))
    with pytest.raises(ValueError, match="numba"):
        bn.batch_norm_train(xa, None, None, backend="numba")


def test_devices_must_match():
    s = pytest.importorskip("array_api_strict")
    x = s.asarray(np.ones((4, 2)), device=s.Device("device1"))
    g = s.asarray(np.ones(2), device=s.Device("CPU_DEVICE"))
    with pytest.raises(ValueError, match="device"):
        bn.batch_norm_train(x, g, None)


@pytest.mark.slow
def test_jax_jit_and_grad_through_the_public_kernel():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(True):
        x, g, b = (jnp.asarray(a) for a in _data((16, 3)))
        w = jnp.asarray(np.random.default_rng(5).normal(size=(16, 3)))

        def loss(x, g, b):
            y, _ = bn.batch_norm_train(x, g, b, axis=1)
            return jnp.sum(y * w)

        y_eager, cache = bn.batch_norm_train(x, g, b)
        y_jit, cache_jit = jax.jit(lambda x, g, b: bn.batch_norm_train(x, g, b))(x, g, b)
        np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y_eager), rtol=0, atol=1e-13)
        assert isinstance(cache_jit, bn.BatchNormCache)
        gx, gg, gb = jax.grad(loss, argnums=(0, 1, 2))(x, g, b)
        dx, dg, db = bn.batch_norm_backward(w, cache)
        np.testing.assert_allclose(np.asarray(gx), np.asarray(dx), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(gg), np.asarray(dg), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(gb), np.asarray(db), rtol=1e-12, atol=1e-12)
        # a wrong upstream gradient does not agree (negative control)
        assert np.max(np.abs(np.asarray(bn.batch_norm_backward(w * 1.01, cache)[0] - gx))) > 1e-6


# --------------------------------------------------------------------------- regressions
torch = pytest.importorskip("torch")


def _state(layer):
    return {k: np.asarray(v).copy() for k, v in layer.state_dict().items()}


def _same_state(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_a_layer_that_ran_on_numpy_refuses_torch_and_changes_nothing():
    layer = bn.BatchNorm(3)
    layer.forward(np.random.default_rng(0).normal(size=(8, 3)))
    before = _state(layer)
    with pytest.raises(TypeError, match="keeps its state in NumPy"):
        layer.forward(torch.randn(8, 3))
    assert _same_state(before, _state(layer)) and isinstance(layer.gamma, np.ndarray)


@pytest.mark.parametrize("bad", [(8, 4), (1, 3), (0, 3)])
def test_a_refused_first_batch_leaves_the_layer_where_it_was(bad):
    layer = bn.BatchNorm(3)
    with pytest.raises(ValueError):
        layer.forward(torch.randn(*bad))
    assert isinstance(layer.running_mean, np.ndarray)
    layer.forward(np.random.default_rng(0).normal(size=(8, 3)))  # still a NumPy layer


def test_tools_work_on_a_torch_layer():
    layer = bn.BatchNorm(3)
    for _ in range(3):
        layer.forward(torch.randn(16, 3, dtype=torch.float64) + 2)
    ref = bn.BatchNorm(3).load_state_dict(layer.state_dict())
    w, b = bn.fold_linear(np.ones((2, 3)), None, layer)
    w_ref, b_ref = bn.fold_linear(np.ones((2, 3)), None, ref)
    np.testing.assert_array_equal(w, w_ref)
    np.testing.assert_array_equal(b, b_ref)
    exp, _ = bn.export_state(layer, "torch")
    assert all(isinstance(v, np.ndarray) for k, v in exp.items() if k != "num_batches_tracked")
    from batchnorm.diagnostics import train_eval_gap

    gap = train_eval_gap(layer, torch.randn(16, 3, dtype=torch.float64))
    assert np.isfinite(gap["max_abs_mean_shift_in_std"])
    import copy

    twin = copy.deepcopy(layer)
    assert isinstance(twin.running_mean, torch.Tensor)
    twin.forward(torch.randn(16, 3, dtype=torch.float64))
    assert int(layer.num_batches_tracked) == 3  # the original is untouched


def test_mixed_libraries_with_a_numpy_x_are_refused():
    x = np.random.default_rng(0).normal(size=(8, 3))
    with pytest.raises(TypeError, match="one library"):
        bn.batch_norm_train(x, torch.ones(3), None)
    with pytest.raises(TypeError, match="one library"):
        bn.batch_norm_eval(x, None, None, torch.zeros(3), np.ones(3))


def test_empty_torch_batches_are_refused_like_numpy():
    with pytest.raises(ValueError, match="empty batch"):
        bn.moments(torch.randn(0, 3))
    with pytest.raises(ValueError, match="empty batch"):
        bn.batch_norm_train(torch.randn(0, 3), None, None)


def test_sgd_refuses_parameters_it_cannot_update_in_place():
    from batchnorm.nn import SGD

    layer = bn.BatchNorm(3)
    layer.forward(torch.randn(8, 3))
    layer.backward(torch.randn(8, 3))
    with pytest.raises(TypeError, match="NumPy parameters"):
        SGD(layer, 0.1).step()


def test_checkpoint_versions_are_checked_everywhere(tmp_path):
    from batchnorm import checkpoint
    from batchnorm.diagnostics import layer_from_checkpoint

    layer = bn.BatchNorm(3)
    for bad in (2, -1, "1", 1.0, None, [1]):
        path = tmp_path / "bad.npz"
        checkpoint.save_npz(
            path, dict(layer.state_dict()), meta={"batchnorm": layer.config(), "state_version": bad}
        )
        with pytest.raises(ValueError, match="bad.npz"):
            layer_from_checkpoint(path)
        with pytest.raises(ValueError, match="bad.npz"):
            bn.BatchNorm(3).load(path)
    sd = layer.state_dict()
    assert sd.copy().version == sd.version


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_huge_float32_values_keep_finite_statistics(case, scale):
    x = (np.random.default_rng(0).standard_normal((64, 4)) * scale).astype(np.float32)
    mean, var = bn.moments(case.arr(x, case.xp.float32))
    ref_mean, ref_var = bn.moments(x)
    if case.sdt == case.xp.float32:  # the variance itself exceeds float32: inf, never garbage
        assert not np.any(np.isfinite(case.np(var)))
        return
    np.testing.assert_allclose(case.np(var), ref_var, rtol=1e-6)
    y, _ = bn.batch_norm_train(case.arr(x, case.xp.float32), None, None)
    y_ref, _ = bn.batch_norm_train(x, None, None)
    assert np.max(np.abs(case.np(y) - y_ref)) < 1e-6
