"""The passes that write an output: elementwise ``y``/``dx`` and the fused kernels.

The elementwise passes use the same rounding-safe form as the NumPy path:
``y = (x*h - s*h) * (a/h) + b`` where ``s`` is the mean rounded to the working precision
(so ``x - s`` is exact for data far from zero) and ``h`` is a per-feature power of two,
1 unless ``x - s`` could overflow the working precision (see
:func:`batchnorm.core.coef.overflow_needed`, which the kernels compile: see
:mod:`batchnorm.backends.numba.coef`).

The fused kernels do one feature's block (or strip of columns) in one trip to memory:
they sum it (as :mod:`batchnorm.backends.numba.reductions` does), derive the coefficients
(:func:`_train_coef`, :func:`_grad_coef`), then write the output while the block is still
in cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...core import coef as F
from . import coef as _jitable  # noqa: F401  (registers the formulas with numba)
from .half import ld, st
from .options import OPTS, SERIAL_OPTS
from .reductions import finish_moments, total


# --------------------------------------------------------------------------- coefficients
@njit(cache=True, error_model="numpy", fastmath=False)  # (never inherited: see options)
def _train_coef(sh, delta, hs, var, eps, g, b, m, big, coef, inv, c):  # pragma: no cover
    """Output coefficients of one feature into coef[:, c] (working precision).

    The mean is ``(sh + delta) / hs`` (``sh`` the feature's sample, ``delta`` the mean of
    the shifted data, ``hs`` 1 or the rescale of an overflowed sum); inv = 1/sqrt(var +
    eps), a = inv*g; s = mean rounded to working precision; the bias absorbs ``mean - s``
    formed from ``sh`` and ``delta`` (``mean_offset``: no rounding of the mean on the way);
    h = 1/16 when |x - s| may overflow (bound sqrt(m var) on |x - mean|).
    """
    mean = (sh + delta) / hs
    coef[0, c] = mean
    s = np.float64(coef[0, c])  # the mean rounded to the working precision
    h = F.overflow_scale(mean, var, s, m, big)
    off = F.mean_offset(sh, delta, s * hs) / hs
    inv[c] = F.inv_std(var, eps)  # returned: the one computation of inv_std
    a_h, bias = F.output_coef(off, inv[c], g, b, 0.0, h)
    coef[0, c] = s * h
    coef[1, c] = a_h
    coef[2, c] = bias
    coef[3, c] = h


@njit(inline="always")
def xterm(p, d):  # pragma: no cover - compiled
    """``p * d``, the input gradient's term in ``x``, or ``p`` itself (a zero) where ``p`` is
    zero: with given statistics (``p = 0``) ``dx = k dy`` does not depend on ``x``, and an
    infinite ``x`` must not turn it into NaN (``0 * inf``). Same dtype as ``p * d``."""
    z = p * d
    return p if p == 0 else z


@njit(cache=True, error_model="numpy", fastmath=False)  # (never inherited: see options)
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


# --------------------------------------------------------------------------- elementwise
@njit(**OPTS)
def _affine_rows(x, coef, out, nchunks):  # pragma: no cover - compiled
    """out = (x*h - s*h) * (a/h) + b per column; coef rows (s*h, a/h, b, h)."""
    O, K = x.shape
    s, a, b, h = coef[0], coef[1], coef[2], coef[3]
    for t in prange(nchunks):
        o0 = t * O // nchunks
        o1 = (t + 1) * O // nchunks
        for o in range(o0, o1):
            for k in range(K):
                out[o, k] = st((ld(x[o, k]) * h[k] - s[k]) * a[k] + b[k], out)


@njit(**OPTS)
def _affine_wide(x, coef, out):  # pragma: no cover - compiled
    O, C, I = x.shape
    for task in prange(O * C):
        o = task // C
        c = task % C
        sc, ac, bc, hc = coef[0, c], coef[1, c], coef[2, c], coef[3, c]
        for i in range(I):
            out[o, c, i] = st((ld(x[o, c, i]) * hc - sc) * ac + bc, out)


@njit(**OPTS)
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
                v = k[j] * ld(dy[o, j]) + xterm(p[j], ld(x[o, j]) * h[j] - s[j]) + q[j]
                out[o, j] = st(v, out)


@njit(**OPTS)
def _dx_wide(x, dy, coef, out):  # pragma: no cover - compiled
    O, C, I = x.shape
    for task in prange(O * C):
        o = task // C
        c = task % C
        sc, kc, pc, qc, hc = coef[0, c], coef[1, c], coef[2, c], coef[3, c], coef[4, c]
        for i in range(I):
            v = kc * ld(dy[o, c, i]) + xterm(pc, ld(x[o, c, i]) * hc - sc) + qc
            out[o, c, i] = st(v, out)


# --------------------------------------------------------------------------- fused passes
@njit(**OPTS)
def _train_wide(x, g, b, eps, big, rescale, coef, out, mean, var, inv):  # pragma: no cover
    """Fused training forward of (O, C, I): one task per feature block, kept in cache.

    Sums the block (shifted, float64; again on x*rescale if a sum overflowed), derives
    the coefficients, then writes the block's output while it is still in cache.
    """
    O, C, I = x.shape
    n = O * I
    for c in prange(C):
        hs = 1.0
        a1 = np.empty(I, np.float64)  # (zeroed below, once per summation)
        a2 = np.empty(I, np.float64)
        while True:
            sh = np.float64(ld(x[0, c, 0])) * hs
            a1[:] = 0.0
            a2[:] = 0.0
            o = 0
            while o + 4 <= O:
                r0, r1, r2, r3 = x[o, c], x[o + 1, c], x[o + 2, c], x[o + 3, c]
                for i in range(I):
                    d0 = np.float64(ld(r0[i])) * hs - sh
                    d1 = np.float64(ld(r1[i])) * hs - sh
                    d2 = np.float64(ld(r2[i])) * hs - sh
                    d3 = np.float64(ld(r3[i])) * hs - sh
                    a1[i] += (d0 + d1) + (d2 + d3)
                    a2[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                o += 4
            while o < O:
                row = x[o, c]
                for i in range(I):
                    d = np.float64(ld(row[i])) * hs - sh
                    a1[i] += d
                    a2[i] += d * d
                o += 1
            t1 = total(a1)
            t2 = total(a2)
            if hs != 1.0 or rescale == 1.0 or (np.isfinite(t1) and np.isfinite(t2)):
                break
            hs = rescale
        mu, v = finish_moments(sh, t1, t2, n, hs)
        mean[c] = mu
        var[c] = v
        _train_coef(sh, t1 / n, hs, v, eps, g[c], b[c], n, big, coef, inv, c)
        sc, ac, bc, hc = coef[0, c], coef[1, c], coef[2, c], coef[3, c]
        for o in range(O):
            for i in range(I):
                out[o, c, i] = st((ld(x[o, c, i]) * hc - sc) * ac + bc, out)


@njit(**SERIAL_OPTS, inline="always")
def _strip_sums(x, k0, w, hs, sh, a1, a2):  # pragma: no cover - compiled
    """Shifted sums of the columns ``k0 .. k0 + w`` of ``x`` (O, K), scaled by ``hs``: the
    shift (one sample per column), sum(d) and sum(d*d) into ``sh``, ``a1``, ``a2``."""
    O = x.shape[0]
    k1 = k0 + w  # (row slices: 3-4x faster than x[o, k0 + j] where k0 is not a constant)
    r = x[0, k0:k1]
    for j in range(w):
        sh[j] = np.float64(ld(r[j])) * hs
    o = 0
    while o + 4 <= O:
        r0, r1, r2, r3 = x[o, k0:k1], x[o + 1, k0:k1], x[o + 2, k0:k1], x[o + 3, k0:k1]
        for j in range(w):
            sj = sh[j]
            d0 = np.float64(ld(r0[j])) * hs - sj
            d1 = np.float64(ld(r1[j])) * hs - sj
            d2 = np.float64(ld(r2[j])) * hs - sj
            d3 = np.float64(ld(r3[j])) * hs - sj
            a1[j] += (d0 + d1) + (d2 + d3)
            a2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        o += 4
    while o < O:
        r = x[o, k0:k1]
        for j in range(w):
            d = np.float64(ld(r[j])) * hs - sh[j]
            a1[j] += d
            a2[j] += d * d
        o += 1


@njit(**OPTS)
def _train_rows(x, g, b, eps, big, rescale, width, coef, out, mean, var, inv):  # pragma: no cover
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
        hsj = np.ones(w, np.float64)  # per column: 1, or the rescale of an overflowed sum
        _strip_sums(x, k0, w, 1.0, sh, a1, a2)
        redo = False
        for j in range(w):
            if not (np.isfinite(a1[j]) and np.isfinite(a2[j])):
                redo = True
        if redo and rescale != 1.0:  # only the columns whose sums overflowed take the rescale
            sh2 = np.empty(w, np.float64)
            b1 = np.zeros(w, np.float64)
            b2 = np.zeros(w, np.float64)
            _strip_sums(x, k0, w, rescale, sh2, b1, b2)
            for j in range(w):
                if not (np.isfinite(a1[j]) and np.isfinite(a2[j])):
                    sh[j], a1[j], a2[j], hsj[j] = sh2[j], b1[j], b2[j], rescale
        for j in range(w):
            mu, v = finish_moments(sh[j], a1[j], a2[j], O, hsj[j])
            mean[k0 + j] = mu
            var[k0 + j] = v
            k = k0 + j
            _train_coef(sh[j], a1[j] / O, hsj[j], v, eps, g[k], b[k], O, big, coef, inv, k)
        s = coef[0, k0 : k0 + w]
        a = coef[1, k0 : k0 + w]
        bb = coef[2, k0 : k0 + w]
        h = coef[3, k0 : k0 + w]
        for o in range(O):
            xr = x[o, k0 : k0 + w]
            yr = out[o, k0 : k0 + w]
            for j in range(w):
                yr[j] = st((ld(xr[j]) * h[j] - s[j]) * a[j] + bb[j], out)


@njit(**OPTS)
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
                g0 = np.float64(ld(y0[i]))
                g1 = np.float64(ld(y1[i]))
                g2 = np.float64(ld(y2[i]))
                g3 = np.float64(ld(y3[i]))
                a1[i] += (g0 + g1) + (g2 + g3)
                a2[i] += (
                    g0 * (np.float64(ld(x0[i])) * hc - sh) + g1 * (np.float64(ld(x1[i])) * hc - sh)
                ) + (
                    g2 * (np.float64(ld(x2[i])) * hc - sh) + g3 * (np.float64(ld(x3[i])) * hc - sh)
                )
            o += 4
        while o < O:
            xr = x[o, c]
            gr = dy[o, c]
            for i in range(I):
                gv = np.float64(ld(gr[i]))
                a1[i] += gv
                a2[i] += gv * (np.float64(ld(xr[i])) * hc - sh)
            o += 1
        t1 = total(a1)
        t2 = total(a2) / hc
        s1[c] = t1
        s2[c] = t2
        _grad_coef(t1, t2, mean[c], inv[c], k[c], hc, n, batch_stats, coef, c)
        coef[4, c] = hc
        sc, kc, pc, qc, hw = coef[0, c], coef[1, c], coef[2, c], coef[3, c], coef[4, c]
        for o in range(O):
            for i in range(I):
                v = kc * ld(dy[o, c, i]) + xterm(pc, ld(x[o, c, i]) * hw - sc) + qc
                out[o, c, i] = st(v, out)


@njit(**OPTS)
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
                gv = np.float64(ld(dy[o, k0 + j]))
                a1[j] += gv
                a2[j] += gv * (np.float64(ld(x[o, k0 + j])) * hh[j] - sh[j])
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
                v = kk[j] * ld(gr[j]) + xterm(p[j], ld(xr[j]) * hw[j] - s[j]) + q[j]
                dr[j] = st(v, out)


# the kernels the drivers call through a kernel set (each also gets a serial copy)
KERNELS = (
    _affine_rows,
    _affine_wide,
    _dx_rows,
    _dx_wide,
    _train_wide,
    _train_rows,
    _backward_wide,
    _backward_rows,
)

# the fused kernels' helpers, shared with the small-array kernels of .small
strip_sums, train_coef, grad_coef = _strip_sums, _train_coef, _grad_coef
