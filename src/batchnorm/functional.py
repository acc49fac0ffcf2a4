r"""Pure batch-normalization kernels.

For each feature :math:`c` (the entries along ``axis``), with the statistics taken over the
:math:`m` values of all other axes,

.. math::

    \mu_c = \frac{1}{m}\sum_i x_{ic}, \qquad
    \sigma^2_c = \frac{1}{m}\sum_i (x_{ic}-\mu_c)^2, \qquad
    \hat x_{ic} = \frac{x_{ic}-\mu_c}{\sqrt{\sigma^2_c+\epsilon}}, \qquad
    y_{ic} = \gamma_c \hat x_{ic} + \beta_c .

In evaluation mode :math:`\mu_c, \sigma^2_c` are given (the running statistics) and are
constants for the backward pass. With batch statistics the backward pass is

.. math::

    \frac{\partial L}{\partial x_{ic}} = \frac{\gamma_c}{\sqrt{\sigma^2_c+\epsilon}}
    \Bigl(dy_{ic} - \overline{dy}_c - \hat x_{ic}\,\overline{dy\,\hat x}_c\Bigr),
    \qquad d\gamma_c = \sum_i dy_{ic}\hat x_{ic}, \qquad d\beta_c = \sum_i dy_{ic},

where bars are means over the :math:`m` values of the feature.

Numerics. Statistics are accumulated in float64. The data are centred before squaring on a
per-feature shift :math:`s_c`, the mean rounded to the working precision (float64 for float64
input, float32 otherwise). ``x - s`` is then exact or correctly rounded, so the variance
:math:`\overline{(x-s)^2} - (\mu-s)^2` never cancels catastrophically, even at mean 1e6 and
std 1 in float32. The elementwise work runs in the working precision; float16 input is
computed in float32. Results come back in the input dtype. The kernels never write to their
inputs, and NaN/Inf propagate without raising.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._validation import (
    as_feature_vector,
    as_float_array,
    as_input,
    broadcast_shape,
    check_eps,
    feature_shape,
    normalize_axes,
    reduce_axes,
)

__all__ = [
    "BatchNormCache",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_train",
    "moments",
]

Axis = int | Sequence[int]


# NaN/Inf are data here, not errors: they propagate through the arithmetic silently.
def _quiet() -> np.errstate:
    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


def _work_dtype(dtype: np.dtype) -> np.dtype:
    """Precision of the elementwise work: float64 stays, float16/float32 run in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


@dataclass(frozen=True, eq=False)
class BatchNormCache:
    """What the backward pass needs from a forward pass.

    Attributes
    ----------
    x : ndarray
        The forward input (a reference, not a copy: do not modify it before the backward pass).
    gamma : ndarray or None, shape (*features)
        A float64 copy of the scale used, or None.
    has_beta : bool
        Whether a shift was used (then the backward pass returns ``dbeta``).
    mean, var : ndarray, shape (*features), float64
        The statistics used to normalize: batch mean and biased batch variance when
        ``batch_stats`` is True, the running statistics otherwise.
    inv_std : ndarray, shape (*features), float64
        ``1 / sqrt(var + eps)``.
    axis : tuple of int
        The feature axes, non-negative and sorted.
    eps : float
    batch_stats : bool
        True when ``mean``/``var`` were computed from ``x`` (training): their dependence on
        ``x`` enters the gradient. False when they were given (evaluation): constants.
    """

    x: np.ndarray
    gamma: np.ndarray | None
    has_beta: bool
    mean: np.ndarray
    var: np.ndarray
    inv_std: np.ndarray
    axis: tuple[int, ...]
    eps: float
    batch_stats: bool

    @property
    def count(self) -> int:
        """Number of values per feature that the statistics reduce over."""
        return int(self.x.size // max(1, int(np.prod(self.mean.shape))))

    @property
    def x_hat(self) -> np.ndarray:
        """The normalized input, recomputed in float64 (for inspection and teaching)."""
        bshape = broadcast_shape(self.x.ndim, self.axis, self.x.shape)
        return (self.x.astype(np.float64) - self.mean.reshape(bshape)) * self.inv_std.reshape(
            bshape
        )


# --------------------------------------------------------------------------- numpy kernels
def _centre(x: np.ndarray, mean_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``d = x - s`` in working precision and ``delta = mean - s`` in float64.

    ``s`` is ``mean`` rounded to the working precision; ``x - s`` is exact when x and s are
    close (Sterbenz) and correctly rounded otherwise, so ``d - delta`` is ``x - mean`` to
    working precision without a float64 copy of ``x``.
    """
    wt = _work_dtype(x.dtype)
    shift = mean_b.astype(wt)
    d = np.subtract(x, shift, dtype=wt)
    return d, mean_b - shift.astype(np.float64)


def _moments_numpy(x: np.ndarray, red: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and biased variance, float64, keepdims shape."""
    mean = np.mean(x, axis=red, dtype=np.float64, keepdims=True)
    d, delta = _centre(x, mean)
    # Mean of squares about the shift, accumulated in float64, minus the (tiny) offset
    # between the shift and the true mean: the corrected two-pass formula.
    msq = np.mean(np.square(d), axis=red, dtype=np.float64, keepdims=True)
    var = np.maximum(msq - delta * delta, 0.0)
    return mean, var


def _normalize_numpy(
    x: np.ndarray,
    mean_b: np.ndarray,
    inv_std_b: np.ndarray,
    gamma_b: np.ndarray | None,
    beta_b: np.ndarray | None,
) -> np.ndarray:
    """y = (x - mean) * inv_std * gamma + beta, as one multiply-add per element."""
    d, delta = _centre(x, mean_b)
    scale = inv_std_b if gamma_b is None else inv_std_b * gamma_b
    bias = -delta * scale
    if beta_b is not None:
        bias = bias + beta_b
    wt = d.dtype
    d *= scale.astype(wt)
    d += bias.astype(wt)
    return d.astype(x.dtype, copy=False)


def _backward_numpy(dy: np.ndarray, cache: BatchNormCache, bshape: tuple[int, ...]):
    x = cache.x
    red = reduce_axes(x.ndim, cache.axis)
    wt = _work_dtype(x.dtype)
    mean_b = cache.mean.reshape(bshape)
    inv_std_b = cache.inv_std.reshape(bshape)
    gamma_b = None if cache.gamma is None else cache.gamma.reshape(bshape)
    need_xhat_sum = cache.batch_stats or gamma_b is not None

    sum_dy = np.sum(dy, axis=red, dtype=np.float64, keepdims=True)
    sum_dy_xhat = None
    d = delta = None
    if need_xhat_sum:
        d, delta = _centre(x, mean_b)
        sum_dy_d = np.sum(np.multiply(d, dy, dtype=wt), axis=red, dtype=np.float64, keepdims=True)
        sum_dy_xhat = inv_std_b * (sum_dy_d - delta * sum_dy)

    k = inv_std_b if gamma_b is None else inv_std_b * gamma_b
    if cache.batch_stats:
        # dx = k * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with x_hat = (d - delta) * inv_std,
        # rearranged as b * d + c + k * dy per feature: one fused pass reusing d.
        m = cache.count
        b = -k * inv_std_b * sum_dy_xhat / m
        c = -b * delta - k * sum_dy / m
        d *= b.astype(wt)
        d += c.astype(wt)
        d += np.multiply(dy, k.astype(wt), dtype=wt)
        dx = d
    else:
        dx = np.multiply(dy, k.astype(wt), dtype=wt)

    fshape = cache.mean.shape
    dgamma = None if cache.gamma is None else sum_dy_xhat.reshape(fshape).copy()
    dbeta = sum_dy.reshape(fshape).copy() if cache.has_beta else None
    return dx.astype(x.dtype, copy=False), dgamma, dbeta


# --------------------------------------------------------------------------- public API
def _prepare(x, gamma, beta, axis, eps):
    x = as_input(x)
    axes = normalize_axes(axis, x.ndim)
    fshape = feature_shape(x.shape, axes)
    g = None if gamma is None else as_feature_vector(gamma, "gamma", fshape, x.shape)
    b = None if beta is None else as_feature_vector(beta, "beta", fshape, x.shape)
    return x, axes, fshape, g, b, check_eps(eps)


def moments(x: np.ndarray, *, axis: Axis = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and biased variance of ``x``, accumulated in float64.

    Parameters
    ----------
    x : ndarray, shape (N, C, *spatial) or any layout, float16/32/64
    axis : int or tuple of int
        Feature axis (or axes); statistics reduce over all the others.

    Returns
    -------
    mean, var : ndarray, shape (*features), float64
    """
    x = as_input(x)
    axes = normalize_axes(axis, x.ndim)
    fshape = feature_shape(x.shape, axes)
    if x.size == 0:
        raise ValueError(f"cannot compute statistics of an empty batch: x has shape {x.shape}")
    with _quiet():
        mean, var = _moments_numpy(x, reduce_axes(x.ndim, axes))
    return mean.reshape(fshape), var.reshape(fshape)


def batch_norm_train(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    *,
    axis: Axis = 1,
    eps: float = 1e-5,
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch-norm forward pass with batch statistics (training mode).

    Parameters
    ----------
    x : ndarray, shape (N, C, *spatial) or any layout, float16/32/64
        Input; never modified.
    gamma, beta : ndarray, shape (*features), or None
        Scale and shift; None means 1 and 0.
    axis : int or tuple of int
        Feature axis (or axes); negative allowed. Statistics reduce over all the others.
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : BatchNormCache
        ``cache.mean`` and ``cache.var`` are the batch mean and biased batch variance.
    """
    x, axes, fshape, g, b, eps = _prepare(x, gamma, beta, axis, eps)
    if x.size == 0:
        raise ValueError(f"cannot normalize an empty batch: x has shape {x.shape}")
    bshape = broadcast_shape(x.ndim, axes, x.shape)
    with _quiet():
        mean_b, var_b = _moments_numpy(x, reduce_axes(x.ndim, axes))
        inv_std_b = 1.0 / np.sqrt(var_b + eps)
        y = _normalize_numpy(
            x,
            mean_b,
            inv_std_b,
            None if g is None else g.reshape(bshape),
            None if b is None else b.reshape(bshape),
        )
    cache = BatchNormCache(
        x=x,
        gamma=None if g is None else g.copy(),
        has_beta=b is not None,
        mean=mean_b.reshape(fshape),
        var=var_b.reshape(fshape),
        inv_std=inv_std_b.reshape(fshape),
        axis=axes,
        eps=eps,
        batch_stats=True,
    )
    return y, cache


def batch_norm_eval(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    *,
    axis: Axis = 1,
    eps: float = 1e-5,
    return_cache: bool = False,
) -> np.ndarray | tuple[np.ndarray, BatchNormCache]:
    """Batch-norm forward pass with given statistics (evaluation mode).

    Parameters
    ----------
    x : ndarray, shape (N, C, *spatial) or any layout, float16/32/64
    gamma, beta : ndarray, shape (*features), or None
    running_mean, running_var : ndarray, shape (*features)
        The population estimates to normalize with; eps is always added to the variance.
    axis : int or tuple of int
    eps : float
    return_cache : bool
        Also return a cache for :func:`batch_norm_backward`, in which the statistics are
        constants.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : BatchNormCache, only when ``return_cache`` is True
    """
    x, axes, fshape, g, b, eps = _prepare(x, gamma, beta, axis, eps)
    rm = as_feature_vector(running_mean, "running_mean", fshape, x.shape)
    rv = as_feature_vector(running_var, "running_var", fshape, x.shape)
    bshape = broadcast_shape(x.ndim, axes, x.shape)
    with _quiet():
        inv_std = 1.0 / np.sqrt(rv + eps)
        y = _normalize_numpy(
            x,
            rm.reshape(bshape),
            inv_std.reshape(bshape),
            None if g is None else g.reshape(bshape),
            None if b is None else b.reshape(bshape),
        )
    if not return_cache:
        return y
    cache = BatchNormCache(
        x=x,
        gamma=None if g is None else g.copy(),
        has_beta=b is not None,
        mean=rm.copy(),
        var=rv.copy(),
        inv_std=inv_std,
        axis=axes,
        eps=eps,
        batch_stats=False,
    )
    return y, cache


def batch_norm_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of a batch-norm forward pass.

    Parameters
    ----------
    dy : ndarray, same shape as ``cache.x``, float16/32/64
        Upstream gradient; never modified.
    cache : BatchNormCache
        From :func:`batch_norm_train`, or :func:`batch_norm_eval` with ``return_cache=True``.

    Returns
    -------
    dx : ndarray, same shape and dtype as ``cache.x``
    dgamma, dbeta : ndarray, shape (*features), float64, or None when gamma / beta was None
    """
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache must be a BatchNormCache; got {type(cache).__name__}")
    dy = as_float_array(dy, "dy")
    if dy.shape != cache.x.shape:
        raise ValueError(
            f"dy has shape {dy.shape} but the forward input x had shape {cache.x.shape}"
        )
    bshape = broadcast_shape(cache.x.ndim, cache.axis, cache.x.shape)
    with _quiet():
        return _backward_numpy(dy, cache, bshape)
