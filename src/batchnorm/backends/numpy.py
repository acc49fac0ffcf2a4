"""The NumPy backend: the four primitives every batch-norm pass is made of.

All per-feature arguments are float64 arrays in the broadcast shape of ``x``. See
:mod:`batchnorm.functional` for the equations and the numerics; the coefficient formulas
and the overflow rule are those of :mod:`batchnorm.core.coef` (shared with the compiled
kernels and the array-API passes).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .._validation import SUPPORTED_DTYPES, as_feature_vector, reduce_axes
from .._xp import work_dtype as _xp_work_dtype
from ..core import coef, passes, sums


def work_dtype(dtype: np.dtype) -> np.dtype:
    """Precision of the elementwise work (:func:`batchnorm._xp.work_dtype`, the one rule,
    tabulated once for NumPy's dtypes)."""
    wt = _WORK.get(dtype)
    return np.dtype(_xp_work_dtype(np, dtype)) if wt is None else wt


_WORK = {t: np.dtype(_xp_work_dtype(np, t)) for t in SUPPORTED_DTYPES}


def overflow_scale_or_none(
    mean: np.ndarray, var: np.ndarray, count: int, wt: np.dtype
) -> np.ndarray | None:
    """Per-feature power of two ``h`` for the elementwise passes; None when all are 1.

    The passes form ``x - s`` (s = the mean in working precision) in the working
    precision, which overflows when the data span more than half its range (float32
    ``[3.4e38, -3.4e38]``). Since ``|x - mean| <= sqrt(count * var)``, ``h = 1/16`` is used
    when that bound (or ``|mean|``) reaches a quarter to half of the largest finite value;
    the passes then form ``x*h - s*h`` (exact: a power of two) and fold ``1/h`` into the
    coefficient. The rule is :func:`batchnorm.core.coef.overflow_needed`, which the compiled
    kernels compile; this wrapper adds a fast exit and returns None when no feature needs it.
    """
    big = OVERFLOW_LIMIT[wt.itemsize]
    # fast exit: sums bound the maxima (NaN/inf fall through to the exact rule)
    vs, ms = float(np.add.reduce(var, axis=None)), float(np.add.reduce(np.abs(mean), axis=None))
    if ms < big / 4 and count * vs < (big / 4) * (big / 4):  # inf for float64
        return None
    with np.errstate(all="ignore"):
        s = mean.astype(wt).astype(np.float64)
        huge = coef.overflow_needed(mean, var, s, count, big)
    return np.where(huge, coef.OVERFLOW_H, 1.0) if huge.any() else None


#: The overflow rule's ``big`` per working-precision itemsize (float32, float64), from
#: :func:`batchnorm.core.coef.overflow_limit`.
OVERFLOW_LIMIT = {
    t.itemsize: coef.overflow_limit(float(np.finfo(t).max)) for t in map(np.dtype, "fd")
}


@functools.lru_cache(maxsize=512)
def _geometry(shape: tuple[int, ...], axes: tuple[int, ...]):
    """(reduced axes, broadcast shape, feature shape, values per feature) of a layout."""
    red = reduce_axes(len(shape), axes)
    bshape = tuple(n if i in axes else 1 for i, n in enumerate(shape))
    fshape = tuple(shape[a] for a in axes)
    return red, bshape, fshape, math.prod(shape[i] for i in red)


def _moments(x, red, m):
    """Per-feature ``(ref, delta, var, d)`` in float64 (broadcast shape): the mean is
    ``ref + delta``, held unrounded, ``var`` the biased variance, and ``d = x - ref`` the
    centred data in working precision (None when the data were rescaled), which the
    output pass reuses.

    The statistics passes of every eager library, :func:`batchnorm.core.sums.shifted_sums`
    (a first mean from the data shifted by a per-feature sample, or for float16/32 data
    their float64 sum, each value exact there; then the centring on that mean rounded to
    working precision; the range rule against overflow and, for float16/32 data, underflow
    of the squares), accumulated in float64; ``delta = sum(d)/n`` keeps the digits a
    float64 mean of 1e12 cannot hold.
    """
    shift, d, t1, t2, hs = sums.shifted_sums(np, x, red, np.float64, m)
    _, var = coef.moments_from_shifted_sums(shift, t1, t2, m, hs)
    if d is None:  # rescaled data: ref and delta back on the data's scale (exact)
        return shift / hs, (t1 / m) / hs, var, None
    return shift, t1 / m, var, d


def _finish(d: np.ndarray, dtype, out) -> np.ndarray:
    """``d`` as the result: in ``dtype``, written into ``out`` when given."""
    if out is None:
        return d.astype(dtype, copy=False)
    np.copyto(out, d, casting="unsafe")
    return out


class NumpyArrays:
    """What both NumPy backends share beyond the primitives: per-feature arrays are
    float64 NumPy arrays, and the overflow rule has a fast exit (None: no feature needs
    scaling)."""

    xp = None  # NumPy arrays take the NumPy backends, never the array-API passes

    @staticmethod
    def feature(v: object, name: str, lay, x: np.ndarray) -> np.ndarray:
        """Check a per-feature array (gamma, beta, running stats); float64, never a copy of
        a float64 array."""
        return as_feature_vector(v, name, lay.fshape, x.shape)

    @staticmethod
    def param(v):
        """A layer's per-feature array (already valid) as float64; the array itself when it
        already is. None stays None."""
        return None if v is None else v.astype(np.float64, copy=False)

    @staticmethod
    def concat(arrays: list, axis: int) -> np.ndarray:
        """Arrays joined along ``axis``."""
        return np.concatenate(arrays, axis=axis)

    @staticmethod
    def any_le_zero(v: np.ndarray) -> bool:
        """Whether any entry is <= 0 (validation, eager)."""
        return bool(np.any(v <= 0))

    @staticmethod
    def copy(v: np.ndarray) -> np.ndarray:
        """A copy of a per-feature array."""
        return v.copy()

    @staticmethod
    def zeros(shape: tuple[int, ...]) -> np.ndarray:
        """Per-feature zeros."""
        return np.zeros(shape)

    @staticmethod
    def ones(shape: tuple[int, ...]) -> np.ndarray:
        """Per-feature ones."""
        return np.ones(shape)

    @staticmethod
    def from_host(v) -> np.ndarray:
        """A merged (host, float64) per-feature array as this backend holds it."""
        return np.asarray(v, np.float64)

    @staticmethod
    def overflow(mean, var, count: int, xw: np.ndarray):
        """The per-feature overflow scale ``h`` for data ``xw``, or None when it is 1."""
        return overflow_scale_or_none(mean, var, count, work_dtype(xw.dtype))

    @staticmethod
    def x_hat(x: np.ndarray, mean, inv_std, bshape) -> np.ndarray:
        """The normalized input in float64 (for inspection)."""
        return (x.astype(np.float64) - mean.reshape(bshape)) * inv_std.reshape(bshape)


class NumpyBackend(NumpyArrays):
    """The readable reference backend; same contract as the compiled ``NumbaBackend``.

    Per-feature arguments and results are float64 arrays of the per-feature shape (the sizes
    of the feature axes); ``xw`` is what :meth:`work` returned for the data (here the data
    itself), ``dtype`` the dtype of the result.
    """

    name = "numpy"

    @staticmethod
    def supports(axes: tuple[int, ...]) -> bool:
        """Every layout is supported."""
        return True

    @staticmethod
    def work(x: np.ndarray) -> np.ndarray:
        """The array the primitives read (the input itself: nothing is converted)."""
        return x

    @staticmethod
    def work_dy(dy: np.ndarray, xw: np.ndarray) -> np.ndarray:
        """``dy`` as the primitives read it (unchanged)."""
        return dy

    @staticmethod
    def moments(xw: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 mean and biased variance."""
        ref, delta, var = NumpyBackend.moments_shifted(xw, axes)
        return ref + delta, var

    @staticmethod
    def moments_shifted(xw: np.ndarray, axes: tuple[int, ...]):
        """Per-feature float64 ``(ref, delta, var)``: the mean ``ref + delta`` unrounded."""
        red, _, fshape, m = _geometry(xw.shape, axes)
        return tuple(v.reshape(fshape) for v in _moments(xw, red, m)[:3])

    @staticmethod
    def affine(xw, axes, mean, scale, bias, dtype, out=None, h=None, delta=0.0) -> np.ndarray:
        """``y = (x - mean) * scale + bias`` per feature, returned in ``dtype`` (into
        ``out`` when given); ``h`` the per-feature overflow scale (default 1); with
        ``delta`` the mean is ``mean + delta`` held unrounded."""
        b = _geometry(xw.shape, axes)[1]
        hb = 1.0 if h is None else h.reshape(b)
        db = delta if np.ndim(delta) == 0 else delta.reshape(b)
        wt = work_dtype(xw.dtype) if out is not None else dtype
        m, a, c = mean.reshape(b), scale.reshape(b), bias.reshape(b)
        return _finish(passes.scale_shift(np, xw, m, a, c, hb, wt, db), dtype, out)

    @staticmethod
    def train(xw, axes, gamma, beta, eps, dtype, out=None):
        """Training forward: ``(y, mean, var, inv_std)``: the statistics of
        :meth:`moments_shifted`, then the output pass on the centred data ``d = x - s`` of
        the statistics, with the mean's offset ``delta`` from the shift in the bias
        (:func:`batchnorm.core.passes.affine_centred`; :meth:`affine` with the unrounded
        mean where a feature needs the overflow scale or was rescued)."""
        red, b, fshape, m = _geometry(xw.shape, axes)
        ref, delta, var, d = _moments(xw, red, m)
        mean = ref + delta
        inv = coef.inv_std(var, eps)
        wt = work_dtype(xw.dtype)
        h = overflow_scale_or_none(mean, var, m, wt)
        a, c = inv * gamma.reshape(b), beta.reshape(b)
        to = wt if out is not None else dtype
        if d is None or h is not None:
            y = passes.scale_shift(np, xw, ref, a, c, 1.0 if h is None else h, to, delta)
        else:
            y = passes.affine_centred(np, d, delta, a, c, 1.0, to)
        y = _finish(y, dtype, out)
        return y, mean.reshape(fshape), var.reshape(fshape), inv.reshape(fshape)

    @staticmethod
    def grad_sums(xw, dyw, axes, mean, h=None) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 ``sum(dy)`` and ``sum(dy * (x - mean))``
        (:func:`batchnorm.core.passes.grad_sums`; a float64 ``dy`` with float32 data is
        multiplied in float64, as the compiled kernels do)."""
        red, b, _, _ = _geometry(xw.shape, axes)
        hb = 1.0 if h is None else h.reshape(b)
        s1, s2 = passes.grad_sums(np, xw, dyw, mean.reshape(b), red, np.float64, hb)
        return s1.reshape(mean.shape), s2.reshape(mean.shape)

    @staticmethod
    def input_grad(xw, dyw, axes, mean, k, p, q, dtype, out=None, h=None) -> np.ndarray:
        """``dx = k * dy + p * (x - mean) + q`` per feature, returned in ``dtype``
        (:func:`batchnorm.core.passes.input_grad`)."""
        b = _geometry(xw.shape, axes)[1]
        hb = 1.0 if h is None else h.reshape(b)
        m, kb, pb, qb = (v.reshape(b) for v in (mean, k, p, q))
        return _finish(passes.input_grad(np, xw, dyw, m, kb, pb, qb, dtype, hb), dtype, out)

    @staticmethod
    def backward(xw, dyw, axes, mean, inv, k, h, batch_stats, dtype, out=None):
        """Backward: ``(dx, sum_dy, sum_dy_xc)``; ``x`` is centred once
        (:func:`batchnorm.core.passes.centred`) for the sums and for ``dx = k dy + p (x -
        mean) + q`` (:func:`batchnorm.core.passes.dx_centred`)."""
        red, b, fshape, m = _geometry(xw.shape, axes)
        hb = 1.0 if h is None else h.reshape(b)
        mb, kb = mean.reshape(b), k.reshape(b)
        shift, d = passes.centred(np, xw, mb, hb)
        sum_dy = np.add.reduce(dyw, axis=red, dtype=np.float64, keepdims=True)
        wide = dyw.dtype.itemsize > d.dtype.itemsize  # float64 dy with float32 x: in float64
        prod = np.multiply(d, dyw, dtype=dyw.dtype if wide else d.dtype)
        s2 = np.add.reduce(prod, axis=red, dtype=np.float64, keepdims=True)
        if d.dtype != np.float64 or h is not None:  # (0 * inf would make an inf sum NaN)
            s2 = coef.centred_grad_sum(s2, sum_dy, mb, shift, hb)
        if batch_stats:
            p, q = coef.backward_coef(sum_dy, s2, inv.reshape(b), kb, m)
            p_h, q_s = coef.input_grad_coef(p, q, mb, shift, hb)
            dx = passes.dx_centred(np, d, dyw, kb, p_h, q_s, dtype)
        else:  # dx = k dy, independent of x (an infinite x leaves it finite)
            dx = passes.dx_given(np, dyw, kb, d.dtype, dtype)
        return _finish(dx, dtype, out), sum_dy.reshape(fshape), s2.reshape(fshape)
