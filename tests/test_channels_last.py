"""Channels-last and other memory orders in the compiled backend: exact against the float64
reference (far from zero, float16/32/64), read in place through the memory-order view (the
same bits as the C-contiguous array of that memory), results laid out like the input, and
``out=`` / reusable buffers in either layout."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ref_backward_train, ref_train

import batchnorm as bn
from batchnorm import backends as _dispatch

pytestmark = pytest.mark.skipif(not _dispatch.numba_available(), reason="numba not installed")


# name -> (memory shape, transpose giving the logical array, feature axis of the logical one)
LAYOUTS = {
    "NHWC": ((6, 5, 7, 16), None, -1),
    "NHWC view of NCHW memory": ((6, 16, 5, 7), (0, 2, 3, 1), -1),
    "NCHW view of NHWC memory": ((6, 5, 7, 16), (0, 3, 1, 2), 1),
    "(N, C) small C": ((4096, 64), None, 1),
    "(N, C) of (C, N) memory": ((64, 300), (1, 0), 1),
    "(60, 100)": ((60, 100), None, 1),
}
# offset and spread of the data: far from zero where the dtype can hold it
DATA = {np.float16: (1000.0, 1.0), np.float32: (1e6, 1.0), np.float64: (1e6, 1.0)}
# |result - reference| / (1 + max |reference|). The reference is the equation in long double
# where the platform has it. float64 data at 1e6 are resolved to 1.2e-10: the float64 mean
# itself is off by up to half that, which bounds y (and the float64 one-liner's own mean
# error reaches 2e-9 of dgamma, where ours stays at 4e-11)
LONG = np.finfo(np.longdouble).eps < 1e-18
TOL = {np.float16: 1e-2, np.float32: 3e-6, np.float64: 1e-10 if LONG else 3e-9}


def _reference(x, g, b, dy, axis, rm, rv, eps=1e-5):
    """y, mean, var, dx, dgamma, dbeta and the eval-mode y, in long double."""
    L, D = x.astype(np.longdouble), dy.astype(np.longdouble)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    g, b, rm, rv = (np.asarray(v, np.longdouble).reshape(shape) for v in (g, b, rm, rv))
    mean = L.mean(red, keepdims=True)
    var = ((L - mean) ** 2).mean(red, keepdims=True)
    inv = 1 / np.sqrt(var + eps)
    x_hat = (L - mean) * inv
    dx = g * inv * (D - D.mean(red, keepdims=True) - x_hat * (D * x_hat).mean(red, keepdims=True))
    ye = (L - rm) / np.sqrt(rv + eps) * g + b
    return (x_hat * g + b, mean.ravel(), var.ravel(), dx, (D * x_hat).sum(red), D.sum(red), ye)


@pytest.fixture(params=["serial", "parallel"])
def kernels(request, monkeypatch):
    """Run once with the serial kernels, once with the parallel ones (small arrays would
    otherwise always take the serial ones)."""
    from batchnorm.backends.numba import kernels as K

    if request.param == "parallel":
        monkeypatch.setattr(K, "SERIAL_MAX", 0)
    return request.param


def _data(rng, name, dtype, shift=None):
    mshape, perm, axis = LAYOUTS[name]
    off, std = DATA[dtype] if shift is None else (shift, 1.0)
    base = (rng.standard_normal(mshape) * std + off).astype(dtype)
    return base, (base if perm is None else base.transpose(perm)), axis


def _close(got, ref, tol, what):
    err = np.abs(np.asarray(got, np.float64) - ref).max() / (1 + np.abs(ref).max())
    assert err <= tol, f"{what}: error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_exact_against_float64_reference_far_from_zero(rng, kernels, name, dtype):
    _, x, axis = _data(rng, name, dtype)
    c = x.shape[axis]
    g, b = rng.standard_normal(c), rng.standard_normal(c)
    dy = rng.standard_normal(x.shape).astype(dtype)
    before = (x.copy(), dy.copy(), g.copy(), b.copy())
    tol = TOL[dtype]
    y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend="numba")
    assert y.dtype == dtype and y.shape == x.shape
    rm, rv = cache.mean + 0.25, cache.var * 2
    ry, rmean, rvar, rdx, rdg, rdb, rye = _reference(x, g, b, dy, axis, rm, rv)
    _close(y, ry, tol, "y")
    np.testing.assert_allclose(cache.mean, rmean.astype(np.float64), rtol=1e-15, atol=0)
    np.testing.assert_allclose(cache.var, rvar.astype(np.float64), rtol=1e-13 if LONG else 1e-8)
    dx, dg, db = bn.batch_norm_backward(dy, cache, backend="numba")
    assert dx.dtype == dtype and dx.strides == y.strides
    _close(dx, rdx, tol, "dx")
    _close(dg, rdg, tol, "dgamma")
    _close(db, rdb, tol, "dbeta")
    ye = bn.batch_norm_eval(x, g, b, rm, rv, axis=axis, backend="numba")
    _close(ye, rye, tol, "eval y")
    for a, keep in zip((x, dy, g, b), before, strict=True):
        np.testing.assert_array_equal(a, keep)  # inputs are never modified


def test_the_reference_check_can_fail(rng):
    """Negative control: float32 E[x^2] - E[x]^2 at offset 1e6 misses the tolerance above."""
    _, x, axis = _data(rng, "NHWC view of NCHW memory", np.float32)
    xs = x.astype(np.float32)
    red = (0, 1, 2)
    mean = xs.mean(red, dtype=np.float32)
    var = np.maximum((xs * xs).mean(red, dtype=np.float32) - mean * mean, 0)
    naive = (xs - mean) / np.sqrt(var + np.float32(1e-5))
    with pytest.raises(AssertionError, match="error"):
        _close(naive, ref_train(x, None, None, axis, 1e-5), TOL[np.float32], "naive")


@pytest.mark.parametrize("name", ["NHWC view of NCHW memory", "NCHW view of NHWC memory"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_view_gives_the_bits_of_its_memory(rng, kernels, name, dtype):
    """A transposed view runs through its memory-order view: bit for bit the results of the
    C-contiguous array holding the same memory (feature axis renumbered), laid out like x."""
    base, x, axis = _data(rng, name, dtype, shift=3.0)
    perm = LAYOUTS[name][1]
    maxis = perm[axis % x.ndim]  # x's axis a is axis perm[a] of its memory
    g = rng.standard_normal(x.shape[axis])
    dy_base = rng.standard_normal(base.shape).astype(dtype)
    y, cache = bn.batch_norm_train(x, g, None, axis=axis, backend="numba")
    ym, cache_m = bn.batch_norm_train(base, g, None, axis=maxis, backend="numba")
    np.testing.assert_array_equal(y, ym.transpose(perm))
    assert y.strides == x.strides
    np.testing.assert_array_equal(cache.mean, cache_m.mean)
    dx, dg, _ = bn.batch_norm_backward(dy_base.transpose(perm), cache, backend="numba")
    dxm, dgm, _ = bn.batch_norm_backward(dy_base, cache_m, backend="numba")
    np.testing.assert_array_equal(dx, dxm.transpose(perm))
    np.testing.assert_array_equal(dg, dgm)
    assert dx.strides == x.strides
    # a dy laid out unlike x (C-contiguous) gives the same gradients
    dx_c, dg_c, _ = bn.batch_norm_backward(
        np.ascontiguousarray(dy_base.transpose(perm)), cache, backend="numba"
    )
    np.testing.assert_array_equal(dx_c, dx)
    np.testing.assert_array_equal(dg_c, dg)
    ye = bn.batch_norm_eval(x, g, None, cache.mean, cache.var, axis=axis, backend="numba")
    yem = bn.batch_norm_eval(base, g, None, cache.mean, cache.var, axis=maxis, backend="numba")
    np.testing.assert_array_equal(ye, yem.transpose(perm))


def test_feature_axes_not_adjacent_in_memory_still_exact(rng):
    """Adjacent feature axes that a transpose splits (or reorders) in memory take a copy."""
    base = rng.standard_normal((5, 6, 7, 8)) + 100
    x = base.transpose(0, 2, 1, 3)  # features (1, 2): memory axes 2, 1 (reordered)
    y, cache = bn.batch_norm_train(x, None, None, axis=(1, 2), backend="numba")
    np.testing.assert_allclose(y, ref_train(x, None, None, (1, 2), 1e-5), atol=1e-12)
    dy = rng.standard_normal(x.shape)
    dx, _, _ = bn.batch_norm_backward(dy, cache, backend="numba")
    np.testing.assert_allclose(dx, ref_backward_train(x, None, dy, (1, 2), 1e-5)[0], atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_out_laid_out_like_x_or_c_contiguous(rng, backend):
    base = (rng.standard_normal((4, 8, 6, 5)) * 2 + 7).astype(np.float32)
    x = base.transpose(0, 2, 3, 1)  # NHWC view of NCHW memory
    g = rng.standard_normal(8)
    y_ref, cache = bn.batch_norm_train(x, g, None, axis=-1, backend=backend)
    like = np.empty_like(x)  # x's strides
    assert like.strides == x.strides and not like.flags.c_contiguous
    for out in (like, np.empty(x.shape, np.float32)):
        got, _ = bn.batch_norm_train(x, g, None, axis=-1, backend=backend, out=out)
        assert got is out
        np.testing.assert_array_equal(out, y_ref)
        ye = bn.batch_norm_eval(x, g, None, cache.mean, cache.var, axis=-1, out=out)
        np.testing.assert_array_equal(
            ye, bn.batch_norm_eval(x, g, None, cache.mean, cache.var, axis=-1)
        )
        dy = rng.standard_normal(x.shape).astype(np.float32)
        dx_ref = bn.batch_norm_backward(dy, cache, backend=backend)[0]
        assert bn.batch_norm_backward(dy, cache, backend=backend, out=out)[0] is out
        np.testing.assert_array_equal(out, dx_ref)
    other = np.empty((4, 5, 8, 6), np.float32).transpose(0, 3, 1, 2)  # neither layout
    keep = other.copy()
    with pytest.raises(ValueError, match=r"C-contiguous or laid out like the input"):
        bn.batch_norm_train(x, g, None, axis=-1, backend=backend, out=other)
    np.testing.assert_array_equal(other, keep)  # a refused out is never written


def test_reused_buffers_follow_the_input_layout(rng):
    base = rng.standard_normal((64, 16, 12, 12)).astype(np.float32)
    x = base.transpose(0, 2, 3, 1)
    reuse = bn.BatchNorm(16, axis=-1, reuse_buffers=True, backend="numba")
    plain = bn.BatchNorm(16, axis=-1, backend="numba")
    y1 = reuse(x)
    assert y1.strides == x.strides
    y2 = plain(x)
    np.testing.assert_array_equal(y1, y2)
    dx1 = reuse.backward(y1.copy())
    np.testing.assert_array_equal(dx1, plain.backward(y2))
    assert reuse(x) is y1  # the same buffer again
    xs = rng.standard_normal((64, 32, 12, 12)).astype(np.float32)[:, ::2]  # a strided slice
    ys = bn.BatchNorm(16, reuse_buffers=True, backend="numba")(xs)
    assert ys.flags.c_contiguous


def test_size_one_axes_do_not_change_the_layout(rng):
    """A size-1 axis may carry any stride: an ``out`` or buffer laid out like x apart from it
    is still accepted, and a layer keeps reusing one buffer."""
    x = rng.standard_normal((6, 8, 1, 5)).astype(np.float32).transpose(0, 2, 3, 1)  # (6, 1, 5, 8)
    odd = np.empty((6, 8, 1, 5), np.float32).transpose(0, 2, 3, 1)
    odd = np.lib.stride_tricks.as_strided(
        odd, strides=(odd.strides[0], 12345 * 4, *odd.strides[2:])
    )
    assert odd.strides != x.strides and not odd.flags.c_contiguous
    y, _ = bn.batch_norm_train(x, None, None, axis=-1, backend="numba", out=odd)
    assert y is odd
    fresh, _ = bn.batch_norm_train(x, None, None, axis=-1, backend="numba")
    np.testing.assert_array_equal(odd, fresh)
    layer = bn.BatchNorm(8, axis=-1, reuse_buffers=True, backend="numba")
    y1 = layer(x)
    assert layer(x) is y1
    reversed_w = np.empty((6, 1, 5, 8), np.float32)[:, :, ::-1]  # negative strides
    with pytest.raises(ValueError, match="laid out like the input"):
        bn.batch_norm_train(x, None, None, axis=-1, out=reversed_w)
