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
from ...core.stats import merge
from ..numpy import OVERFLOW_LIMIT, overflow_scale_or_none, work_dtype
from . import passes, reductions
from .half import float_to_half, half_to_float
from .options import SERIAL_OPTS
from .plan import (
    FUSE_BYTES,
    ROWS_FUSE_MAX,
    SERIAL_MAX,
    WIDE_INNER,
    Plan,
    guard,
    plan_for,
    small_fused,
    supported,
    threads,
)

__all__ = [
    "FUSE_BYTES",
    "ROWS_FUSE_MAX",
    "SERIAL_MAX",
    "WIDE_INNER",
    "Plan",
    "affine",
    "backward",
    "backward_wide_direct",
    "float_to_half",
    "affine_pass",
    "grad_sums",
    "half_to_float",
    "input_grad",
    "moments",
    "plan_for",
    "small_fused",
    "supported",
    "train",
    "kernel",
    "train_wide_direct",
]


def _setup(xw: np.ndarray, axes):
    """(plan, kernel set, guard) for an array: serial kernels below :data:`SERIAL_MAX`
    elements (a parallel launch costs more than the whole job), parallel ones above."""
    if xw.size < SERIAL_MAX:
        return plan_for(xw.shape, axes, 1, xw.itemsize), _SER, _NO_GUARD
    return plan_for(xw.shape, axes, threads(), xw.itemsize), _PAR, guard()


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
    return njit(**SERIAL_OPTS)(g)


def _rescale(xw: np.ndarray) -> float:
    """Scale for a second summation when a float64 sum overflowed (float64 data only)."""
    return F.RESCALE if xw.dtype == np.float64 else 1.0


def _output(out, xw: np.ndarray, dtype) -> np.ndarray:
    return np.empty(xw.shape, dtype) if out is None else out


def _merge_columns(plan: Plan, shift, s1, s2, hs):
    """Per-feature ``(ref, delta, var)`` from per-column shifted sums of ``x * hs -
    shift``: the mean is ``ref + delta``, held unrounded (``ref`` a sample of the feature,
    ``delta`` the mean's offset from it), and ``var`` the biased variance. The columns of
    one feature (rows layout with I > 1) are merged pairwise by Chan's merge
    (:func:`batchnorm.core.stats.merge`)."""
    s1, s2 = s1.sum(axis=0), s2.sum(axis=0)
    if plan.wide or plan.I == 1:
        delta, var = F.moments_from_shifted_sums(0.0, s1, s2, plan.count, hs)
        return shift / hs, delta, var
    cols = (plan.C, plan.I)
    col_shift = shift.reshape(cols)
    ref = col_shift[:, :1]
    t1, t2 = s1.reshape(cols), s2.reshape(cols)
    # each column's mean relative to the feature's first sample, and its variance
    off, col_var = F.moments_from_shifted_sums(col_shift - ref, t1, t2, plan.O, hs)
    mean, m2 = _merge_pairwise(np.full(plan.I, float(plan.O)), off, col_var * plan.O)
    return ref[:, 0] / hs, mean[:, 0], m2[:, 0] / plan.count


def _merge_pairwise(count, mean, m2):
    """Chan's merge of the columns of ``(mean, m2)`` (features x columns, ``count`` values
    per column) down to one column, pairwise: log2(columns) vectorized merges."""
    while mean.shape[1] > 1:
        k, h = mean.shape[1], mean.shape[1] // 2
        lo, hi = slice(0, h), slice(h, 2 * h)
        parts = merge(count[lo], mean[:, lo], m2[:, lo], count[hi], mean[:, hi], m2[:, hi])
        if k % 2:  # the odd column joins the next level unchanged
            rest = (count[2 * h :], mean[:, 2 * h :], m2[:, 2 * h :])
            parts = tuple(np.concatenate(ab, axis=-1) for ab in zip(parts, rest, strict=True))
        count, mean, m2 = parts
    return mean, m2


def moments_shifted(xw: np.ndarray, axes: tuple[int, ...]):
    """Per-feature ``(ref, delta, var)`` of a work array (flat float64 vectors): the mean
    is ``ref + delta`` unrounded, ``var`` the biased variance. A feature whose float64
    sums overflowed on finite data (|x| near 1e308) is summed again on ``x * RESCALE``."""
    plan, ks, guard = _setup(xw, axes)
    kern = ks._shifted_sums_wide if plan.wide else ks._shifted_sums_rows
    v = plan.view(xw)
    with guard:
        stats = _merge_columns(plan, *kern(v, plan.nchunks, 1.0), 1.0)
    rescale = _rescale(xw)
    if rescale != 1.0:
        ref, delta, var = stats
        bad = ~(np.isfinite(ref + delta) & np.isfinite(var))
        if bad.any():  # a float64 sum overflowed (or the data are not finite): sum x*2^-600
            with guard:
                sums = kern(v, plan.nchunks, rescale)
            with np.errstate(all="ignore"):
                again = _merge_columns(plan, *sums, rescale)
            stats = tuple(np.where(bad, b, a) for a, b in zip(stats, again, strict=True))
    return stats


def moments(xw: np.ndarray, axes: tuple[int, ...]):
    """Per-feature float64 mean and biased variance of a work array (flat vectors)."""
    ref, delta, var = moments_shifted(xw, axes)
    return ref + delta, var


def _coef_array(plan: Plan, rows: list, wt) -> np.ndarray:
    """Per-feature coefficient rows (arrays or scalars) as one (rows, columns) array in the
    working precision, expanded to the kernel's columns."""
    coef = np.empty((len(rows), plan.C), wt)
    for i, r in enumerate(rows):
        coef[i] = r
    return plan.per_column(coef)


def affine(xw, axes, mean, scale, bias, out_dtype, out=None, h=None, delta=0.0) -> np.ndarray:
    """``(x - mean) * scale + bias`` per feature (float64 vectors), rounding-safe; with
    ``delta`` the mean is ``mean + delta`` held unrounded (see :func:`moments_shifted`)."""
    plan, ks, guard = _setup(xw, axes)
    wt = work_dtype(xw.dtype)
    if isinstance(delta, float) and delta == 0.0:  # a given mean (evaluation): as it is
        s = mean.astype(wt).astype(np.float64)
        off = mean - s
    else:
        s = (mean + delta).astype(wt).astype(np.float64)
        off = F.mean_offset(mean, delta, s)
    a_h, b = F.output_coef(off, scale, 1.0, bias, 0.0, 1.0 if h is None else h)
    rows = [s, a_h, b, 1.0] if h is None else [s * h, a_h, b, h]
    coef = _coef_array(plan, rows, wt)
    out = _output(out, xw, out_dtype)
    with guard:
        if plan.wide:
            ks._affine_wide(plan.view(xw), coef, plan.view(out))
        else:
            ks._affine_rows(plan.view(xw), coef, plan.view(out), plan.nchunks)
    return out


def affine_pass(xk: np.ndarray, coef: np.ndarray, out: np.ndarray) -> None:
    """``out = (x h - s h) a_h + b`` with the coefficient rows ``(s h, a_h, b, h)`` already
    formed per feature: on an ``(O, K)`` view (a feature per column) or an ``(O, C, I)``
    one (``I >= WIDE_INNER``); serial below :data:`SERIAL_MAX` elements."""
    if xk.size < SERIAL_MAX:
        if xk.ndim == 2:
            _SER._affine_rows(xk, coef, out, 1)
        else:
            _SER._affine_wide(xk, coef, out)
        return
    with guard():
        if xk.ndim == 2:
            _PAR._affine_rows(xk, coef, out, max(1, min(xk.shape[0], threads())))
        else:
            _PAR._affine_wide(xk, coef, out)


def train(xw, axes, gamma, beta, eps, out_dtype, out=None, return_inv=False):
    """Fused training forward; returns ``(y, mean, var)`` (flat float64 vectors), and
    ``inv_std`` after them when ``return_inv`` (computed once, by the kernel)."""
    plan, ks, guard = _setup(xw, axes)
    wt = work_dtype(xw.dtype)
    if not plan.fused:
        ref, delta, var = moments_shifted(xw, axes)
        mean = ref + delta
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            inv = F.inv_std(var, eps)
            h = overflow_scale_or_none(mean, var, plan.count, wt)
        y = affine(xw, axes, ref, inv * gamma, beta, out_dtype, out, h, delta)
        return (y, mean, var, inv) if return_inv else (y, mean, var)
    out = _output(out, xw, out_dtype)
    mean, var, inv = np.empty((3, plan.C), np.float64)  # three rows, each contiguous
    coef = np.empty((4, plan.C), wt)
    args = (gamma, beta, float(eps), OVERFLOW_LIMIT[wt.itemsize], _rescale(xw))
    res = (mean, var, inv)
    with guard:
        if plan.wide:
            ks._train_wide(plan.view(xw), *args, coef, plan.view(out), *res)
        else:
            ks._train_rows(plan.view(xw), *args, plan.width, coef, plan.view(out), *res)
    return (out, mean, var, inv) if return_inv else (out, mean, var)


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


def train_wide_direct(xk, g, b, eps, coef, out, stats) -> bool:
    """The fused training forward of an ``(N, C, I)`` view (``I >= WIDE_INNER``, each
    channel block within :data:`FUSE_BYTES`) into caller-made arrays: the torch adapter's
    one-call route, without :func:`train`'s plan and allocations (the kernel :func:`train`
    picks, with its arguments: the same bits). ``coef`` (4, C) in the working precision is
    scratch; ``stats`` (3, C) float64 receives the mean, biased variance and inv_std.
    Returns False, doing nothing, where :func:`train` would not fuse (fewer channels than
    threads above :data:`SERIAL_MAX`)."""
    args = (g, b, eps, OVERFLOW_LIMIT[coef.itemsize], _rescale(xk), coef, out)
    if xk.size < SERIAL_MAX:
        _SER._train_wide(xk, *args, stats[0], stats[1], stats[2])
        return True
    if xk.shape[1] < threads():
        return False
    with guard():
        _PAR._train_wide(xk, *args, stats[0], stats[1], stats[2])
    return True


def backward_wide_direct(xk, dyk, mean, inv, k, batch_stats, coef, out, s1, s2) -> bool:
    """The fused backward of an ``(N, C, I)`` view (``I >= WIDE_INNER``, each channel block
    within :data:`FUSE_BYTES`) with ``h = 1`` into caller-made arrays: the torch adapter's
    one-call route, without :func:`backward`'s plan and allocations (the same kernel as
    :func:`backward` picks, so the same bits). ``coef`` (5, C) in the working precision
    is scratch; ``s1``, ``s2`` (float64) receive ``sum(dy)`` and ``sum(dy * (x - mean))``.
    Serial below :data:`SERIAL_MAX` elements, parallel over the channels above; returns
    False, doing nothing, where :func:`backward` would not fuse (fewer channels than
    threads above :data:`SERIAL_MAX`: it then makes two passes)."""
    h = _ones(xk.shape[1])
    if xk.size < SERIAL_MAX:
        _SER._backward_wide(xk, dyk, mean, inv, k, h, batch_stats, coef, out, s1, s2)
        return True
    if xk.shape[1] < threads():
        return False
    with guard():
        _PAR._backward_wide(xk, dyk, mean, inv, k, h, batch_stats, coef, out, s1, s2)
    return True


_ONES: dict = {}


def _ones(c: int) -> np.ndarray:
    """A cached float64 vector of ``c`` ones (read only by the kernels)."""
    a = _ONES.get(c)
    if a is None:
        if len(_ONES) > 256:
            _ONES.clear()
        a = _ONES[c] = np.ones(c)
    return a


# name -> dispatcher of every kernel the drivers call (a kernel set holds one of each)
_KERNELS = {k.py_func.__name__: k for k in (*reductions.KERNELS, *passes.KERNELS)}
_PAR = _Kernels(serial=False)
_SER = _Kernels(serial=True)
_NO_GUARD = contextlib.nullcontext()


def kernel(name: str, serial: bool):
    """The compiled kernel ``name`` (e.g. ``"_train_wide"``), its serial copy or the parallel
    one, for callers that are compiled themselves (:mod:`.centry`)."""
    return getattr(_SER if serial else _PAR, name)
