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

Statistics are shifted sums of ``d = x - s`` and ``d^2`` in float64, with ``s`` one sample
of each feature, so there is no cancellation whatever the offset. If a float64 sum
overflows while the data are finite (|x| near 1e308), the feature is summed again on
``x * 2**-600`` (a power of two: exact) and the result scaled back.

The elementwise passes use the same rounding-safe form as the NumPy path:
``y = (x*h - s*h) * (a/h) + b`` where ``s`` is the mean rounded to the working precision
(so ``x - s`` is exact for data far from zero) and ``h`` is a per-feature power of two,
1 unless ``x - s`` could overflow the working precision (see
:func:`batchnorm.core.coef.overflow_needed`, which the kernels compile: see
:mod:`batchnorm.backends.numba.coef`).
Fast-math lets LLVM contract to FMA, but never assumes the absence of NaN or Inf, which
therefore propagate.

float16 data are read and written as such: the kernels take their bit patterns (uint16)
and convert each value in registers (LLVM ``fpext``/``fptrunc``, i.e. F16C instructions
where the CPU has them; round to nearest even), so no float32 copy is ever made.

Threads: under numba's ``workqueue`` threading layer (the fallback without TBB or OpenMP)
parallel kernels must not be entered from two Python threads at once (numba aborts the
process), so calls are then serialized with a lock.

Nothing is compiled at import: numba compiles each kernel on first use and caches the
machine code on disk (``cache=True``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import types as pytypes

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from ...core import coef as F
from ..numpy import RESCALE, NumpyArrays, overflow_scale, work_dtype
from . import coef as _jitable  # noqa: F401  (registers the formulas with numba)

# Contract to FMA and ignore the sign of zero, but never assume "no NaN/Inf" (they must
# propagate) and never reassociate: reassociation may rewrite sum(x - s) as sum(x) - n*s or
# (x - s)*a as x*a - s*a, which is exactly the cancellation the shift exists to avoid.
# Reductions are instead vectorized by hand with independent accumulators.
_FASTMATH = {"contract", "nsz", "arcp"}
_OPTS = {
    "parallel": True,
    "fastmath": _FASTMATH,
    "cache": True,
    "nogil": True,
    "error_model": "numpy",  # x/0 is inf or NaN, as in NumPy (never an exception)
}
_SERIAL_OPTS = {**_OPTS, "parallel": False}
# Below this many elements the kernels run serially in the calling thread: a parallel
# launch costs tens of microseconds, more than a small array's whole pass.
SERIAL_MAX = 1 << 15
WIDE_INNER = 32
# Bytes of one array a fused task keeps in cache (a channel block or a strip of columns).
# L2 is 1-2 MB per core; the fused kernels re-read the block right after summing it, so a
# block that spills to the (shared) L3 still avoids DRAM. Measured on 2 cores with a 32 MB
# L3: 4 MB blocks keep the fused passes at DRAM speed.
FUSE_BYTES = 4 << 20
# Most rows a fused strip of columns may span (see Plan).
ROWS_FUSE_MAX = 2048


# --------------------------------------------------------------------------- float16
@intrinsic
def _h2f(typingctx, bits):  # pragma: no cover - compiled
    """float16 bit pattern (uint16) -> float32, exact (LLVM fpext)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f2h(typingctx, v):  # pragma: no cover - compiled
    """float32 -> float16 bit pattern, rounded to nearest even (LLVM fptrunc)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def _ld(v):  # pragma: no cover - replaced in compiled code
    """Load one element in working precision (float16 bits -> float32; floats unchanged)."""
    raise NotImplementedError


@overload(_ld, inline="always")
def _ld_impl(v):
    if isinstance(v, types.Integer):
        return lambda v: _h2f(v)
    return lambda v: v


def _st(v, out):  # pragma: no cover - replaced in compiled code
    """A working-precision value as it is stored in ``out`` (float16 bits for uint16)."""
    raise NotImplementedError


@overload(_st, inline="always")
def _st_impl(v, out):
    if isinstance(out.dtype, types.Integer):
        return lambda v, out: _f2h(np.float32(v))
    return lambda v, out: v


@njit(parallel=True, cache=True, nogil=True)
def _h2f_array(bits, out):  # pragma: no cover - compiled
    for i in prange(bits.size):
        out[i] = _h2f(bits[i])


@njit(parallel=True, cache=True, nogil=True)
def _f2h_array(v, out):  # pragma: no cover - compiled
    for i in prange(v.size):
        out[i] = _f2h(v[i])


def half_to_float(x: np.ndarray) -> np.ndarray:
    """float16 array -> C-contiguous float32 array (exact)."""
    bits = np.ascontiguousarray(x).view(np.uint16).reshape(-1)
    out = np.empty(x.shape, np.float32)
    with _guard():
        _h2f_array(bits, out.reshape(-1))
    return out


def float_to_half(y: np.ndarray) -> np.ndarray:
    """float32 array -> float16 array, rounded to nearest even (as NumPy's astype)."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    out = np.empty(y.shape, np.float16)
    with _guard():
        _f2h_array(y.reshape(-1), out.reshape(-1).view(np.uint16))
    return out


# --------------------------------------------------------------------------- threads
_LOCK = threading.RLock()
_serialize: bool | None = None  # None until the threading layer is known


class _Guard:
    """Serializes kernel calls when numba's threading layer is not thread-safe.

    The layer is only known after the first parallel call, so calls are serialized until
    then; afterwards only the ``workqueue`` layer (which aborts the process when entered
    concurrently) takes the lock.
    """

    __slots__ = ("held",)

    def __enter__(self):
        self.held = _serialize is not False
        if self.held:
            _LOCK.acquire()
        return self

    def __exit__(self, *exc):
        global _serialize
        if self.held:
            if _serialize is None:
                try:
                    _serialize = numba.threading_layer() == "workqueue"
                except ValueError:  # no parallel kernel has run yet
                    pass
            _LOCK.release()
        return False


def _guard() -> _Guard:
    return _Guard()


# --------------------------------------------------------------------------- helpers
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


@njit(cache=True, error_model="numpy")
def _finish(shift, t1, t2, n, hs):  # pragma: no cover - compiled
    """(mean, biased var) from shifted sums of d = x*hs - shift over n values."""
    return F.moments_from_shifted_sums(shift, t1, t2, n, hs)


@njit(cache=True, error_model="numpy")
def _train_coef(mean, var, eps, g, b, m, big, coef, c):  # pragma: no cover - compiled
    """Output coefficients of one feature into coef[:, c] (working precision).

    inv = 1/sqrt(var + eps), a = inv*g; s = mean rounded to working precision; the bias
    absorbs the rounding of s; h = 1/16 when |x - s| may overflow (bound sqrt(m var) on
    |x - mean|), the rule of ``overflow_scale``.
    """
    coef[0, c] = mean
    s = np.float64(coef[0, c])  # the mean rounded to the working precision
    h = F.overflow_scale(mean, var, s, m, big)
    a_h, bias = F.output_coef(mean, F.inv_std(var, eps), g, b, s, h)
    coef[0, c] = s * h
    coef[1, c] = a_h
    coef[2, c] = bias
    coef[3, c] = h


@njit(cache=True, error_model="numpy")
def _grad_coef(s1, s2, mean, inv, k, h, m, batch_stats, coef, c):  # pragma: no cover
    """Input-gradient coefficients of one feature from its two gradient sums.

    dx = k dy + p (x - mean) + q with p = -k inv (inv s2) / m, q = -k s1 / m (batch
    statistics) or p = q = 0; written as k dy + (p/h)(x h - s h) + (q + p (s - mean)).
    """
    p = 0.0
    q = 0.0
    if batch_stats:
        p, q = F.backward_coef(s1, s2, inv, k, m)
    coef[0, c] = mean
    s = np.float64(coef[0, c])  # the mean rounded to the working precision
    p_h, q_s = F.input_grad_coef(p, q, mean, s, h)
    coef[0, c] = s * h
    coef[1, c] = k
    coef[2, c] = p_h
    coef[3, c] = q_s


# --------------------------------------------------------------------------- statistics
@njit(**_OPTS)
def _shifted_sums_rows(x, nchunks, hs):  # pragma: no cover - compiled
    """x (O, K): per column shift (first row) and chunked sums of d and d^2, float64.

    Accumulates four rows per sweep over the per-column accumulators, which quarters the
    accumulator traffic (each column is still an independent float64 sum).
    """
    O, K = x.shape
    shift = np.empty(K, np.float64)
    for k in range(K):
        shift[k] = np.float64(_ld(x[0, k])) * hs
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
                d0 = np.float64(_ld(x[o, k])) * hs - sh
                d1 = np.float64(_ld(x[o + 1, k])) * hs - sh
                d2 = np.float64(_ld(x[o + 2, k])) * hs - sh
                d3 = np.float64(_ld(x[o + 3, k])) * hs - sh
                a1[k] += (d0 + d1) + (d2 + d3)
                a2[k] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            o += 4
        while o < o1:
            for k in range(K):
                d = np.float64(_ld(x[o, k])) * hs - shift[k]
                a1[k] += d
                a2[k] += d * d
            o += 1
        s1[t, :] = a1
        s2[t, :] = a2
    return shift, s1, s2


@njit(**_OPTS)
def _shifted_sums_wide(x, nchunks, hs):  # pragma: no cover - compiled
    """x (O, C, I) with wide I: per feature shift and chunked sums over (o, i), float64.

    Each task owns one feature (and a range of o) and accumulates *down the rows* into
    per-position accumulators (independent lanes, so it vectorizes without reassociation),
    then sums those once.
    """
    O, C, I = x.shape
    shift = np.empty(C, np.float64)
    for c in range(C):
        shift[c] = np.float64(_ld(x[0, c, 0])) * hs
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
                d0 = np.float64(_ld(r0[i])) * hs - sh
                d1 = np.float64(_ld(r1[i])) * hs - sh
                d2 = np.float64(_ld(r2[i])) * hs - sh
                d3 = np.float64(_ld(r3[i])) * hs - sh
                a1[i] += (d0 + d1) + (d2 + d3)
                a2[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            o += 4
        while o < o1:
            row = x[o, c]
            for i in range(I):
                d = np.float64(_ld(row[i])) * hs - sh
                a1[i] += d
                a2[i] += d * d
            o += 1
        s1[t, c] = _total(a1)
        s2[t, c] = _total(a2)
    return shift, s1, s2


@njit(**_OPTS)
def _grad_sums_rows(x, dy, shift, h, nchunks):  # pragma: no cover - compiled
    """Chunked sums of dy and dy * (x*h - shift) per column of (O, K) arrays, float64.

    Four rows per sweep over the per-column accumulators, as in _shifted_sums_rows.
    """
    O, K = x.shape
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
                sh, hk = shift[k], h[k]
                g0 = np.float64(_ld(dy[o, k]))
                g1 = np.float64(_ld(dy[o + 1, k]))
                g2 = np.float64(_ld(dy[o + 2, k]))
                g3 = np.float64(_ld(dy[o + 3, k]))
                a1[k] += (g0 + g1) + (g2 + g3)
                a2[k] += (
                    g0 * (np.float64(_ld(x[o, k])) * hk - sh)
                    + g1 * (np.float64(_ld(x[o + 1, k])) * hk - sh)
                ) + (
                    g2 * (np.float64(_ld(x[o + 2, k])) * hk - sh)
                    + g3 * (np.float64(_ld(x[o + 3, k])) * hk - sh)
                )
            o += 4
        while o < o1:
            for k in range(K):
                g = np.float64(_ld(dy[o, k]))
                a1[k] += g
                a2[k] += g * (np.float64(_ld(x[o, k])) * h[k] - shift[k])
            o += 1
        s1[t, :] = a1
        s2[t, :] = a2
    return s1, s2


@njit(**_OPTS)
def _grad_sums_wide(x, dy, shift, h, nchunks):  # pragma: no cover - compiled
    """Chunked sums of dy and dy * (x*h - shift) per feature of (O, C, I) arrays."""
    O, C, I = x.shape
    s1 = np.zeros((nchunks, C), np.float64)
    s2 = np.zeros((nchunks, C), np.float64)
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
                g = np.float64(_ld(gr[i]))
                a1[i] += g
                a2[i] += g * (np.float64(_ld(xr[i])) * hc - sh)
        s1[t, c] = _total(a1)
        s2[t, c] = _total(a2)
    return s1, s2


# --------------------------------------------------------------------------- elementwise
@njit(**_OPTS)
def _affine_rows(x, coef, out, nchunks):  # pragma: no cover - compiled
    """out = (x*h - s*h) * (a/h) + b per column; coef rows (s*h, a/h, b, h)."""
    O, K = x.shape
    s, a, b, h = coef[0], coef[1], coef[2], coef[3]
    for t in prange(nchunks):
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        for o in range(o0, o1):
            for k in range(K):
                out[o, k] = _st((_ld(x[o, k]) * h[k] - s[k]) * a[k] + b[k], out)


@njit(**_OPTS)
def _affine_wide(x, coef, out):  # pragma: no cover - compiled
    O, C, I = x.shape
    for task in prange(O * C):
        o = task // C
        c = task % C
        sc, ac, bc, hc = coef[0, c], coef[1, c], coef[2, c], coef[3, c]
        for i in range(I):
            out[o, c, i] = _st((_ld(x[o, c, i]) * hc - sc) * ac + bc, out)


@njit(**_OPTS)
def _dx_rows(x, dy, coef, out, nchunks):  # pragma: no cover - compiled
    """out = k dy + p' (x*h - s*h) + q' per column; coef rows (s*h, k, p/h, q')."""
    O, K = x.shape
    s, k, p, q = coef[0], coef[1], coef[2], coef[3]
    h = coef[4]
    for t in prange(nchunks):
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        for o in range(o0, o1):
            for j in range(K):
                v = k[j] * _ld(dy[o, j]) + p[j] * (_ld(x[o, j]) * h[j] - s[j]) + q[j]
                out[o, j] = _st(v, out)


@njit(**_OPTS)
def _dx_wide(x, dy, coef, out):  # pragma: no cover - compiled
    O, C, I = x.shape
    for task in prange(O * C):
        o = task // C
        c = task % C
        sc, kc, pc, qc, hc = coef[0, c], coef[1, c], coef[2, c], coef[3, c], coef[4, c]
        for i in range(I):
            v = kc * _ld(dy[o, c, i]) + pc * (_ld(x[o, c, i]) * hc - sc) + qc
            out[o, c, i] = _st(v, out)


# --------------------------------------------------------------------------- fused passes
@njit(**_OPTS)
def _train_wide(x, g, b, eps, big, rescale, coef, out, mean, var):  # pragma: no cover
    """Fused training forward of (O, C, I): one task per feature block, kept in cache.

    Sums the block (shifted, float64; again on x*rescale if a sum overflowed), derives
    the coefficients, then writes the block's output while it is still in cache.
    """
    O, C, I = x.shape
    n = O * I
    for c in prange(C):
        hs = 1.0
        a1 = np.zeros(I, np.float64)
        a2 = np.zeros(I, np.float64)
        while True:
            sh = np.float64(_ld(x[0, c, 0])) * hs
            a1[:] = 0.0
            a2[:] = 0.0
            o = 0
            while o + 4 <= O:
                r0, r1, r2, r3 = x[o, c], x[o + 1, c], x[o + 2, c], x[o + 3, c]
                for i in range(I):
                    d0 = np.float64(_ld(r0[i])) * hs - sh
                    d1 = np.float64(_ld(r1[i])) * hs - sh
                    d2 = np.float64(_ld(r2[i])) * hs - sh
                    d3 = np.float64(_ld(r3[i])) * hs - sh
                    a1[i] += (d0 + d1) + (d2 + d3)
                    a2[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                o += 4
            while o < O:
                row = x[o, c]
                for i in range(I):
                    d = np.float64(_ld(row[i])) * hs - sh
                    a1[i] += d
                    a2[i] += d * d
                o += 1
            t1 = _total(a1)
            t2 = _total(a2)
            if hs != 1.0 or rescale == 1.0 or (np.isfinite(t1) and np.isfinite(t2)):
                break
            hs = rescale
        mu, v = _finish(sh, t1, t2, n, hs)
        mean[c] = mu
        var[c] = v
        _train_coef(mu, v, eps, g[c], b[c], n, big, coef, c)
        sc, ac, bc, hc = coef[0, c], coef[1, c], coef[2, c], coef[3, c]
        for o in range(O):
            for i in range(I):
                out[o, c, i] = _st((_ld(x[o, c, i]) * hc - sc) * ac + bc, out)


@njit(**_OPTS)
def _train_rows(x, g, b, eps, big, rescale, width, coef, out, mean, var):  # pragma: no cover
    """Fused training forward of (O, K) (features = columns) in strips of columns.

    One task per strip of ``width`` columns: O x width values that fit in cache.
    """
    O, K = x.shape
    nstrips = (K + width - 1) // width
    for t in prange(nstrips):
        k0 = t * width
        w = min(K, k0 + width) - k0
        sh = np.empty(w, np.float64)
        a1 = np.zeros(w, np.float64)
        a2 = np.zeros(w, np.float64)
        hs = 1.0
        while True:
            for j in range(w):
                sh[j] = np.float64(_ld(x[0, k0 + j])) * hs
            a1[:] = 0.0
            a2[:] = 0.0
            o = 0
            while o + 4 <= O:
                for j in range(w):
                    sj = sh[j]
                    d0 = np.float64(_ld(x[o, k0 + j])) * hs - sj
                    d1 = np.float64(_ld(x[o + 1, k0 + j])) * hs - sj
                    d2 = np.float64(_ld(x[o + 2, k0 + j])) * hs - sj
                    d3 = np.float64(_ld(x[o + 3, k0 + j])) * hs - sj
                    a1[j] += (d0 + d1) + (d2 + d3)
                    a2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                o += 4
            while o < O:
                for j in range(w):
                    d = np.float64(_ld(x[o, k0 + j])) * hs - sh[j]
                    a1[j] += d
                    a2[j] += d * d
                o += 1
            finite = True
            for j in range(w):
                if not (np.isfinite(a1[j]) and np.isfinite(a2[j])):
                    finite = False
            if hs != 1.0 or rescale == 1.0 or finite:
                break
            hs = rescale
        for j in range(w):
            mu, v = _finish(sh[j], a1[j], a2[j], O, hs)
            mean[k0 + j] = mu
            var[k0 + j] = v
            _train_coef(mu, v, eps, g[k0 + j], b[k0 + j], O, big, coef, k0 + j)
        s = coef[0, k0 : k0 + w]
        a = coef[1, k0 : k0 + w]
        bb = coef[2, k0 : k0 + w]
        h = coef[3, k0 : k0 + w]
        for o in range(O):
            xr = x[o, k0 : k0 + w]
            yr = out[o, k0 : k0 + w]
            for j in range(w):
                yr[j] = _st((_ld(xr[j]) * h[j] - s[j]) * a[j] + bb[j], out)


@njit(**_OPTS)
def _backward_wide(x, dy, mean, inv, k, h, batch_stats, coef, out, s1, s2):  # pragma: no cover
    """Fused backward of (O, C, I): per feature block, both gradient sums then ``dx``."""
    O, C, I = x.shape
    n = O * I
    for c in prange(C):
        hc = h[c]
        sh = mean[c] * hc
        a1 = np.zeros(I, np.float64)
        a2 = np.zeros(I, np.float64)
        o = 0
        while o + 4 <= O:  # four rows per sweep over the accumulators
            x0, x1, x2, x3 = x[o, c], x[o + 1, c], x[o + 2, c], x[o + 3, c]
            y0, y1, y2, y3 = dy[o, c], dy[o + 1, c], dy[o + 2, c], dy[o + 3, c]
            for i in range(I):
                g0 = np.float64(_ld(y0[i]))
                g1 = np.float64(_ld(y1[i]))
                g2 = np.float64(_ld(y2[i]))
                g3 = np.float64(_ld(y3[i]))
                a1[i] += (g0 + g1) + (g2 + g3)
                a2[i] += (
                    g0 * (np.float64(_ld(x0[i])) * hc - sh)
                    + g1 * (np.float64(_ld(x1[i])) * hc - sh)
                ) + (
                    g2 * (np.float64(_ld(x2[i])) * hc - sh)
                    + g3 * (np.float64(_ld(x3[i])) * hc - sh)
                )
            o += 4
        while o < O:
            xr = x[o, c]
            gr = dy[o, c]
            for i in range(I):
                gv = np.float64(_ld(gr[i]))
                a1[i] += gv
                a2[i] += gv * (np.float64(_ld(xr[i])) * hc - sh)
            o += 1
        t1 = _total(a1)
        t2 = _total(a2) / hc
        s1[c] = t1
        s2[c] = t2
        _grad_coef(t1, t2, mean[c], inv[c], k[c], hc, n, batch_stats, coef, c)
        coef[4, c] = hc
        sc, kc, pc, qc, hw = coef[0, c], coef[1, c], coef[2, c], coef[3, c], coef[4, c]
        for o in range(O):
            for i in range(I):
                v = kc * _ld(dy[o, c, i]) + pc * (_ld(x[o, c, i]) * hw - sc) + qc
                out[o, c, i] = _st(v, out)


@njit(**_OPTS)
def _backward_rows(x, dy, mean, inv, k, h, batch_stats, width, coef, out, s1, s2):  # noqa: E501  # pragma: no cover
    """Fused backward of (O, K) in strips of columns (see :func:`_train_rows`)."""
    O, K = x.shape
    nstrips = (K + width - 1) // width
    for t in prange(nstrips):
        k0 = t * width
        w = min(K, k0 + width) - k0
        a1 = np.zeros(w, np.float64)
        a2 = np.zeros(w, np.float64)
        sh = np.empty(w, np.float64)
        hh = np.empty(w, np.float64)
        for j in range(w):
            hh[j] = h[k0 + j]
            sh[j] = mean[k0 + j] * hh[j]
        for o in range(O):
            for j in range(w):
                gv = np.float64(_ld(dy[o, k0 + j]))
                a1[j] += gv
                a2[j] += gv * (np.float64(_ld(x[o, k0 + j])) * hh[j] - sh[j])
        for j in range(w):
            c = k0 + j
            t2 = a2[j] / hh[j]
            s1[c] = a1[j]
            s2[c] = t2
            _grad_coef(a1[j], t2, mean[c], inv[c], k[c], hh[j], O, batch_stats, coef, c)
            coef[4, c] = hh[j]
        s = coef[0, k0 : k0 + w]
        kk = coef[1, k0 : k0 + w]
        p = coef[2, k0 : k0 + w]
        q = coef[3, k0 : k0 + w]
        hw = coef[4, k0 : k0 + w]
        for o in range(O):
            xr = x[o, k0 : k0 + w]
            gr = dy[o, k0 : k0 + w]
            dr = out[o, k0 : k0 + w]
            for j in range(w):
                v = kk[j] * _ld(gr[j]) + p[j] * (_ld(xr[j]) * hw[j] - s[j]) + q[j]
                dr[j] = _st(v, out)


# --------------------------------------------------------------------------- plans
@functools.lru_cache(maxsize=1)
def _threads() -> int:
    """Threads to plan work for (numba.get_num_threads costs ~9 us a call, so it is read
    once; a later numba.set_num_threads only changes how work is chunked, never results)."""
    return numba.get_num_threads()


@functools.lru_cache(maxsize=256)
def plan_for(shape: tuple[int, ...], axes: tuple[int, ...], threads: int, itemsize: int) -> Plan:
    """The (cached) plan for one shape, feature axes, thread count and item size."""
    return Plan(shape, axes, threads, itemsize)


class Plan:
    """How an array of a given shape and feature axes maps onto the kernels' views.

    ``fused`` says whether one feature's data (wide layouts: a channel block; ``I == 1``
    rows: a strip of ``width`` columns) fit in :data:`FUSE_BYTES` with work for every
    thread, so that the one-trip kernels apply.
    """

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], threads: int, itemsize: int):
        first, last = axes[0], axes[-1]
        self.shape = shape
        self.O = math.prod(shape[:first])
        self.C = math.prod(shape[first : last + 1])
        self.I = math.prod(shape[last + 1 :])
        self.wide = self.I >= WIDE_INNER
        self.count = self.O * self.I
        self.width = 0
        if self.wide:  # tasks are (chunk of O, feature): split O only if too few features
            self.nchunks = max(1, min(self.O, -(-4 * threads // self.C)))
            block = self.O * self.I * itemsize
            self.fused = self.C >= threads and block <= FUSE_BYTES
        else:  # tasks are chunks of rows, one per thread (measured best)
            self.nchunks = max(1, min(self.O, threads))
            self.fused = False
            if self.I == 1:
                per_col = self.O * itemsize
                # strips of whole cache lines (16 float32), one per thread at least
                most = max(1, FUSE_BYTES // per_col)
                share = -(-self.C // threads)
                width = min(most, share)
                if width < self.C:
                    width = max(16, width - width % 16) if width >= 16 else width
                self.width = max(1, min(width, self.C))
                # Only the serial kernels (small arrays) fuse strips: in parallel, strided
                # strips measured slower than the two passes (1.5-2x at (256, 1024) and
                # (1024, 4096) float32; 3x at (8192, 4096), where they thrash the TLB).
                self.fused = (
                    threads == 1
                    and self.O <= ROWS_FUSE_MAX
                    and per_col * min(16, self.C) <= FUSE_BYTES
                )
        self.kshape = (self.O, self.C, self.I) if self.wide else (self.O, self.C * self.I)

    def view(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (C-contiguous) in the kernels' 3-D or 2-D view; float16 as its bits."""
        if arr.dtype == np.float16:
            arr = arr.view(np.uint16)
        return arr.reshape(self.kshape)

    def per_column(self, v: np.ndarray) -> np.ndarray:
        """Expand per-feature values (last axis) to the kernel's columns."""
        if self.wide or self.I == 1:
            return np.ascontiguousarray(v)
        return np.ascontiguousarray(np.repeat(v, self.I, axis=-1))


def supported(axes: tuple[int, ...]) -> bool:
    """The compiled kernels need the feature axes to be adjacent (one block in memory)."""
    return axes[-1] - axes[0] == len(axes) - 1


def _plan(xw: np.ndarray, axes) -> Plan:
    return plan_for(xw.shape, axes, _threads(), xw.itemsize)


def _setup(xw: np.ndarray, axes):
    """(plan, kernel set, guard) for an array: serial kernels below :data:`SERIAL_MAX`
    elements (a parallel launch costs more than the whole job), parallel ones above."""
    if xw.size < SERIAL_MAX:
        return plan_for(xw.shape, axes, 1, xw.itemsize), _SER, _NO_GUARD
    return plan_for(xw.shape, axes, _threads(), xw.itemsize), _PAR, _guard()


def small_fused(shape: tuple[int, ...], axes: tuple[int, ...]) -> bool:
    """Whether the serial kernels do a small array of this layout in one pass (channel
    blocks, or columns with one feature each); other small layouts are left to NumPy."""
    return plan_for(shape, axes, 1, 8).fused


class _Kernels:
    """One set of the compiled kernels (parallel, or serial copies for small arrays)."""

    def __init__(self, serial: bool):
        for name in _KERNEL_NAMES:
            fn = globals()[name]
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


def _contiguous(x: np.ndarray) -> np.ndarray:
    """C-contiguous, native array (float16 stays float16: the kernels read its bits)."""
    return np.ascontiguousarray(x)


_KERNEL_NAMES = (
    "_shifted_sums_rows",
    "_shifted_sums_wide",
    "_grad_sums_rows",
    "_grad_sums_wide",
    "_affine_rows",
    "_affine_wide",
    "_dx_rows",
    "_dx_wide",
    "_train_wide",
    "_train_rows",
    "_backward_wide",
    "_backward_rows",
)
_PAR = _Kernels(serial=False)
_SER = _Kernels(serial=True)
_NO_GUARD = contextlib.nullcontext()


# --------------------------------------------------------------------------- the backend
class NumbaBackend(NumpyArrays):
    """The compiled backend; same contract as :class:`batchnorm.backends.numpy.NumpyBackend`.

    Per-feature arguments and results are float64 arrays of the per-feature shape. ``xw``
    is the array returned by :meth:`work` (a C-contiguous copy only when ``x`` is not
    C-contiguous; float16 is read as float16, so nothing is converted).
    """

    name = "numba"

    @staticmethod
    def supports(axes: tuple[int, ...]) -> bool:
        """Whether this backend handles these feature axes (they must be adjacent)."""
        return supported(axes)

    @staticmethod
    def work(x: np.ndarray) -> np.ndarray:
        """The array the kernels read: ``x`` itself when C-contiguous, else a copy."""
        return _contiguous(x)

    @staticmethod
    def work_dy(dy: np.ndarray, xw: np.ndarray) -> np.ndarray:
        """``dy`` as the kernels read it: C-contiguous, in its own dtype (a float64 ``dy``
        is used in float64 with float32 data, exactly as the NumPy backend does)."""
        return _contiguous(dy)

    @staticmethod
    def moments(xw: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 mean and biased variance."""
        fshape = tuple(xw.shape[a] for a in axes)
        mean, var = moments(_contiguous(xw), axes)
        return mean.reshape(fshape), var.reshape(fshape)

    @staticmethod
    def affine(xw, axes, mean, scale, bias, dtype, out=None, h=None) -> np.ndarray:
        """``y = (x - mean) * scale + bias`` per feature, returned in ``dtype`` (into
        ``out`` when given); ``h`` the per-feature overflow scale (default 1)."""
        h = None if h is None else h.ravel()
        return affine(
            _contiguous(xw), axes, mean.ravel(), scale.ravel(), bias.ravel(), dtype, out, h
        )

    @staticmethod
    def train(xw, axes, gamma, beta, eps, dtype, out=None):
        """Training forward: ``(y, mean, var)``; statistics and output in one trip when the
        blocks fit in cache. ``gamma``/``beta`` float64 per feature (not None)."""
        fshape = tuple(xw.shape[a] for a in axes)
        y, mean, var = train(_contiguous(xw), axes, gamma.ravel(), beta.ravel(), eps, dtype, out)
        return y, mean.reshape(fshape), var.reshape(fshape)

    @staticmethod
    def grad_sums(xw, dyw, axes, mean, h=None) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 ``sum(dy)`` and ``sum(dy * (x - mean))``."""
        fshape = mean.shape
        h = None if h is None else h.ravel()
        s1, s2 = grad_sums(_contiguous(xw), _contiguous(dyw), axes, mean.ravel(), h)
        return s1.reshape(fshape), s2.reshape(fshape)

    @staticmethod
    def input_grad(xw, dyw, axes, mean, k, p, q, dtype, out=None, h=None) -> np.ndarray:
        """``dx = k * dy + p * (x - mean) + q`` per feature, returned in ``dtype``."""
        h = None if h is None else h.ravel()
        return input_grad(
            _contiguous(xw),
            _contiguous(dyw),
            axes,
            mean.ravel(),
            k.ravel(),
            p.ravel(),
            q.ravel(),
            dtype,
            out,
            h,
        )

    @staticmethod
    def backward(xw, dyw, axes, mean, inv, k, h, batch_stats, dtype, out=None):
        """Backward: ``(dx, sum_dy, sum_dy_xc)``, in one trip when the blocks fit in cache."""
        fshape = mean.shape
        dx, s1, s2 = backward(
            _contiguous(xw),
            _contiguous(dyw),
            axes,
            mean.ravel(),
            inv.ravel(),
            k.ravel(),
            np.ones(mean.size) if h is None else h.ravel(),
            batch_stats,
            dtype,
            out,
        )
        return dx, s1.reshape(fshape), s2.reshape(fshape)
