"""Fused compiled CPU kernels (numba), with the same contracts as :mod:`batchnorm.functional`.

Batch norm is memory-bound, so the kernels are arranged to touch DRAM as few times as
possible. Every layout is first viewed as ``(O, C, I)``: O = the axes before the feature
axis (or adjacent feature axes, merged), C = the features, I = the axes after.

* Fused ("one trip to memory"): when each feature's data fit in cache (a channel block of
  an NCHW array; for small arrays run serially also a strip of columns of an ``(N, D)`` /
  channels-last array), one task reads the block, forms its statistics, and writes the
  output (or, backward, forms both gradient sums and writes ``dx``) while the block is
  still in cache. DRAM then sees one read of ``x`` (and ``dy``) and one write.
* Two-pass otherwise: one parallel pass for the statistics and one for the output. For
  channels-last arrays every cache line holds every feature, so no output can be written
  before all of ``x`` has been read: beyond the cache two reads of ``x`` are unavoidable.
  Parallel strips of columns of large ``(N, D)`` arrays measured slower than two passes
  (strided rows defeat the prefetchers and thrash the TLB).

This module holds the Python drivers, which pick the kernels; they take C-contiguous arrays
(an input's memory-order view). The rest of the package, by role:

* :mod:`~batchnorm.backends.numba.backend`: :class:`NumbaBackend`, the backend contract
  over these drivers, which reads every array in its memory order;
* :mod:`~batchnorm.backends.numba.plan`: the ``(O, C, I)`` view, chunking and fusing
  (:class:`Plan`), memory order, and the thread guard;
* :mod:`~batchnorm.backends.numba.reductions`: statistics and gradient sums (shifted,
  float64, rescaled on overflow);
* :mod:`~batchnorm.backends.numba.passes`: the elementwise and fused passes, in a
  rounding-safe form;
* :mod:`~batchnorm.backends.numba.half`: float16 read and written in registers;
* :mod:`~batchnorm.backends.numba.options`: the compile options (fast-math that keeps
  NaN/Inf, no reassociation);
* :mod:`~batchnorm.backends.numba.coef`: the formulas of :mod:`batchnorm.core.coef`,
  compiled.

Nothing is compiled at import: numba compiles each kernel on first use and caches the
machine code on disk (``cache=True``).
"""

from __future__ import annotations

import contextlib
import types as pytypes

import numpy as np
from numba import njit

from ...core import coef as F
from ..numpy import RESCALE, overflow_scale, work_dtype
from . import passes, reductions
from .half import float_to_half, half_to_float
from .options import _SERIAL_OPTS
from .plan import (
    FUSE_BYTES,
    ROWS_FUSE_MAX,
    SERIAL_MAX,
    WIDE_INNER,
    Plan,
    _guard,
    _threads,
    plan_for,
    small_fused,
    supported,
)

__all__ = [
    "FUSE_BYTES",
    "ROWS_FUSE_MAX",
    "SERIAL_MAX",
    "WIDE_INNER",
    "Plan",
    "affine",
    "backward",
    "float_to_half",
    "grad_sums",
    "half_to_float",
    "input_grad",
    "moments",
    "plan_for",
    "small_fused",
    "supported",
    "train",
]


def _plan(xw: np.ndarray, axes) -> Plan:
    return plan_for(xw.shape, axes, _threads(), xw.itemsize)


def _setup(xw: np.ndarray, axes):
    """(plan, kernel set, guard) for an array: serial kernels below :data:`SERIAL_MAX`
    elements (a parallel launch costs more than the whole job), parallel ones above."""
    if xw.size < SERIAL_MAX:
        return plan_for(xw.shape, axes, 1, xw.itemsize), _SER, _NO_GUARD
    return plan_for(xw.shape, axes, _threads(), xw.itemsize), _PAR, _guard()


class _Kernels:
    """One set of the compiled kernels (parallel, or serial copies for small arrays)."""

    def __init__(self, serial: bool):
        for name, fn in _KERNELS.items():
            setattr(self, name, _serial_copy(fn) if serial else fn)


def _serial_copy(dispatcher):
    """A non-parallel compilation of a kernel (prange runs as range). The copy gets its
    own qualified name, so numba's on-disk cache keeps the two apart."""
    f = dispatcher.py_func
    g = pytypes.FunctionType(
        f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__
    )
    g.__qualname__ = f.__qualname__ + "_serial"
    g.__doc__ = f.__doc__
    return njit(**_SERIAL_OPTS)(g)


def _big(wt: np.dtype) -> float:
    return float(np.finfo(wt).max) / 2


def _rescale(xw: np.ndarray) -> float:
    """Scale for a second summation when a float64 sum overflowed (float64 data only)."""
    return RESCALE if xw.dtype == np.float64 else 1.0


def _output(out, xw: np.ndarray, dtype) -> np.ndarray:
    return np.empty(xw.shape, dtype) if out is None else out


def _merge_columns(plan: Plan, shift, s1, s2, hs):
    """Per-feature (mean, biased var) from per-column shifted sums (Chan's merge)."""
    s1, s2 = s1.sum(axis=0), s2.sum(axis=0)
    if plan.wide or plan.I == 1:
        n = plan.count
        d = s1 / n
        return (shift + d) / hs, (np.maximum(s2 / n - d * d, 0.0) / hs) / hs
    n_col = plan.O
    col_d = s1 / n_col
    col_mean = (shift + col_d).reshape(plan.C, plan.I)
    col_m2 = np.maximum(s2 - n_col * col_d * col_d, 0.0).reshape(plan.C, plan.I)
    mean = col_mean.mean(axis=1)
    m2 = col_m2.sum(axis=1) + n_col * ((col_mean - mean[:, None]) ** 2).sum(axis=1)
    return mean / hs, ((m2 / plan.count) / hs) / hs


def moments(xw: np.ndarray, axes: tuple[int, ...]):
    """Per-feature float64 mean and biased variance of a work array (flat vectors)."""
    plan, ks, guard = _setup(xw, axes)
    kern = ks._shifted_sums_wide if plan.wide else ks._shifted_sums_rows
    v = plan.view(xw)
    with guard:
        mean, var = _merge_columns(plan, *kern(v, plan.nchunks, 1.0), 1.0)
    rescale = _rescale(xw)
    if rescale != 1.0:
        bad = ~(np.isfinite(mean) & np.isfinite(var))
        if bad.any():  # a float64 sum overflowed (or the data are not finite): sum x*2^-600
            with guard:
                sums = kern(v, plan.nchunks, rescale)
            with np.errstate(all="ignore"):
                m2, v2 = _merge_columns(plan, *sums, rescale)
            mean, var = np.where(bad, m2, mean), np.where(bad, v2, var)
    return mean, var


def _coef_array(plan: Plan, rows: list, wt) -> np.ndarray:
    """Per-feature coefficient rows (arrays or scalars) as one (rows, columns) array in the
    working precision, expanded to the kernel's columns."""
    coef = np.empty((len(rows), plan.C), wt)
    for i, r in enumerate(rows):
        coef[i] = r
    return plan.per_column(coef)


def affine(xw, axes, mean, scale, bias, out_dtype, out=None, h=None) -> np.ndarray:
    """``(x - mean) * scale + bias`` per feature (float64 vectors), rounding-safe."""
    plan, ks, guard = _setup(xw, axes)
    wt = work_dtype(xw.dtype)
    s = mean.astype(wt).astype(np.float64)
    b = bias - (mean - s) * scale
    rows = [s, scale, b, 1.0] if h is None else [s * h, scale / h, b, h]
    coef = _coef_array(plan, rows, wt)
    out = _output(out, xw, out_dtype)
    with guard:
        if plan.wide:
            ks._affine_wide(plan.view(xw), coef, plan.view(out))
        else:
            ks._affine_rows(plan.view(xw), coef, plan.view(out), plan.nchunks)
    return out


def train(xw, axes, gamma, beta, eps, out_dtype, out=None):
    """Fused training forward; returns ``(y, mean, var)`` (flat float64 vectors)."""
    plan, ks, guard = _setup(xw, axes)
    wt = work_dtype(xw.dtype)
    if not plan.fused:
        mean, var = moments(xw, axes)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            inv = F.inv_std(var, eps)
            scale = inv * gamma
            h = overflow_scale(mean, var, plan.count, wt)
        return affine(xw, axes, mean, scale, beta, out_dtype, out, h), mean, var
    out = _output(out, xw, out_dtype)
    mean = np.empty(plan.C, np.float64)
    var = np.empty(plan.C, np.float64)
    coef = np.empty((4, plan.C), wt)
    args = (gamma, beta, float(eps), _big(wt), _rescale(xw))
    with guard:
        if plan.wide:
            ks._train_wide(plan.view(xw), *args, coef, plan.view(out), mean, var)
        else:
            ks._train_rows(plan.view(xw), *args, plan.width, coef, plan.view(out), mean, var)
    return out, mean, var


def grad_sums(xw: np.ndarray, dyw: np.ndarray, axes, mean, h=None):
    """Per-feature float64 ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    plan, ks, guard = _setup(xw, axes)
    h = np.ones_like(mean) if h is None else h
    col_shift = plan.per_column(mean * h)
    col_h = plan.per_column(h)
    kern = ks._grad_sums_wide if plan.wide else ks._grad_sums_rows
    with guard:
        s1, s2 = kern(plan.view(xw), plan.view(dyw), col_shift, col_h, plan.nchunks)
    s1, s2 = s1.sum(axis=0), s2.sum(axis=0)
    if not plan.wide and plan.I > 1:
        s1, s2 = s1.reshape(plan.C, plan.I).sum(1), s2.reshape(plan.C, plan.I).sum(1)
    return s1, s2 / h


def input_grad(xw, dyw, axes, mean, k, p, q, out_dtype, out=None, h=None):
    """``dx = k * dy + p * (x - mean) + q`` per feature, rounding-safe."""
    plan, ks, guard = _setup(xw, axes)
    wt = work_dtype(xw.dtype)
    s = mean.astype(wt).astype(np.float64)
    p_h, q = F.input_grad_coef(p, q, mean, s, 1.0 if h is None else h)  # rounding of s into q
    rows = [s, k, p, q, 1.0] if h is None else [s * h, k, p_h, q, h]
    coef = _coef_array(plan, rows, wt)
    out = _output(out, xw, out_dtype)
    with guard:
        if plan.wide:
            ks._dx_wide(plan.view(xw), plan.view(dyw), coef, plan.view(out))
        else:
            ks._dx_rows(plan.view(xw), plan.view(dyw), coef, plan.view(out), plan.nchunks)
    return out


def backward(xw, dyw, axes, mean, inv, k, h, batch_stats, out_dtype, out=None):
    """Fused backward; returns ``(dx, sum_dy, sum_dy_xc)`` (flat float64 vectors)."""
    plan, ks, guard = _setup(xw, axes)
    wt = work_dtype(xw.dtype)
    itemsize = xw.itemsize + dyw.itemsize
    fused = plan.fused and (plan.O * plan.I * itemsize <= 2 * FUSE_BYTES if plan.wide else True)
    if not fused:
        s1, s2 = grad_sums(xw, dyw, axes, mean, h)
        m = plan.count
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if batch_stats:
                p, q = F.backward_coef(s1, s2, inv, k, m)
            else:
                p = q = np.zeros_like(k)
        return input_grad(xw, dyw, axes, mean, k, p, q, out_dtype, out, h), s1, s2
    out = _output(out, xw, out_dtype)
    s1 = np.empty(plan.C, np.float64)
    s2 = np.empty(plan.C, np.float64)
    coef = np.empty((5, plan.C), wt)
    args = (mean, inv, k, h, bool(batch_stats))
    with guard:
        if plan.wide:
            ks._backward_wide(plan.view(xw), plan.view(dyw), *args, coef, plan.view(out), s1, s2)
        else:
            ks._backward_rows(
                plan.view(xw), plan.view(dyw), *args, plan.width, coef, plan.view(out), s1, s2
            )
    return out, s1, s2


# name -> dispatcher of every kernel the drivers call (a kernel set holds one of each)
_KERNELS = {k.py_func.__name__: k for k in (*reductions.KERNELS, *passes.KERNELS)}
_PAR = _Kernels(serial=False)
_SER = _Kernels(serial=True)
_NO_GUARD = contextlib.nullcontext()
