"""The reductions: per-feature statistics and the two gradient sums (float64).

Statistics are shifted sums of ``d = x - s`` and ``d^2`` in float64, with ``s`` one sample
of each feature, so there is no cancellation whatever the offset. If a float64 sum
overflows while the data are finite (|x| near 1e308), the feature is summed again on
``x * 2**-600`` (a power of two: exact) and the result scaled back.

The parallel kernels return chunked partial sums (one row per chunk of ``O``), which the
drivers in :mod:`batchnorm.backends.numba.kernels` merge. Their result arrays are allocated
with ``np.empty`` and filled entirely by the tasks: in a ``parallel=True`` function numba
turns ``np.zeros`` outside the ``prange`` into a parallel region of its own, i.e. one more
thread launch and barrier per call, which on shared cores costs a scheduler time slice
whenever a worker thread has to wait for a busy core.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...core import coef as F
from . import coef as _jitable  # noqa: F401  (registers the formulas with numba)
from .half import ld
from .options import FASTMATH, OPTS


# --------------------------------------------------------------------------- helpers
@njit(fastmath=FASTMATH, cache=True, inline="always")
def total(a):  # pragma: no cover - compiled
    """Sum of a float64 vector with eight independent partial sums (a plain loop would be
    one serial chain of dependent additions, since reassociation is off)."""
    n = a.size
    n8 = n - n % 8
    # eight scalars, not an array: no allocation per call (a call per feature per kernel)
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = 0.0
    for i in range(0, n8, 8):
        p0 += a[i]
        p1 += a[i + 1]
        p2 += a[i + 2]
        p3 += a[i + 3]
        p4 += a[i + 4]
        p5 += a[i + 5]
        p6 += a[i + 6]
        p7 += a[i + 7]
    for i in range(n8, n):
        p0 += a[i]
    return ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))


@njit(cache=True, error_model="numpy", fastmath=False)  # (never inherited: see options)
def finish_moments(shift, t1, t2, n, hs):  # pragma: no cover - compiled
    """(mean, biased var) from shifted sums of d = x*hs - shift over n values."""
    return F.moments_from_shifted_sums(shift, t1, t2, n, hs)


# --------------------------------------------------------------------------- statistics
@njit(**OPTS)
def _shifted_sums_rows(x, nchunks, hs):  # pragma: no cover - compiled
    """x (O, K): per column shift (first row) and chunked sums of d and d^2, float64.

    Accumulates four rows per sweep over the per-column accumulators, which quarters the
    accumulator traffic (each column is still an independent float64 sum).
    """
    O, K = x.shape
    shift = np.empty(K, np.float64)
    for k in range(K):
        shift[k] = np.float64(ld(x[0, k])) * hs
    s1 = np.empty((nchunks, K), np.float64)  # every entry written by its task
    s2 = np.empty((nchunks, K), np.float64)
    for t in prange(nchunks):
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        a1 = np.zeros(K, np.float64)
        a2 = np.zeros(K, np.float64)
        o = o0
        while o + 4 <= o1:
            for k in range(K):
                sh = shift[k]
                d0 = np.float64(ld(x[o, k])) * hs - sh
                d1 = np.float64(ld(x[o + 1, k])) * hs - sh
                d2 = np.float64(ld(x[o + 2, k])) * hs - sh
                d3 = np.float64(ld(x[o + 3, k])) * hs - sh
                a1[k] += (d0 + d1) + (d2 + d3)
                a2[k] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            o += 4
        while o < o1:
            for k in range(K):
                d = np.float64(ld(x[o, k])) * hs - shift[k]
                a1[k] += d
                a2[k] += d * d
            o += 1
        s1[t, :] = a1
        s2[t, :] = a2
    return shift, s1, s2


@njit(**OPTS)
def _shifted_sums_wide(x, nchunks, hs):  # pragma: no cover - compiled
    """x (O, C, I) with wide I: per feature shift and chunked sums over (o, i), float64.

    Each task owns one feature (and a range of o) and accumulates *down the rows* into
    per-position accumulators (independent lanes, so it vectorizes without reassociation),
    then sums those once.
    """
    O, C, I = x.shape
    shift = np.empty(C, np.float64)
    for c in range(C):
        shift[c] = np.float64(ld(x[0, c, 0])) * hs
    s1 = np.empty((nchunks, C), np.float64)  # every entry written by its task
    s2 = np.empty((nchunks, C), np.float64)
    for task in prange(nchunks * C):
        t = task // C
        c = task % C
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        sh = shift[c]
        a1 = np.zeros(I, np.float64)
        a2 = np.zeros(I, np.float64)
        o = o0
        while o + 4 <= o1:  # four rows per sweep over the accumulators
            r0, r1, r2, r3 = x[o, c], x[o + 1, c], x[o + 2, c], x[o + 3, c]
            for i in range(I):
                d0 = np.float64(ld(r0[i])) * hs - sh
                d1 = np.float64(ld(r1[i])) * hs - sh
                d2 = np.float64(ld(r2[i])) * hs - sh
                d3 = np.float64(ld(r3[i])) * hs - sh
                a1[i] += (d0 + d1) + (d2 + d3)
                a2[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            o += 4
        while o < o1:
            row = x[o, c]
            for i in range(I):
                d = np.float64(ld(row[i])) * hs - sh
                a1[i] += d
                a2[i] += d * d
            o += 1
        s1[t, c] = total(a1)
        s2[t, c] = total(a2)
    return shift, s1, s2


@njit(**OPTS)
def _grad_sums_rows(x, dy, shift, h, nchunks):  # pragma: no cover - compiled
    """Chunked sums of dy and dy * (x*h - shift) per column of (O, K) arrays, float64.

    Four rows per sweep over the per-column accumulators, as in _shifted_sums_rows.
    """
    O, K = x.shape
    s1 = np.empty((nchunks, K), np.float64)  # every entry written by its task
    s2 = np.empty((nchunks, K), np.float64)
    for t in prange(nchunks):
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        a1 = np.zeros(K, np.float64)
        a2 = np.zeros(K, np.float64)
        o = o0
        while o + 4 <= o1:
            for k in range(K):
                sh, hk = shift[k], h[k]
                g0 = np.float64(ld(dy[o, k]))
                g1 = np.float64(ld(dy[o + 1, k]))
                g2 = np.float64(ld(dy[o + 2, k]))
                g3 = np.float64(ld(dy[o + 3, k]))
                a1[k] += (g0 + g1) + (g2 + g3)
                a2[k] += (
                    g0 * (np.float64(ld(x[o, k])) * hk - sh)
                    + g1 * (np.float64(ld(x[o + 1, k])) * hk - sh)
                ) + (
                    g2 * (np.float64(ld(x[o + 2, k])) * hk - sh)
                    + g3 * (np.float64(ld(x[o + 3, k])) * hk - sh)
                )
            o += 4
        while o < o1:
            for k in range(K):
                g = np.float64(ld(dy[o, k]))
                a1[k] += g
                a2[k] += g * (np.float64(ld(x[o, k])) * h[k] - shift[k])
            o += 1
        s1[t, :] = a1
        s2[t, :] = a2
    return s1, s2


@njit(**OPTS)
def _grad_sums_wide(x, dy, shift, h, nchunks):  # pragma: no cover - compiled
    """Chunked sums of dy and dy * (x*h - shift) per feature of (O, C, I) arrays."""
    O, C, I = x.shape
    s1 = np.empty((nchunks, C), np.float64)  # every entry written by its task
    s2 = np.empty((nchunks, C), np.float64)
    for task in prange(nchunks * C):
        t = task // C
        c = task % C
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        sh, hc = shift[c], h[c]
        a1 = np.zeros(I, np.float64)
        a2 = np.zeros(I, np.float64)
        for o in range(o0, o1):
            xr = x[o, c]
            gr = dy[o, c]
            for i in range(I):
                g = np.float64(ld(gr[i]))
                a1[i] += g
                a2[i] += g * (np.float64(ld(xr[i])) * hc - sh)
        s1[t, c] = total(a1)
        s2[t, c] = total(a2)
    return s1, s2


# the kernels the drivers call through a kernel set (each also gets a serial copy)
KERNELS = (_shifted_sums_rows, _shifted_sums_wide, _grad_sums_rows, _grad_sums_wide)
