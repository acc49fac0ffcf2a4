"""Serial compiled helpers for small per-feature vectors and small arrays.

:func:`running_update` is the one implementation of the running-average step (one call
instead of a dozen NumPy operations, each of which costs about a microsecond on a vector of
a few hundred values): :func:`batchnorm.conventions.update_running_unchecked` calls it for
NumPy float32/float64 statistics and the torch adapter for its buffers. It is compiled
without fast-math: every operation is the IEEE operation NumPy would perform, in the same
order, so the results are bit for bit those of the NumPy expressions it replaces.

The one-call kernels (:func:`train_rows`, :func:`backward_rows`, :func:`eval_coef`,
:func:`eval_rows`, :func:`eval_wide`) serve
the torch adapter's per-call route for small inputs (see below); :func:`train_cols` and
:func:`backward_cols`, the cores of the first two, do a range of columns (the native node
runs strips of columns on torch's threads with them).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ...core import coef as F
from . import coef as _jitable  # noqa: F401  (registers the formulas with numba)
from .half import ld, st
from .options import EXACT_OPTS, SERIAL_OPTS
from .passes import grad_coef, strip_sums, train_coef, xterm
from .reductions import finish_moments

__all__ = [
    "backward_cols",
    "backward_rows",
    "eval_coef",
    "eval_rows",
    "eval_wide",
    "param_grads",
    "plain_stats",
    "running_update",
    "train_cols",
    "train_rows",
]


@njit(cache=True, nogil=True, error_model="numpy")
def running_update(rm, rv, mean, var, keep, w, wv):  # pragma: no cover - compiled
    """Update the running statistics in place when every new value is finite.

    ``rm = (rm * keep + w * mean)`` and ``rv = (rv * keep + wv * var)``, each formed in
    float64 and rounded once to the buffers' dtype (float32 or float64).

    Parameters
    ----------
    rm, rv : ndarray, shape (C,)
        The running mean and variance (float32 or float64), changed in place.
    mean, var : ndarray, shape (C,)
        The batch mean and (unbiased-to-be) biased variance, float64.
    keep, w, wv : float
        ``1 - w``, the weight of the batch mean, and that of the batch variance.

    Returns
    -------
    bool
        Whether every new value was finite; when not, nothing was changed.
    """
    c = rm.shape[0]
    new_m = np.empty(c, rm.dtype)
    new_v = np.empty(c, rv.dtype)
    for i in range(c):
        new_m[i] = np.float64(rm[i]) * keep + w * mean[i]
        new_v[i] = np.float64(rv[i]) * keep + wv * var[i]
        if not (np.isfinite(new_m[i]) and np.isfinite(new_v[i])):
            return False
    for i in range(c):
        rm[i] = new_m[i]
        rv[i] = new_v[i]
    return True


# --------------------------------------------------------------------------- small arrays
# Serial one-call kernels for the per-call fast path of small inputs (the torch adapter's
# "call plan"): each takes the per-feature parameters and buffers in their own dtype (no
# float64 copies made in Python), derives the coefficients with the compiled formulas of
# :mod:`batchnorm.core.coef` (through the fused kernels' helpers) and makes its one pass.
# Layout ``(O, K)``: ``K`` features, each a column (``(N, C)`` or channels-last ``(M, C)``).


@njit(**EXACT_OPTS)
def train_rows(x, g, b, eps, big, limit, coef, out, stats):  # pragma: no cover - compiled
    """Fused training forward of an ``(O, K)`` array: statistics, coefficients, output.

    Returns whether ``sum(|mean|)`` and ``O * sum(var)`` stay below ``limit`` and
    ``limit**2`` (False also for non-finite statistics): whether the plain form, without
    the overflow scale, serves the backward too.

    ``stats`` (3, K) float64 receives the mean, biased variance and ``1/sqrt(var + eps)``;
    ``coef`` (4, K) in the working precision is scratch; ``out`` receives ``y``. The sums
    are those of :func:`batchnorm.backends.numba.passes.strip_sums` (one strip of all
    columns, no overflow rescale: the caller sends inputs that could need it elsewhere):
    :func:`train_cols` over all columns, then :func:`plain_stats`.
    """
    train_cols(x, g, b, eps, big, coef, out, stats, 0, x.shape[1])
    return plain_stats(stats, x.shape[0], limit)


@njit(**EXACT_OPTS, inline="always")
def train_cols(x, g, b, eps, big, coef, out, stats, k0, w):  # pragma: no cover - compiled
    """:func:`train_rows` on the columns ``k0 .. k0 + w`` of ``x`` (O, K) only: it reads
    and writes nothing of the other columns (of ``stats``, ``coef``, ``out`` either), so
    strips of columns may run on several threads at once. No flag: :func:`plain_stats`
    after the last strip.

    Compiled without fast-math (``EXACT_OPTS``), as :func:`train_rows` and the C entry
    points that call either (numba inlines it with its caller's options): each column's
    values are the IEEE operations', the same bits whatever the strips and whichever
    caller compiled them (with FMA contractions, two compilations of the same loop
    measured 1 ulp apart in a third of the outputs)."""
    O = x.shape[0]
    sh = np.empty(w, np.float64)
    a1 = np.zeros(w, np.float64)
    a2 = np.zeros(w, np.float64)
    strip_sums(x, k0, w, 1.0, sh, a1, a2)
    mean, var, inv = stats[0], stats[1], stats[2]
    for j in range(w):
        k = k0 + j
        mu, v = finish_moments(sh[j], a1[j], a2[j], O, 1.0)
        mean[k] = mu
        var[k] = v
        train_coef(sh[j], a1[j] / O, 1.0, v, eps, g[k], b[k], O, big, coef, inv, k)
    k1 = k0 + w  # (row slices: several times faster than x[o, k0 + j], k0 not a constant)
    s, a, bb, h = coef[0, k0:k1], coef[1, k0:k1], coef[2, k0:k1], coef[3, k0:k1]
    for o in range(O):
        xr = x[o, k0:k1]
        yr = out[o, k0:k1]
        for j in range(w):
            yr[j] = st((ld(xr[j]) * h[j] - s[j]) * a[j] + bb[j], out)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def param_grads(s1, s2, inv, gw, gb):  # pragma: no cover - compiled
    """``gb = sum(dy)`` and ``gw = sum(dy * (x - mean)) * inv_std`` from the float64 sums
    ``s1``, ``s2``, each rounded once to its own dtype (NumPy's ``gb[...] = s1``,
    ``gw[...] = s2 * inv`` in one call)."""
    for k in range(s1.shape[0]):
        gb[k] = s1[k]
        gw[k] = s2[k] * inv[k]


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def plain_stats(stats, count, limit):  # pragma: no cover - compiled
    """Whether ``sum(|mean|)`` and ``count * sum(var)`` (``stats`` rows 0 and 1) stay
    below ``limit`` and ``limit**2``; False for non-finite statistics."""
    m1 = 0.0
    v1 = 0.0
    for k in range(stats.shape[1]):
        m1 += abs(stats[0, k])
        v1 += stats[1, k]
    return m1 < limit and count * v1 < limit * limit


@njit(**EXACT_OPTS)
def backward_rows(x, dy, mean, inv, g, batch_stats, coef, out, gw, gb):  # pragma: no cover
    """Fused backward of an ``(O, K)`` array after :func:`train_rows` (``h = 1``):
    :func:`backward_cols` over all columns.

    ``mean`` and ``inv`` (float64) are the forward's; ``gw`` and ``gb`` (length
    K, any float dtype) receive ``sum(dy * x_hat)`` and ``sum(dy)``; ``out`` (or nothing
    when it has no rows) receives ``dx = k dy + p (x - mean) + q`` with the coefficients
    of :func:`batchnorm.backends.numba.passes.grad_coef`. ``coef`` (5, K) is scratch.
    """
    backward_cols(x, dy, mean, inv, g, batch_stats, coef, out, gw, gb, 0, x.shape[1])


@njit(**EXACT_OPTS, inline="always")
def backward_cols(x, dy, mean, inv, g, batch_stats, coef, out, gw, gb, k0, w):  # noqa: E501  # pragma: no cover
    """:func:`backward_rows` on the columns ``k0 .. k0 + w`` only (of every argument),
    without fast-math where called: see :func:`train_cols`."""
    O = x.shape[0]
    a1 = np.zeros(w, np.float64)
    a2 = np.zeros(w, np.float64)
    k1 = k0 + w  # (row slices, as in train_cols)
    mu = mean[k0:k1]
    o = 0
    while o + 4 <= O:  # four rows per sweep over the accumulators
        x0, x1, x2, x3 = x[o, k0:k1], x[o + 1, k0:k1], x[o + 2, k0:k1], x[o + 3, k0:k1]
        y0, y1, y2, y3 = dy[o, k0:k1], dy[o + 1, k0:k1], dy[o + 2, k0:k1], dy[o + 3, k0:k1]
        for j in range(w):
            m = mu[j]
            g0 = np.float64(ld(y0[j]))
            g1 = np.float64(ld(y1[j]))
            g2 = np.float64(ld(y2[j]))
            g3 = np.float64(ld(y3[j]))
            a1[j] += (g0 + g1) + (g2 + g3)
            a2[j] += (g0 * (np.float64(ld(x0[j])) - m) + g1 * (np.float64(ld(x1[j])) - m)) + (
                g2 * (np.float64(ld(x2[j])) - m) + g3 * (np.float64(ld(x3[j])) - m)
            )
        o += 4
    while o < O:
        xr = x[o, k0:k1]
        gr = dy[o, k0:k1]
        for j in range(w):
            gv = np.float64(ld(gr[j]))
            a1[j] += gv
            a2[j] += gv * (np.float64(ld(xr[j])) - mu[j])
        o += 1
    for j in range(w):
        c = k0 + j
        gw[c] = a2[j] * inv[c]
        gb[c] = a1[j]
        grad_coef(a1[j], a2[j], mean[c], inv[c], inv[c] * g[c], 1.0, O, batch_stats, coef, c)
        coef[4, c] = 1.0
    if out.shape[0] == 0:
        return
    s, kk, p, q, hw = coef[0, k0:k1], coef[1, k0:k1], coef[2, k0:k1], coef[3, k0:k1], coef[4, k0:k1]
    for o in range(O):
        xr = x[o, k0:k1]
        gr = dy[o, k0:k1]
        dr = out[o, k0:k1]
        for j in range(w):
            v = kk[j] * ld(gr[j]) + xterm(p[j], ld(xr[j]) * hw[j] - s[j]) + q[j]
            dr[j] = st(v, out)


@njit(cache=True, nogil=True, error_model="numpy")
def eval_coef(g, b, rm, rv, eps, limit, coef):  # pragma: no cover - compiled
    """The output coefficients of evaluation with the running statistics, into ``coef``
    (4, C) in the working precision: rows ``(s, a, b', 1)`` of ``y = (x - s) a + b'`` with
    ``s`` the running mean rounded to the working precision and ``b'`` absorbing the
    rounding (:func:`batchnorm.core.coef.output_coef`).

    Returns
    -------
    bool
        False (coefficients unusable) when ``sum(|running_mean|)`` reaches ``limit`` (the
        overflow-scaled general path is needed then) or is not finite.
    """
    c = rm.shape[0]
    total = 0.0
    for i in range(c):
        total += abs(np.float64(rm[i]))
    if not total < limit:
        return False
    for i in range(c):
        m = np.float64(rm[i])
        coef[0, i] = m
        s = np.float64(coef[0, i])
        inv = F.inv_std(np.float64(rv[i]), eps)
        a_h, bias = F.output_coef(m - s, inv * np.float64(g[i]), 1.0, np.float64(b[i]), 0.0, 1.0)
        coef[1, i] = a_h
        coef[2, i] = bias
        coef[3, i] = 1.0
    return True


@njit(**SERIAL_OPTS)
def eval_rows(x, g, b, rm, rv, eps, limit, coef, out):  # pragma: no cover - compiled
    """Evaluation of an ``(O, K)`` array in one call: :func:`eval_coef`, then
    ``out = (x - s) a + b'`` (``h = 1``: the same values as the affine pass with the
    coefficient rows of :func:`eval_coef`). Returns :func:`eval_coef`'s flag (False:
    nothing written)."""
    if not eval_coef(g, b, rm, rv, eps, limit, coef):
        return False
    O, K = x.shape
    s, a, bb = coef[0], coef[1], coef[2]
    for o in range(O):
        xr = x[o]
        yr = out[o]
        for k in range(K):
            yr[k] = st((ld(xr[k]) - s[k]) * a[k] + bb[k], out)
    return True


@njit(**SERIAL_OPTS)
def eval_wide(x, g, b, rm, rv, eps, limit, coef, out):  # pragma: no cover - compiled
    """:func:`eval_rows` for an ``(N, C, I)`` array (features on axis 1)."""
    if not eval_coef(g, b, rm, rv, eps, limit, coef):
        return False
    N, C, I = x.shape
    for n in range(N):
        for c in range(C):
            sc, ac, bc = coef[0, c], coef[1, c], coef[2, c]
            xr = x[n, c]
            yr = out[n, c]
            for i in range(I):
                yr[i] = st((ld(xr[i]) - sc) * ac + bc, out)
    return True
