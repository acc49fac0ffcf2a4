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

import math

from .._xp import is_jax, is_torch
from .ops import where

__all__ = [
    "BLOCK",
    "SMALL",
    "SQUARE_LIMIT",
    "accurate_sum",
    "blocked_sum",
    "cut",
    "pairwise_sum",
    "shifted_sums",
    "square_scale",
    "squares",
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
    if sdt != xp.float64:
        return pairwise_sum(xp, v, red)
    if v.dtype == sdt:
        return xp.sum(v, axis=red, keepdims=True)
    if is_torch(xp):
        return blocked_sum(xp, v, red, sdt)
    return xp.sum(v, axis=red, dtype=sdt, keepdims=True)


def shifted_sums(xp, xw, red: tuple[int, ...], sdt, n: int):
    """The two passes: ``(shift, d, sum(d), sum(d*d))`` with ``d = x - shift`` in the
    working dtype and ``shift`` (per feature, broadcast shape) in ``sdt``."""
    sample = xw[tuple(slice(0, 1) if i in red else slice(None) for i in range(xw.ndim))]
    # pass 1: offsets from one sample per feature cancel exactly, whatever the mean
    m1 = xp.astype(sample, sdt) + accurate_sum(xp, xw - sample, red, sdt) / n
    shift = xp.astype(m1, xw.dtype)  # the first mean as the data can hold it
    d = xw - shift  # pass 2: exact near the mean (Sterbenz)
    if is_jax(xp):  # traceable: the scale is always applied (arithmetic, no branch)
        h = square_scale(xp, d, red, sdt)
        t2 = accurate_sum(xp, squares(xp, d, h), red, sdt) / (h * h)
    else:  # eager libraries: scale only when a square overflowed (an O(C) check)
        t2 = accurate_sum(xp, d * d, red, sdt)
        if not bool(xp.all(xp.isfinite(t2))):
            h = square_scale(xp, d, red, sdt)
            t2 = accurate_sum(xp, squares(xp, d, h), red, sdt) / (h * h)
    return xp.astype(shift, sdt), d, accurate_sum(xp, d, red, sdt), t2


#: Largest |d| (a power of two) whose square the working dtype still holds with room to sum.
SQUARE_LIMIT = {4: 2.0**60, 8: 2.0**500}


def square_scale(xp, d, red: tuple[int, ...], sdt):
    """Per feature, the power of two ``h`` (in ``sdt``) that keeps ``(h d)^2`` finite in the
    working dtype: 1 unless ``max|d|`` exceeds :data:`SQUARE_LIMIT` (data spanning more
    than ~1e18 in float32), then the exact power of two that brings it below. No branch:
    the scale is arithmetic, so the pass still traces under ``jax.jit``."""
    limit = SQUARE_LIMIT[8 if d.dtype == xp.float64 else 4]
    top = xp.maximum(xp.max(d, axis=red, keepdims=True), -xp.min(d, axis=red, keepdims=True))
    top = xp.astype(top, sdt)
    over = top > limit
    safe = where(over, top, 1.0)  # log2 of the features that need a scale only
    e = xp.ceil(xp.log2(safe)) - math.log2(limit)
    return where(over, 2.0 ** (-e), 1.0)


def squares(xp, d, h):
    """``(h d)^2`` in the working dtype (``h`` exactly a power of two, or 1)."""
    hd = d * xp.astype(h, d.dtype)
    hd *= hd
    return hd
