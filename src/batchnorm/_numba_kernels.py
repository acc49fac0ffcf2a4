"""Fused compiled CPU kernels (numba), with the same contracts as :mod:`batchnorm.functional`.

Batch norm is memory-bound, so the kernels are arranged to touch memory as few times as
possible:

* train forward: one pass for the statistics (shifted sums of ``x - s`` and ``(x - s)^2`` in
  float64, with ``s`` one sample of each feature, so there is no cancellation whatever the
  offset) and one pass that reads ``x`` and writes ``y``;
* eval forward: one pass;
* backward: one pass for ``sum(dy)`` and ``sum(dy * (x - mean))``, one pass for ``dx``.

Every layout is first viewed as ``(O, C, I)``: O = the axes before the feature axis (or
adjacent feature axes, merged), C = the features, I = the axes after. Wide inner blocks
(I >= 32, e.g. NCHW) run a 3-D loop; otherwise the array is treated as ``(O, C*I)`` rows
(channels-last and ``(N, D)`` have I = 1) and vectorized along the row. Work is split over
threads in chunks of O (and features). Inputs that are not C-contiguous are copied once.
float16 inputs are computed through a float32 copy.

The elementwise passes use the same rounding-safe form as the NumPy path:
``y = (x - s) * a + b`` where ``s`` is the mean rounded to the working precision, so ``x - s``
is exact for data far from zero. Fast-math lets LLVM reassociate (vectorize reductions) and
contract to FMA, but never assumes the absence of NaN or Inf, which therefore propagate.

Nothing is compiled at import: numba compiles each kernel on first use and caches the
machine code on disk (``cache=True``).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import njit, prange

# Contract to FMA and ignore the sign of zero, but never assume "no NaN/Inf" (they must
# propagate) and never reassociate: reassociation may rewrite sum(x - s) as sum(x) - n*s or
# (x - s)*a as x*a - s*a, which is exactly the cancellation the shift exists to avoid.
# Reductions are instead vectorized by hand with independent accumulators.
_FASTMATH = {"contract", "nsz", "arcp"}
_OPTS = {"parallel": True, "fastmath": _FASTMATH, "cache": True, "nogil": True}
WIDE_INNER = 32


# --------------------------------------------------------------------------- statistics
@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _total(a):  # pragma: no cover - compiled
    """Sum of a float64 vector with eight independent partial sums (a plain loop would be
    one serial chain of dependent additions, since reassociation is off)."""
    n = a.size
    n8 = n - n % 8
    p = np.zeros(8, np.float64)
    for i in range(0, n8, 8):
        for j in range(8):
            p[j] += a[i + j]
    for i in range(n8, n):
        p[0] += a[i]
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))



@njit(**_OPTS)
def _shifted_sums_rows(x, nchunks):  # pragma: no cover - compiled
    """x (O, K): per column shift (first row) and chunked sums of d and d^2, float64.

    Accumulates four rows per sweep over the per-column accumulators, which quarters the
    accumulator traffic (each column is still an independent float64 sum).
    """
    O, K = x.shape
    shift = np.empty(K, np.float64)
    for k in range(K):
        shift[k] = x[0, k]
    s1 = np.zeros((nchunks, K), np.float64)
    s2 = np.zeros((nchunks, K), np.float64)
    for t in prange(nchunks):
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        a1 = np.zeros(K, np.float64)
        a2 = np.zeros(K, np.float64)
        o = o0
        while o + 4 <= o1:
            for k in range(K):
                sh = shift[k]
                d0 = np.float64(x[o, k]) - sh
                d1 = np.float64(x[o + 1, k]) - sh
                d2 = np.float64(x[o + 2, k]) - sh
                d3 = np.float64(x[o + 3, k]) - sh
                a1[k] += (d0 + d1) + (d2 + d3)
                a2[k] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            o += 4
        while o < o1:
            for k in range(K):
                d = np.float64(x[o, k]) - shift[k]
                a1[k] += d
                a2[k] += d * d
            o += 1
        s1[t, :] = a1
        s2[t, :] = a2
    return shift, s1, s2


@njit(**_OPTS)
def _shifted_sums_wide(x, nchunks):  # pragma: no cover - compiled
    """x (O, C, I) with wide I: per feature shift and chunked sums over (o, i), float64.

    Each task owns one feature (and a range of o) and accumulates *down the rows* into
    per-position accumulators (independent lanes, so it vectorizes without reassociation),
    then sums those once.
    """
    O, C, I = x.shape
    shift = np.empty(C, np.float64)
    for c in range(C):
        shift[c] = x[0, c, 0]
    s1 = np.zeros((nchunks, C), np.float64)
    s2 = np.zeros((nchunks, C), np.float64)
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
                d0 = np.float64(r0[i]) - sh
                d1 = np.float64(r1[i]) - sh
                d2 = np.float64(r2[i]) - sh
                d3 = np.float64(r3[i]) - sh
                a1[i] += (d0 + d1) + (d2 + d3)
                a2[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            o += 4
        while o < o1:
            row = x[o, c]
            for i in range(I):
                d = np.float64(row[i]) - sh
                a1[i] += d
                a2[i] += d * d
            o += 1
        s1[t, c] = _total(a1)
        s2[t, c] = _total(a2)
    return shift, s1, s2


@njit(**_OPTS)
def _grad_sums_rows(x, dy, shift, nchunks):  # pragma: no cover - compiled
    """Chunked sums of dy and dy * (x - shift) per column of (O, K) arrays, float64."""
    O, K = x.shape
    s1 = np.zeros((nchunks, K), np.float64)
    s2 = np.zeros((nchunks, K), np.float64)
    for t in prange(nchunks):
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        a1 = np.zeros(K, np.float64)
        a2 = np.zeros(K, np.float64)
        o = o0
        while o + 4 <= o1:  # four rows per sweep, as in _shifted_sums_rows
            for k in range(K):
                sh = shift[k]
                g0 = np.float64(dy[o, k])
                g1 = np.float64(dy[o + 1, k])
                g2 = np.float64(dy[o + 2, k])
                g3 = np.float64(dy[o + 3, k])
                a1[k] += (g0 + g1) + (g2 + g3)
                a2[k] += (
                    g0 * (np.float64(x[o, k]) - sh) + g1 * (np.float64(x[o + 1, k]) - sh)
                ) + (g2 * (np.float64(x[o + 2, k]) - sh) + g3 * (np.float64(x[o + 3, k]) - sh))
            o += 4
        while o < o1:
            for k in range(K):
                g = np.float64(dy[o, k])
                a1[k] += g
                a2[k] += g * (np.float64(x[o, k]) - shift[k])
            o += 1
        s1[t, :] = a1
        s2[t, :] = a2
    return s1, s2


@njit(**_OPTS)
def _grad_sums_wide(x, dy, shift, nchunks):  # pragma: no cover - compiled
    O, C, I = x.shape
    s1 = np.zeros((nchunks, C), np.float64)
    s2 = np.zeros((nchunks, C), np.float64)
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
            x0, x1, x2, x3 = x[o, c], x[o + 1, c], x[o + 2, c], x[o + 3, c]
            y0, y1, y2, y3 = dy[o, c], dy[o + 1, c], dy[o + 2, c], dy[o + 3, c]
            for i in range(I):
                g0 = np.float64(y0[i])
                g1 = np.float64(y1[i])
                g2 = np.float64(y2[i])
                g3 = np.float64(y3[i])
                a1[i] += (g0 + g1) + (g2 + g3)
                a2[i] += (g0 * (np.float64(x0[i]) - sh) + g1 * (np.float64(x1[i]) - sh)) + (
                    g2 * (np.float64(x2[i]) - sh) + g3 * (np.float64(x3[i]) - sh)
                )
            o += 4
        while o < o1:
            xr = x[o, c]
            gr = dy[o, c]
            for i in range(I):
                g = np.float64(gr[i])
                a1[i] += g
                a2[i] += g * (np.float64(xr[i]) - sh)
            o += 1
        s1[t, c] = _total(a1)
        s2[t, c] = _total(a2)
    return s1, s2


# --------------------------------------------------------------------------- elementwise
@njit(**_OPTS)
def _affine_rows(x, s, a, b, out, nchunks):  # pragma: no cover - compiled
    """out = (x - s) * a + b per column, in the working precision of s/a/b."""
    O, K = x.shape
    for t in prange(nchunks):
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        for o in range(o0, o1):
            for k in range(K):
                out[o, k] = (x[o, k] - s[k]) * a[k] + b[k]


@njit(**_OPTS)
def _affine_wide(x, s, a, b, out):  # pragma: no cover - compiled
    O, C, I = x.shape
    for task in prange(O * C):
        o = task // C
        c = task % C
        sc, ac, bc = s[c], a[c], b[c]
        for i in range(I):
            out[o, c, i] = (x[o, c, i] - sc) * ac + bc


@njit(**_OPTS)
def _dx_rows(x, dy, s, a, p, q, out, nchunks):  # pragma: no cover - compiled
    """out = a * dy + p * (x - s) + q per column (the batch-norm input gradient)."""
    O, K = x.shape
    for t in prange(nchunks):
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        for o in range(o0, o1):
            for k in range(K):
                out[o, k] = a[k] * dy[o, k] + p[k] * (x[o, k] - s[k]) + q[k]


@njit(**_OPTS)
def _dx_wide(x, dy, s, a, p, q, out):  # pragma: no cover - compiled
    O, C, I = x.shape
    for task in prange(O * C):
        o = task // C
        c = task % C
        sc, ac, pc, qc = s[c], a[c], p[c], q[c]
        for i in range(I):
            out[o, c, i] = ac * dy[o, c, i] + pc * (x[o, c, i] - sc) + qc


# --------------------------------------------------------------------------- float16
# NumPy's float16 <-> float32 conversions are slow on this kind of build (~20x a copy for
# float32 -> float16), so float16 data cross over with two small parallel kernels: a table
# lookup in (exact), and round-to-nearest-even bit arithmetic out.
_HALF_TABLE = None


def _half_table() -> np.ndarray:
    global _HALF_TABLE
    if _HALF_TABLE is None:
        _HALF_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    return _HALF_TABLE


@njit(**_OPTS)
def _half_to_float(bits, table, out, nchunks):  # pragma: no cover - compiled
    n = bits.size
    for t in prange(nchunks):
        for i in range(t * n // nchunks, (t + 1) * n // nchunks):
            out[i] = table[bits[i]]


@njit(**_OPTS)
def _float_to_half(u, out, nchunks):  # pragma: no cover - compiled
    """float32 bit patterns -> float16 bit patterns, rounding to nearest even.

    Branch-free (every case computed, then selected) so that it vectorizes.
    """
    n = u.size
    for t in prange(nchunks):
        for i in range(t * n // nchunks, (t + 1) * n // nchunks):
            x = np.int64(u[i])
            sign = (x >> 16) & 0x8000
            a = x & 0x7FFFFFFF
            # normal float16: rebias the exponent, round the mantissa 23 -> 10 bits
            m = a - (112 << 23)
            normal = (m + 0xFFF + ((m >> 13) & 1)) >> 13
            # subnormal float16: the value in units of 2^-24, rounded to nearest even
            shift = min(max(126 - (a >> 23), 1), 31)
            mant = (a & 0x7FFFFF) | 0x800000
            q = mant >> shift
            rem = mant & ((1 << shift) - 1)
            half = 1 << (shift - 1)
            sub = q + ((rem > half) | ((rem == half) & ((q & 1) == 1)))
            h = normal if a >= 0x38800000 else (sub if a >= 0x33000000 else 0)
            h = 0x7C00 if a >= 0x477FF000 else h  # >= 65520 rounds to infinity
            h = (0x7E00 if a > 0x7F800000 else 0x7C00) if a >= 0x7F800000 else h  # NaN, inf
            out[i] = np.uint16(sign | h)


def _chunks(n: int) -> int:
    return max(1, min(n // 4096, 4 * _threads()))


def half_to_float(x: np.ndarray) -> np.ndarray:
    """float16 array -> C-contiguous float32 array (exact)."""
    bits = np.ascontiguousarray(x).view(np.uint16).reshape(-1)
    out = np.empty(x.shape, np.float32)
    _half_to_float(bits, _half_table(), out.reshape(-1), _chunks(bits.size))
    return out


def float_to_half(y: np.ndarray) -> np.ndarray:
    """C-contiguous float32 array -> float16 array, rounded to nearest even."""
    out = np.empty(y.shape, np.float16)
    _float_to_half(y.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16),
                   _chunks(y.size))
    return out


def _to_dtype(out: np.ndarray, dtype) -> np.ndarray:
    return float_to_half(out) if dtype == np.float16 else out.astype(dtype, copy=False)


# --------------------------------------------------------------------------- drivers
@functools.lru_cache(maxsize=1)
def _threads() -> int:
    """Threads to plan work for (numba.get_num_threads costs ~9 us a call, so it is read
    once; a later numba.set_num_threads only changes how work is chunked, never results)."""
    return numba.get_num_threads()


@functools.lru_cache(maxsize=256)
def plan_for(shape: tuple[int, ...], axes: tuple[int, ...], threads: int) -> Plan:
    """The (cached) plan for one shape, feature axes and thread count."""
    return Plan(shape, axes, threads)


class Plan:
    """How an array of a given shape and feature axes maps onto the kernels' views."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], threads: int):
        first, last = axes[0], axes[-1]
        self.O = math.prod(shape[:first])
        self.C = math.prod(shape[first : last + 1])
        self.I = math.prod(shape[last + 1 :])
        self.wide = self.I >= WIDE_INNER
        if self.wide:  # tasks are (chunk of O, feature): split O only if too few features
            self.nchunks = max(1, min(self.O, -(-4 * threads // self.C)))
        else:  # tasks are chunks of rows, one per thread (measured best)
            self.nchunks = max(1, min(self.O, threads))
        self.count = self.O * self.I

    def view(self, arr: np.ndarray) -> np.ndarray:
        if self.wide:
            return arr.reshape(self.O, self.C, self.I)
        return arr.reshape(self.O, self.C * self.I)

    def per_column(self, v: np.ndarray) -> np.ndarray:
        """Expand a per-feature vector to the kernel's columns."""
        v = np.ascontiguousarray(v.reshape(self.C))
        return v if self.wide or self.I == 1 else np.repeat(v, self.I)


def supported(axes: tuple[int, ...]) -> bool:
    """The compiled kernels need the feature axes to be adjacent (one block in memory)."""
    return axes[-1] - axes[0] == len(axes) - 1


def _work_array(x: np.ndarray) -> np.ndarray:
    """C-contiguous array in a dtype the kernels take (float16 goes through float32)."""
    if x.dtype == np.float16:
        return half_to_float(x)
    return np.ascontiguousarray(x)


def _merge_columns(plan: Plan, shift, s1, s2):
    """Per-feature (mean, biased var) from per-column shifted sums (Chan's merge)."""
    s1, s2 = s1.sum(axis=0), s2.sum(axis=0)
    if plan.wide or plan.I == 1:
        n = plan.count
        d = s1 / n
        return shift + d, np.maximum(s2 / n - d * d, 0.0)
    n_col = plan.O
    col_d = s1 / n_col
    col_mean = (shift + col_d).reshape(plan.C, plan.I)
    col_m2 = np.maximum(s2 - n_col * col_d * col_d, 0.0).reshape(plan.C, plan.I)
    mean = col_mean.mean(axis=1)
    m2 = col_m2.sum(axis=1) + n_col * ((col_mean - mean[:, None]) ** 2).sum(axis=1)
    return mean, m2 / plan.count


def moments(xw: np.ndarray, axes: tuple[int, ...]):
    """Per-feature float64 mean and biased variance of a work array (flat vectors)."""
    plan = plan_for(xw.shape, axes, _threads())
    v = plan.view(xw)
    if plan.wide:
        shift, s1, s2 = _shifted_sums_wide(v, plan.nchunks)
    else:
        shift, s1, s2 = _shifted_sums_rows(v, plan.nchunks)
    return _merge_columns(plan, shift, s1, s2)


def affine(xw: np.ndarray, axes, mean, scale, bias, out_dtype) -> np.ndarray:
    """``(x - mean) * scale + bias`` per feature (float64 vectors), rounding-safe."""
    plan = plan_for(xw.shape, axes, _threads())
    wt = xw.dtype
    s = mean.astype(wt)
    b = bias - (mean - s.astype(np.float64)) * scale
    out = np.empty(xw.shape, wt)
    args = (plan.per_column(s), plan.per_column(scale.astype(wt)), plan.per_column(b.astype(wt)))
    if plan.wide:
        _affine_wide(plan.view(xw), *args, plan.view(out))
    else:
        _affine_rows(plan.view(xw), *args, plan.view(out), plan.nchunks)
    return _to_dtype(out, out_dtype)


def grad_sums(xw: np.ndarray, dyw: np.ndarray, axes, mean):
    """Per-feature float64 ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    plan = plan_for(xw.shape, axes, _threads())
    col_shift = plan.per_column(mean.astype(np.float64))
    if plan.wide:
        s1, s2 = _grad_sums_wide(plan.view(xw), plan.view(dyw), col_shift, plan.nchunks)
    else:
        s1, s2 = _grad_sums_rows(plan.view(xw), plan.view(dyw), col_shift, plan.nchunks)
    s1, s2 = s1.sum(axis=0), s2.sum(axis=0)
    if not plan.wide and plan.I > 1:
        s1, s2 = s1.reshape(plan.C, plan.I).sum(1), s2.reshape(plan.C, plan.I).sum(1)
    return s1, s2


def input_grad(xw, dyw, axes, mean, k, p, q, out_dtype):
    """``dx = k * dy + p * (x - mean) + q`` per feature, rounding-safe."""
    plan = plan_for(xw.shape, axes, _threads())
    wt = xw.dtype
    s = mean.astype(wt)
    q = q + p * (s.astype(np.float64) - mean)  # fold the rounding of the shift into q
    out = np.empty(xw.shape, wt)
    cols = [plan.per_column(v) for v in (s, k.astype(wt), p.astype(wt), q.astype(wt))]
    if plan.wide:
        _dx_wide(plan.view(xw), plan.view(dyw), *cols, plan.view(out))
    else:
        _dx_rows(plan.view(xw), plan.view(dyw), *cols, plan.view(out), plan.nchunks)
    return _to_dtype(out, out_dtype)


def as_work(arr: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``arr`` (e.g. dy) as a C-contiguous array of the work array's dtype."""
    if arr.dtype == np.float16 and like.dtype == np.float32:
        return half_to_float(arr)
    return np.ascontiguousarray(arr, dtype=like.dtype)


# --------------------------------------------------------------------------- the backend
class NumbaBackend:
    """The compiled backend; same contract as :class:`batchnorm._numpy_kernels.NumpyBackend`.

    Per-feature arguments and results are float64 arrays of the per-feature shape. ``xw``
    is the array returned by :meth:`work` (a C-contiguous float32/float64 array; float16
    data are converted once, in the forward pass, and the cache keeps the result for the
    backward pass).
    """

    name = "numba"

    @staticmethod
    def supports(axes: tuple[int, ...]) -> bool:
        """Whether this backend handles these feature axes (they must be adjacent)."""
        return supported(axes)

    @staticmethod
    def work(x: np.ndarray) -> np.ndarray:
        """The array the kernels read: C-contiguous, float16 converted to float32."""
        return _work_array(x)

    @staticmethod
    def work_dy(dy: np.ndarray, xw: np.ndarray) -> np.ndarray:
        """``dy`` in the layout and dtype of the work array."""
        return as_work(dy, xw)

    @staticmethod
    def moments(xw: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 mean and biased variance."""
        fshape = tuple(xw.shape[a] for a in axes)
        mean, var = moments(_work_array(xw), axes)
        return mean.reshape(fshape), var.reshape(fshape)

    @staticmethod
    def affine(xw, axes, mean, scale, bias, dtype) -> np.ndarray:
        """``y = (x - mean) * scale + bias`` per feature, returned in ``dtype``."""
        return affine(_work_array(xw), axes, mean.ravel(), scale.ravel(), bias.ravel(), dtype)

    @staticmethod
    def grad_sums(xw, dyw, axes, mean) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 ``sum(dy)`` and ``sum(dy * (x - mean))``."""
        fshape = mean.shape
        xw = _work_array(xw)
        s1, s2 = grad_sums(xw, as_work(dyw, xw), axes, mean.ravel())
        return s1.reshape(fshape), s2.reshape(fshape)

    @staticmethod
    def input_grad(xw, dyw, axes, mean, k, p, q, dtype) -> np.ndarray:
        """``dx = k * dy + p * (x - mean) + q`` per feature, returned in ``dtype``."""
        xw = _work_array(xw)
        return input_grad(
            xw, as_work(dyw, xw), axes, mean.ravel(), k.ravel(), p.ravel(), q.ravel(), dtype
        )
