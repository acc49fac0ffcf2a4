"""Shared references and helpers for the tests."""

from __future__ import annotations

import os

import numpy as np
import pytest

# The torch modules' native node (batchnorm.adapters.torch.native) is used by default once
# built; the suite runs the Python route unless told otherwise (BATCHNORM_TORCH_NATIVE=1
# runs it with the native node), and tests/test_torch_native.py turns it on where it tests
# it, so which route a test sees never depends on this machine's cache.
os.environ.setdefault("BATCHNORM_TORCH_NATIVE", "0")


def reduce_axes(ndim, axes):
    axes = {a % ndim for a in ((axes,) if isinstance(axes, int) else axes)}
    return tuple(i for i in range(ndim) if i not in axes)


def bshape(shape, axes):
    red = reduce_axes(len(shape), axes)
    return tuple(1 if i in red else n for i, n in enumerate(shape))


def ref_train(x, gamma, beta, axis, eps):
    """The one-line float64 reference: normalize with batch mean and biased variance."""
    x = np.asarray(x, np.float64)
    red = reduce_axes(x.ndim, axis)
    mean, var = x.mean(red, keepdims=True), x.var(red, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if gamma is not None:
        y = y * np.reshape(gamma, bshape(x.shape, axis))
    if beta is not None:
        y = y + np.reshape(beta, bshape(x.shape, axis))
    return y


def ref_eval(x, gamma, beta, rm, rv, axis, eps):
    x = np.asarray(x, np.float64)
    bs = bshape(x.shape, axis)
    y = (x - np.reshape(rm, bs)) / np.sqrt(np.reshape(rv, bs) + eps)
    if gamma is not None:
        y = y * np.reshape(gamma, bs)
    if beta is not None:
        y = y + np.reshape(beta, bs)
    return y


def ref_backward_train(x, gamma, dy, axis, eps):
    """Textbook batch-norm backward in float64 (the equation, written out)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    red = reduce_axes(x.ndim, axis)
    mean, var = x.mean(red, keepdims=True), x.var(red, keepdims=True)
    inv_std = 1 / np.sqrt(var + eps)
    x_hat = (x - mean) * inv_std
    g = 1.0 if gamma is None else np.reshape(gamma, bshape(x.shape, axis))
    dx = (
        g
        * inv_std
        * (dy - dy.mean(red, keepdims=True) - x_hat * (dy * x_hat).mean(red, keepdims=True))
    )
    fs = tuple(n for i, n in enumerate(x.shape) if i not in red)
    return dx, (dy * x_hat).sum(red).reshape(fs), dy.sum(red).reshape(fs)


def tol_for(dtype):
    """Absolute tolerance (relative to |y| ~ a few) for comparing y with the float64 reference."""
    return {np.float16: 1e-2, np.float32: 2e-6, np.float64: 1e-12}[np.dtype(dtype).type]


def snapshot(layer):
    """Bit-exact picture of every piece of a layer's state, its records included (the
    argument, state, placement and synchronization records the layer owns)."""
    out = {}

    def walk(prefix, obj):
        for k, v in vars(obj).items():
            if isinstance(v, np.ndarray):
                out[prefix + k] = (v.dtype.str, v.shape, v.tobytes())
            elif k in ("_cache", "cache"):
                out["_cache"] = id(v)
            elif type(v).__module__.startswith("batchnorm.layers.") and hasattr(v, "__dict__"):
                walk("" if k == "_state" else f"{prefix}{k}.", v)
            elif isinstance(v, dict) and k in ("_values", "_shown"):
                out[prefix + k] = repr({a: repr(b) for a, b in v.items()})
            else:
                out[prefix + k] = repr(v)

    walk("", layer)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=["numpy", "numba"])
def backend(request, monkeypatch):
    """Run a test once per backend: "auto" resolves to the one under test."""
    from batchnorm import backends as _dispatch

    if request.param == "numpy":
        monkeypatch.setattr(_dispatch, "_load_kernels", lambda: None)
    elif not _dispatch.numba_available():
        pytest.skip("numba is not installed")
    else:  # the tests' arrays are small: make "auto" take the compiled path for them too
        monkeypatch.setattr(_dispatch, "AUTO_NUMBA_MIN_SIZE", 0)
    return request.param
