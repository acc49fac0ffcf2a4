"""Accurate per-feature sums for the array-API passes.

:func:`accurate_sum` is the one entry: it sums over the reduced axes (keepdims) with the
accumulation the statistics dtype ``sdt`` allows, using standard Array API calls only (no
data-dependent branching, so it traces under ``jax.jit``):

* float64 ``sdt`` and float64 data: ``xp.sum``;
* float64 ``sdt``, float32 data, torch: :func:`blocked_sum` (torch's ``sum(dtype=float64)``
  of a float32 tensor is ~35x slower than its float32 sum: float32 sums over blocks of about
  :data:`BLOCK` values, whose block sums are added in float64; torch's float32 sums are
  cascaded, measured error below ``8 u sum|v|`` per block, ``u = 2^-24``);
* float64 ``sdt``, float32 data, other namespaces: ``xp.sum(..., dtype=float64)``;
* float32 ``sdt`` (no float64 on the device): :func:`pairwise_sum`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .._xp import cond, is_jax, is_torch, work_dtype
from .coef import moments_from_shifted_sums
from .ops import where

__all__ = [
    "BLOCK",
    "SMALL",
    "RANGE_LIMIT",
    "RANGE_UP",
    "TINY_VAR",
    "accurate_sum",
    "blocked_sum",
    "cut",
    "in_range",
    "moments_of",
    "pairwise_sum",
    "range_scale",
    "shifted_sums",
]

#: Values per float32 partial sum before the partial sums are added in float64 (torch).
BLOCK = 1024

#: Arrays up to this size are summed with ``dtype=float64`` directly on torch (as fast).
SMALL = 8192


def cut(v, ax: int, start: int, stop: int):
    """``v[..., start:stop, ...]`` along axis ``ax`` (a view where the library has views)."""
    return v[(slice(None),) * ax + (slice(start, stop), ...)]


def pairwise_sum(xp, v, red: tuple[int, ...]):
    """Pairwise sum over the axes ``red`` (keepdims), in ``v``'s dtype.

    Each reduced axis is halved in turn (``v[:h] + v[h:2h]``, an odd element carried to the
    next level), so a value passes through at most ``K = sum_j ceil(log2 L_j)`` additions
    (``L_j = v.shape[j]``, ``K <= ceil(log2 n) + len(red) - 1``) and

        ``|fl(sum v) - sum v| <= K u sum|v|`` (first order; ``u`` the unit round-off).

    Parameters
    ----------
    xp : array namespace of ``v``
    v : array, any shape
    red : tuple of int
        The axes to sum over (non-negative).

    Returns
    -------
    array, ``v.shape`` with the axes ``red`` of size 1, dtype of ``v``
    """
    for ax in red:
        n = v.shape[ax]
        while n > 1:
            h = n // 2
            s = cut(v, ax, 0, h) + cut(v, ax, h, 2 * h)
            if n % 2:  # the odd one out joins the next level unchanged
                s = xp.concat([s, cut(v, ax, 2 * h, n)], axis=ax)
            v, n = s, h + n % 2
    return v


def blocked_sum(xp, v, red: tuple[int, ...], sdt):
    """Sum over ``red`` (keepdims) in ``sdt``: sums in ``v``'s dtype over blocks of about
    :data:`BLOCK` values, added in ``sdt``.

    The blocks are all reduced axes but the first (when they hold at least ``BLOCK``
    values), else runs of the first reduced axis (split into ``q`` blocks of ``b`` and a
    rest) together with the others. Arrays of at most :data:`SMALL` values are summed in
    ``sdt`` directly.

    Parameters
    ----------
    xp : array namespace of ``v``
    v : array, any shape (float32)
    red : tuple of int
        The axes to sum over (non-negative, sorted).
    sdt : dtype of ``xp``
        The accumulation dtype (float64).

    Returns
    -------
    array, ``v.shape`` with the axes ``red`` of size 1, dtype ``sdt``
    """
    shape = tuple(v.shape)
    if math.prod(shape) <= SMALL:  # a float64 sum costs no more than the blocks here
        return xp.sum(v, axis=red, dtype=sdt, keepdims=True)
    r0, inner = red[0], red[1:]
    m_in = math.prod(shape[j] for j in inner)
    if m_in * shape[r0] <= BLOCK:
        return xp.astype(xp.sum(v, axis=red, keepdims=True), sdt)
    if m_in >= BLOCK:
        part = xp.sum(v, axis=inner, keepdims=True)
        return xp.sum(xp.astype(part, sdt), axis=red, keepdims=True)
    b = -(-BLOCK // m_in)
    q = shape[r0] // b
    main = xp.reshape(cut(v, r0, 0, q * b), shape[:r0] + (q, b) + shape[r0 + 1 :])
    part = xp.sum(main, axis=(r0 + 1,) + tuple(j + 1 for j in inner), keepdims=True)
    total = xp.sum(xp.astype(part, sdt), axis=(r0,) + tuple(j + 1 for j in red), keepdims=True)
    total = xp.reshape(total, tuple(1 if i in red else n for i, n in enumerate(shape)))
    if q * b < shape[r0]:
        rest = xp.sum(cut(v, r0, q * b, shape[r0]), axis=red, keepdims=True)
        total = total + xp.astype(rest, sdt)
    return total


def accurate_sum(xp, v, red: tuple[int, ...], sdt):
    """Sum of ``v`` over ``red`` (keepdims) accumulated as ``sdt`` allows (module notes).

    Parameters
    ----------
    xp : array namespace of ``v``
    v : array, any shape, float32 or float64
    red : tuple of int
        The axes to sum over (non-negative, sorted).
    sdt : dtype of ``xp``
        The statistics dtype (float64, or float32 where the device has no float64).

    Returns
    -------
    array, ``v.shape`` with the axes ``red`` of size 1, dtype ``sdt`` (``v``'s dtype for
    float32 ``sdt``)
    """
    if xp is np and sdt == np.float64:  # NumPy's own module (its fallback backend): direct
        return np.add.reduce(v, axis=red, dtype=np.float64, keepdims=True)
    if sdt != xp.float64:
        return pairwise_sum(xp, v, red)
    if v.dtype == sdt:
        return xp.sum(v, axis=red, keepdims=True)
    if is_torch(xp):
        return blocked_sum(xp, v, red, sdt)
    return xp.sum(v, axis=red, dtype=sdt, keepdims=True)


def _two_pass(xp, xw, red: tuple[int, ...], sdt, n: int):
    """``(shift, d, sum(d))`` of the one centring: a first mean ``m1``, then ``d = x -
    shift`` with ``shift`` = ``m1`` rounded to the working dtype (exact near the mean:
    Sterbenz). ``d`` is in the working dtype also when ``xw`` is not (float16 NumPy data
    are read as they are), ``shift`` in ``sdt``.

    Pass 1 subtracts one sample of each feature and sums, so offsets far from zero cancel
    exactly, with one exception: float16/32 data accumulated in float64 by the library's
    own float64 sum (every namespace but torch, whose float32 block sums would not be
    exact) are summed as they are, since each value is exact in the accumulator; ``m1``
    is then the float64 mean and ``sum(d) = n (m1 - shift)`` (``m1 - shift`` exact), one
    pass fewer and no rounding of ``x - sample`` in float32."""
    wt = work_dtype(xp, xw.dtype)
    wide = wt != sdt and sdt == xp.float64 and not is_torch(xp)
    if wide:
        m1 = accurate_sum(xp, xw, red, sdt) / n
    else:
        sample = _as(xp, xw[_first(xw.ndim, red)], wt)
        m1 = _as(xp, sample, sdt) + accurate_sum(xp, xw - sample, red, sdt) / n
    shift = _as(xp, m1, wt)  # the first mean as the working precision can hold it
    d = xw - shift
    s = _as(xp, shift, sdt)
    return s, d, (m1 - s) * n if wide else accurate_sum(xp, d, red, sdt)


@functools.lru_cache(maxsize=256)
def _first(ndim: int, red: tuple[int, ...]) -> tuple:
    """The index of one sample per feature (the first along every reduced axis)."""
    return tuple(slice(0, 1) if i in red else slice(None) for i in range(ndim))


def _as(xp, v, dtype):
    """``v`` in ``dtype``: itself when it already is (no copy, no call into ``xp``)."""
    return v if v.dtype == dtype else xp.astype(v, dtype)


def shifted_sums(xp, xw, red: tuple[int, ...], sdt, n: int):
    """The statistics passes of the library: ``(shift, d, t1, t2, hs)`` with ``t1 =
    sum(d)``, ``t2 = sum(d*d)`` over the ``n`` values of ``d = x hs - shift`` per feature
    (:func:`batchnorm.core.coef.moments_from_shifted_sums` turns them into moments);
    ``shift`` and ``hs`` in ``sdt`` (broadcast shape; ``hs`` the Python float 1.0 unless
    the data were rescaled), ``d`` in the working dtype, or None when the data were
    rescaled (callers then form the output with the overflow scale).

    The range rule, one for every library (NumPy's fallback included): when an O(C)
    check of the sums (:func:`in_range`) finds one not finite (a difference or a square
    overflowed the working dtype: data near ``finfo.max``) or, in float32 work, a sum of
    squares below ``n`` :data:`TINY_VAR` (squares lost to underflow: data near 1e-20; a
    feature whose both sums are exactly 0 counts as constant, so a dead channel costs
    nothing), the sums are formed again on ``x hs`` with ``hs`` the per-feature power of
    two of :func:`range_scale` (exact; bit-identical results for the features that did
    not need it). Under JAX (traced) the choice is a ``jax.lax.cond``
    (:func:`_traced_sums`)."""
    if is_jax(xp):
        return _traced_sums(xp, xw, red, sdt, n)
    shift, d, t1 = _two_pass(xp, xw, red, sdt, n)
    t2 = accurate_sum(xp, d * d, red, sdt)
    if bool(in_range(xp, t1, t2, n, d.dtype)):
        return shift, d, t1, t2, 1.0
    hs = range_scale(xp, xw, red, sdt)
    xs = xw * xp.astype(hs, d.dtype)
    shift, d, t1 = _two_pass(xp, xs, red, sdt, n)
    return shift, None, t1, accurate_sum(xp, d * d, red, sdt), hs


def moments_of(shift, t1, t2, n: int, hs):
    """:func:`batchnorm.core.coef.moments_from_shifted_sums` of :func:`shifted_sums`'s
    results; for JAX's array ``hs`` the unscaled moments times ``1 / hs`` (exact), since
    XLA turns ``(var / hs) / hs`` into ``var / (hs * hs)``, which overflows float32 for
    ``hs = 2^100`` (tiny data)."""
    if isinstance(hs, float):
        return moments_from_shifted_sums(shift, t1, t2, n, hs)
    mean, var = moments_from_shifted_sums(shift, t1, t2, n, 1.0)
    ih = 1.0 / hs
    return mean * ih, (var * ih) * ih


def in_range(xp, t1, t2, n: int, wt):
    """The O(C) check of the range rule (:func:`shifted_sums`), a 0-d boolean array: every
    sum finite and, in float32 work (``wt``), every sum of squares at least ``n``
    :data:`TINY_VAR` or both sums exactly 0 (a constant feature, ``d = 0``, not tiny).
    ``xp.all`` of booleans: no maximum that could drop a NaN."""
    ok = xp.all(xp.isfinite(t1 + t2))
    if wt != xp.float64:
        ok = ok & xp.all((t2 >= TINY_VAR * n) | ((t2 == 0.0) & (t1 == 0.0)))
    return ok


def _traced_sums(xp, xw, red: tuple[int, ...], sdt, n: int):
    """:func:`shifted_sums` under JAX: the same sums and check, and a ``jax.lax.cond``
    (no Python branch on data) that keeps them or forms them again on ``x hs``. Only
    per-feature values leave the ``cond``; ``d = x hs - shift`` is formed after it, an
    elementwise expression XLA fuses into its consumers (``hs`` is exactly 1 on the kept
    branch: the same ``d`` bit for bit). ``hs`` is an array here, so callers take ``d``
    with ``hs`` (:func:`batchnorm.core.passes.train`). Ordinary data cost the check only;
    the rescaled branch reads ``x`` three more times (its maximum and two sums)."""
    wt = work_dtype(xp, xw.dtype)
    shift, d, t1 = _two_pass(xp, xw, red, sdt, n)
    t2 = accurate_sum(xp, d * d, red, sdt)

    def keep():
        return shift, t1, t2, xp.ones_like(shift)

    def rescale():
        hs = range_scale(xp, xw, red, sdt)
        s, ds, u1 = _two_pass(xp, xw * xp.astype(hs, wt), red, sdt, n)
        return s, u1, accurate_sum(xp, ds * ds, red, sdt), hs

    shift, t1, t2, hs = cond(xp, in_range(xp, t1, t2, n, wt), keep, rescale)
    d = xw * _as(xp, hs, wt) - _as(xp, shift, wt)
    return shift, d, t1, t2, hs


#: Variance below which float32 work squares are formed again on rescaled data (their
#: squares would have lost precision to underflow).
TINY_VAR = 2.0**-90

#: The magnitude (a power of two) :func:`range_scale` brings each feature's data to: their
#: differences and squares then stay finite in the working dtype and their sums in any
#: statistics dtype, and the squares of float32 work stay clear of underflow.
RANGE_LIMIT = {4: 2.0**40, 8: 2.0**400}

#: The largest upward scale of :func:`range_scale` (representable in float32).
RANGE_UP = 2.0**100


def _top(xp, v, red, sdt):
    """Per feature ``max|v|`` in ``sdt`` (broadcast shape); under JAX a NaN counts as
    infinite (XLA CPU's maximum reduction drops NaNs; NumPy's and torch's keep them)."""
    if is_jax(xp):
        v = xp.abs(v)
        return xp.astype(xp.max(where(v == v, v, math.inf), axis=red, keepdims=True), sdt)
    top = xp.maximum(xp.max(v, axis=red, keepdims=True), -xp.min(v, axis=red, keepdims=True))
    return xp.astype(top, sdt)


def _power_of_two(xp, top, limit: float, scale):
    """``2^-e`` with ``e = ceil(log2 top) - log2 limit`` where ``scale``, else 1."""
    e = xp.ceil(xp.log2(where(scale, top, 1.0))) - math.log2(limit)
    return where(scale, 2.0 ** (-e), 1.0)


def range_scale(xp, v, red: tuple[int, ...], sdt):
    """Per feature, the power of two ``h`` (in ``sdt``) that brings ``max|v|`` to about
    :data:`RANGE_LIMIT` of the working dtype, at most :data:`RANGE_UP`; 1 for a feature
    that is all zero or not finite (its NaN/Inf propagate as they are)."""
    wt = work_dtype(xp, v.dtype)
    limit = RANGE_LIMIT[8 if wt == xp.float64 else 4]
    top = _top(xp, v, red, sdt)
    h = _power_of_two(xp, top, limit, (top > 0.0) & xp.isfinite(top))
    return where(h > RANGE_UP, RANGE_UP, h)
