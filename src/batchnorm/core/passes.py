r"""The passes of batch normalization for arrays of any Array API namespace (NumPy's
backend uses the centring, output and input-gradient passes too). Pure functions of standard
Array API calls only: no data-dependent Python branching, no ``float(array)``; every
function traces under ``jax.jit``. The formulas come from :mod:`batchnorm.core.coef`.

Conventions. ``x`` has any shape; the *feature axes* ``axes`` index the features and the
statistics reduce over the other axes ``red`` (``n`` values per feature). The low-level
passes (:func:`moments`, :func:`normalize`, :func:`grad_sums`, :func:`input_grad`) take
and return per-feature arrays in the *broadcast shape* (``x.shape`` with the reduced axes
set to 1); the composed entry points (:func:`train`, :func:`evaluate`, :func:`backward`)
take and return them in the *feature shape* (the sizes of the feature axes, in axis
order). Per-feature values are in the statistics dtype ``sdt``
(:func:`batchnorm._xp.stats_dtype`); elementwise work runs in the working dtype ``wt``
(float32 for float16/bfloat16/float32 data, float64 for float64), and ``y`` / ``dx`` come
back in the input dtype, namespace and device.

Statistics: a shifted two-pass (:func:`batchnorm.core.sums.shifted_sums`, NumPy's fallback
backend's too). Pass 1 subtracts one sample ``x_0`` of each feature (so an offset far from
zero cancels exactly) and sums, giving a first mean ``m_1`` (float16/32 data summed in
float64 by the namespace's own sum, i.e. not torch's blocks, are summed as they are: each
value is exact there); pass 2 centres on ``s = m_1`` rounded to ``wt`` (``d = x - s`` is
exact for data near their mean: Sterbenz) and sums ``d`` and ``d^2``, so ``mean = s + sum(d)/n`` and
``var = sum(d^2)/n - (sum(d)/n)^2`` with ``sum(d)/n`` tiny: never
:math:`E[x^2]-E[x]^2` on the raw data. The sums:

* ``sdt`` float64: in float64 (on torch, float32 block sums added in float64; see
  :func:`batchnorm.core.sums.accurate_sum`);
* ``sdt`` float32 (no float64 on the device): pairwise sums,
  ``|fl(sum v) - sum v| <= K u sum|v|`` with ``K = sum_j ceil(log2 L_j)`` over the
  reduced lengths ``L_j`` and ``u = 2^-24`` (:func:`batchnorm.core.sums.pairwise_sum`).
  The variance then has relative error below about ``(K + 3) u`` and the output

  .. math:: |\hat y - y| \le \bigl((K/2 + 5)\,u\,(|\hat x| + 1)\bigr)\,|\gamma| + u\,|\beta|

  to first order; the returned mean is the float32 rounding of the mean (its error up to
  ``u |mean|`` is inherent to float32 and is kept out of ``y``, see :func:`train`).

Range: one O(C) check of the sums decides: a sum that is not finite (a difference or a
square overflowed) or, in float32 work, squares lost to underflow send the statistics
again over the data scaled by a power of two (:func:`batchnorm.core.sums.range_scale`),
under JAX by a ``jax.lax.cond``. NaN and Inf propagate, feature by feature, and never raise.
"""

from __future__ import annotations

import math

from .._validation import Layout
from .._validation import layout as _layout
from .._xp import device, stats_dtype, work_dtype
from .coef import (
    backward_coef,
    centred_grad_sum,
    input_grad_coef,
    mean_offset,
    output_coef,
    overflow_limit,
    overflow_scale,
)
from .coef import inv_std as _inv_std
from .ops import rounded, where
from .sums import accurate_sum as _sum
from .sums import moments_of, shifted_sums

__all__ = [
    "Layout",
    "affine_centred",
    "backward",
    "centred",
    "dx_centred",
    "evaluate",
    "grad_sums",
    "input_grad",
    "layout",
    "moments",
    "normalize",
    "overflow_h",
    "scale_shift",
    "train",
]


def layout(shape: tuple[int, ...], axes: int | tuple[int, ...]) -> Layout:
    """The :class:`batchnorm._validation.Layout` of data of ``shape`` with feature axes
    ``axes`` (negative allowed; computed once per distinct pair)."""
    return _layout(tuple(shape), axes)


def overflow_h(xp, mean, var, count: int, x):
    """The per-feature overflow scale ``h`` of the rounding-safe form for data ``x`` (the
    one overflow rule, :func:`batchnorm.core.coef.overflow_scale`, with ``big`` from the
    largest finite value of the working dtype: :func:`batchnorm.core.coef.overflow_limit`).
    ``mean``/``var`` in the broadcast shape (or the feature shape), ``count`` the values per
    feature they came from (0 for given statistics)."""
    wt = work_dtype(xp, x.dtype)
    shift = _as(xp, _as(xp, mean, wt), mean.dtype)
    return overflow_scale(mean, var, shift, count, overflow_limit(float(xp.finfo(wt).max)))


def _work(xp, x):
    return _as(xp, x, work_dtype(xp, x.dtype))


def _as(xp, v, dtype):
    """``v`` (an array) in ``dtype``: itself when it already is (no call into ``xp``)."""
    return v if v.dtype == dtype else xp.astype(v, dtype)


def moments(xp, x, red: tuple[int, ...], sdt):
    """Per-feature mean and biased variance of ``x`` (float16/bfloat16/float32/float64)
    over the axes ``red`` by the shifted two-pass (module notes): ``(mean, var)`` in the
    broadcast shape (reduced axes of size 1) and the statistics dtype ``sdt``."""
    n = math.prod(x.shape[i] for i in red)
    shift, _, t1, t2, hs = shifted_sums(xp, _work(xp, x), red, sdt, n)
    return moments_of(shift, t1, t2, n, hs)


def centred(xp, xw, mean, h):
    """The one centring of the library: ``(shift, d)``, the shift (``mean`` rounded to the
    working dtype, in the dtype of ``mean``) and ``d = x h - s h``
    (exact near the mean, and safe from overflow). ``h`` the Python float 1.0 (a static
    value, not data) skips the scaling. ``d`` is in the working dtype (also for float16
    NumPy data, which NumPy's backend reads as they are)."""
    wt = work_dtype(xp, xw.dtype)
    shift = rounded(mean, xw)
    if isinstance(h, float) and h == 1.0:
        return shift, xw - _as(xp, shift, wt)
    d = xw * _as(xp, h, wt)
    d -= _as(xp, shift * h, wt)
    return shift, d


def _affine(xp, d, a, c):
    """``d * a + c`` written into ``d`` (a temporary of ours): in-place operators are in
    the standard and rebind immutable arrays (JAX); each full-size temporary saved is a
    fresh allocation, and its page faults, saved."""
    d *= _as(xp, a, d.dtype)
    d += _as(xp, c, d.dtype)
    return d


def normalize(xp, x, mean, var, inv, gamma, beta, count: int, out_dtype):
    """``y = (x - mean) * inv * gamma + beta`` in the rounding-safe form of
    :mod:`batchnorm.core.coef`: ``y = (x h - s h) a_h + c`` with ``s`` the mean rounded
    to the working dtype and ``h`` the overflow scale (applied always; 1 is exact).

    Parameters
    ----------
    xp : array namespace of ``x``
    x : array, any shape
    mean, var, inv : arrays in the broadcast shape, dtype ``sdt``
        The statistics normalized with, and ``inv = 1/sqrt(var + eps)``.
    gamma, beta : arrays in the broadcast shape, or None (1 and 0)
    count : int
        Values per feature the statistics came from (0 for given statistics: then only
        the size of the mean enters the overflow rule).
    out_dtype : dtype of ``xp``

    Returns
    -------
    y : array, shape of ``x``, dtype ``out_dtype``
    """
    h = overflow_h(xp, mean, var, count, x)
    a = inv if gamma is None else inv * gamma
    return scale_shift(xp, x, mean, a, beta, h, out_dtype)


def scale_shift(xp, x, mean, a, beta, h, out_dtype, delta=0.0):
    """``y = (x - mean) * a + beta`` per feature in the rounding-safe form, with the
    overflow scale ``h`` given (the output pass of :func:`normalize`; NumPy's too). With
    ``delta`` the mean is ``mean + delta`` held unrounded (a shift and the mean's offset
    from it: :func:`batchnorm.core.coef.mean_offset`): the data are centred on ``mean``
    and ``delta`` enters the bias, as in NumPy's fused training pass.

    Parameters
    ----------
    xp : array namespace of ``x``
    x : array, any shape
    mean, a : arrays in the broadcast shape, dtype ``sdt``
    beta : array in the broadcast shape, or None (0)
    h : array in the broadcast shape, or 1.0
    out_dtype : dtype of ``xp``
    delta : array in the broadcast shape, or 0.0

    Returns
    -------
    y : array, shape of ``x``, dtype ``out_dtype``
    """
    shift, d = centred(xp, _work(xp, x), mean, h)  # delta only enters the bias
    return affine_centred(xp, d, mean_offset(mean, delta, shift), a, beta, h, out_dtype)


def affine_centred(xp, d, offset, a, beta, h, out_dtype):
    """The output pass on centred data ``d = x h - s h`` (:func:`centred`, overwritten):
    ``y = d a/h + (beta - offset a)`` with ``offset = mean - s``, in ``out_dtype``."""
    a_h, c = output_coef(offset, a, 1.0, _beta(beta), 0.0, h)
    return _as(xp, _affine(xp, d, a_h, c), out_dtype)


def _beta(beta):
    return 0.0 if beta is None else beta


def grad_sums(xp, x, dy, mean, red: tuple[int, ...], sdt, h):
    """``(sum(dy), sum(dy * (x - mean)))`` per feature, accumulated in ``sdt``.

    Parameters
    ----------
    xp : array namespace
    x, dy : arrays of one shape
    mean : array in the broadcast shape, dtype ``sdt``
    red : tuple of int
        The reduced axes.
    sdt : dtype of ``xp``
    h : array in the broadcast shape
        The overflow scale (:func:`batchnorm.core.coef.overflow_scale`).

    Returns
    -------
    sum_dy, sum_dy_xc : arrays in the broadcast shape, dtype ``sdt``
    """
    xw, dyw = _work(xp, x), _work(xp, dy)
    shift, d = centred(xp, xw, mean, h)
    sum_dy = _sum(xp, dyw, red, sdt)
    sum_dy_d = _sum(xp, dyw * d, red, sdt)
    return sum_dy, centred_grad_sum(sum_dy_d, sum_dy, mean, shift, h)


def input_grad(xp, x, dy, mean, k, p, q, out_dtype, h):
    """``dx = k dy + p (x - mean) + q`` per feature, in the rounding-safe form.

    Parameters
    ----------
    xp : array namespace
    x, dy : arrays of one shape
    mean, k, p, q, h : arrays in the broadcast shape
        ``k = gamma * inv``; ``(p, q)`` from :func:`batchnorm.core.coef.backward_coef`;
        ``h`` the overflow scale.
    out_dtype : dtype of ``xp``

    Returns
    -------
    dx : array, shape of ``x``, dtype ``out_dtype``
    """
    xw, dyw = _work(xp, x), _work(xp, dy)
    shift, d = centred(xp, xw, mean, h)
    p_h, q_s = input_grad_coef(p, q, mean, shift, h)
    return dx_centred(xp, d, dyw, k, p_h, q_s, out_dtype)


def _k_dy(xp, dyw, k, work):  # float64 dy, float32 x: in float64; float16 dy: float32
    return dyw * _as(xp, k, xp.result_type(dyw.dtype, work))


def dx_given(xp, dyw, k, work, out_dtype):
    """``dx = k dy`` with given statistics: free of ``x`` (an infinite ``x`` stays out)."""
    return _as(xp, _k_dy(xp, dyw, k, work), out_dtype)


def dx_centred(xp, d, dyw, k, p_h, q_s, out_dtype):
    """``dx = (d p_h + q_s) + k dy`` on centred data ``d`` (:func:`centred`, overwritten);
    ``(p_h, q_s)`` from :func:`batchnorm.core.coef.input_grad_coef`."""
    dx = _affine(xp, d, p_h, q_s)
    k_dy = _k_dy(xp, dyw, k, dx.dtype)
    if k_dy.dtype == dx.dtype:
        dx += k_dy
    else:
        dx = dx + k_dy
    return _as(xp, dx, out_dtype)


def _per_feature(xp, v, sdt, bshape):
    """A per-feature array (feature shape) in ``sdt`` and the broadcast shape; None stays."""
    return None if v is None else xp.reshape(xp.astype(v, sdt), bshape)


def _axes(axes):
    return axes if isinstance(axes, int) else tuple(axes)


def _sdt(xp, x, sdt):
    return stats_dtype(xp, device(x)) if sdt is None else sdt


def train(xp, x, axes, gamma=None, beta=None, eps=1e-5, sdt=None):
    """Training forward: batch statistics, then ``y``.

    ``y`` reuses the centred data ``d = x - s`` of the statistics pass and the offset
    ``delta = sum(d)/n = mean - s`` itself (not ``mean - s`` recomputed from the mean,
    which float32 statistics could not hold at a large offset): ``y = d a + (beta - delta
    a)``. This is :func:`normalize` without the overflow scale, which would change no bit:
    ``x h - s h = h (x - s)`` exactly unless ``x - s`` overflows, and a ``d`` that
    overflows has already made the statistics infinite.

    Parameters
    ----------
    xp : array namespace of ``x``
    x : array, shape (N, C, ...) or any layout, float16/bfloat16/float32/float64
    axes : int or tuple of int
        Feature axes (static under ``jax.jit``).
    gamma, beta : arrays of the feature shape, or None (1 and 0)
    eps : float or 0-d array
    sdt : dtype of ``xp``, optional
        The statistics dtype; default :func:`batchnorm._xp.stats_dtype` of ``x``'s device.

    Returns
    -------
    y : array, shape and dtype of ``x``
    mean, var, inv_std : arrays of the feature shape, dtype ``sdt``
        Batch mean, biased batch variance and ``1/sqrt(var + eps)``.
    """
    lay = layout(tuple(x.shape), _axes(axes))
    sdt = _sdt(xp, x, sdt)
    xw = _work(xp, x)
    shift, d, t1, t2, hs = shifted_sums(xp, xw, lay.red, sdt, lay.count)
    mean, var = moments_of(shift, t1, t2, lay.count, hs)
    inv = _inv_std(var, eps)
    g = _per_feature(xp, gamma, sdt, lay.bshape)
    b = _per_feature(xp, beta, sdt, lay.bshape)
    if d is None:  # rescaled statistics (data near the ends of the range): the scaled pass
        y = normalize(xp, x, mean, var, inv, g, b, lay.count, x.dtype)
        return y, *(xp.reshape(v, lay.fshape) for v in (mean, var, inv))
    delta = t1 / lay.count  # mean - shift, exactly as the sums give it
    if isinstance(hs, float):
        a, c = output_coef(delta, inv, 1.0 if g is None else g, _beta(b), 0.0, 1.0)
    else:  # JAX: d = x hs - shift (hs is 1 unless rescaled); a variance that overflowed
        # sdt gives NaN outputs, as a non-finite one does (not beta from inv = 0)
        a, c = output_coef(delta / hs, inv, 1.0 if g is None else g, _beta(b), 0.0, hs)
        a = where(xp.isfinite(var), a, math.nan)
    y = xp.astype(_affine(xp, d, a, c), x.dtype, copy=False)
    return y, *(xp.reshape(v, lay.fshape) for v in (mean, var, inv))


def evaluate(xp, x, axes, gamma, beta, mean, var, eps=1e-5, sdt=None):
    """Evaluation forward: ``y`` normalized with given statistics (eps always added).

    Parameters
    ----------
    xp : array namespace of ``x``
    x : array, any layout, float16/bfloat16/float32/float64
    axes : int or tuple of int
        Feature axes (static under ``jax.jit``).
    gamma, beta : arrays of the feature shape, or None (1 and 0)
    mean, var : arrays of the feature shape (any float dtype; used in ``sdt``)
    eps : float or 0-d array
    sdt : dtype of ``xp``, optional

    Returns
    -------
    y : array, shape and dtype of ``x``
    """
    lay = layout(tuple(x.shape), _axes(axes))
    sdt = _sdt(xp, x, sdt)
    m, v = (_per_feature(xp, a, sdt, lay.bshape) for a in (mean, var))
    g, b = (_per_feature(xp, a, sdt, lay.bshape) for a in (gamma, beta))
    return normalize(xp, x, m, v, _inv_std(v, eps), g, b, 0, x.dtype)


def backward(xp, x, dy, axes, mean, var, inv_std, gamma, batch_stats: bool, count=None, sdt=None):
    """Gradients of a forward pass: ``(dx, dgamma, dbeta)``.

    With batch statistics (``batch_stats`` True)
    ``dx = k (dy - mean(dy) - x_hat mean(dy x_hat))``, ``k = gamma * inv_std``, written as
    ``dx = k dy + p (x - mean) + q`` (:func:`batchnorm.core.coef.backward_coef`); with given
    statistics (evaluation) they are constants and ``dx = k dy``. ``x`` is centred once for
    the sums and ``dx``. With float32 statistics (``sdt`` float32) and batch statistics of
    this ``x`` (``count`` equal to its values per feature), ``mean - s`` is measured again as
    ``sum(d)/n``, as in :func:`train`, rather than taken from the float32 mean.

    Parameters
    ----------
    xp : array namespace of ``x``
    x, dy : arrays of one shape (the forward input and the upstream gradient)
    axes : int or tuple of int
        Feature axes (static under ``jax.jit``).
    mean, var, inv_std : arrays of the feature shape
        From the forward pass.
    gamma : array of the feature shape, or None (1)
    batch_stats : bool
    count : int, optional
        Values per feature of the statistics (default: those of ``x``; more after
        statistics synchronized over processes).
    sdt : dtype of ``xp``, optional

    Returns
    -------
    dx : array, shape and dtype of ``x``
    dgamma, dbeta : arrays of the feature shape, dtype ``sdt``
        ``sum(dy * x_hat)`` and ``sum(dy)``.
    """
    lay = layout(tuple(x.shape), _axes(axes))
    sdt = _sdt(xp, x, sdt)
    n = lay.count if count is None else count
    mean_b, var_b, inv_b = (_per_feature(xp, a, sdt, lay.bshape) for a in (mean, var, inv_std))
    g = _per_feature(xp, gamma, sdt, lay.bshape)
    k = inv_b if g is None else inv_b * g
    xw, dyw = _work(xp, x), _work(xp, dy)
    shift = rounded(mean_b, xw)
    if batch_stats:
        # |x - mean| <= sqrt(n var) keeps x - s inside the working range whenever the batch
        # statistics are finite, so x h - s h = h (x - s) exactly: the overflow scale of
        # the rounding-safe form changes no bit here, and d is formed without it
        h = 1.0
        d = xw - xp.astype(shift, xw.dtype)
    else:
        h = overflow_h(xp, mean_b, var_b, 0, xw)
        _, d = centred(xp, xw, mean_b, h)
    sum_dy = _sum(xp, dyw, lay.red, sdt)
    sum_dy_d = _sum(xp, dyw * d, lay.red, sdt)
    m_rel, s_rel = mean_b, shift  # the mean relative to the shift: (mean, s) or (delta, 0)
    if batch_stats and n == lay.count and sdt != xp.float64:
        m_rel, s_rel = _sum(xp, d, lay.red, sdt) / n, 0.0
    sum_dy_xc = centred_grad_sum(sum_dy_d, sum_dy, m_rel, s_rel, h)
    if batch_stats:
        p, q = backward_coef(sum_dy, sum_dy_xc, inv_b, k, n)
        p_h, q_s = input_grad_coef(p, q, m_rel, s_rel, h)
        dx = dx_centred(xp, d, dyw, k, p_h, q_s, x.dtype)
    else:
        dx = dx_given(xp, dyw, k, dyw.dtype, x.dtype)
    return dx, xp.reshape(inv_b * sum_dy_xc, lay.fshape), xp.reshape(sum_dy, lay.fshape)
