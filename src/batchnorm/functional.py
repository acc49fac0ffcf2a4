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
    "BACKENDS",
    "BatchNormCache",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_train",
    "moments",
    "numba_available",
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
# Four primitives make up every pass; the compiled backend implements the same four.


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


def _np_moments(x, axes, bshape):
    """Per-feature mean and biased variance (float64, broadcast shape).

    Two passes: a float64 mean ``m0``, then the mean square of ``d = x - s`` with ``s`` =
    ``m0`` rounded to working precision, less ``(m0 - s)^2``. For float64 input ``d`` is
    exact and the corrected two-pass form also uses ``mean(d)`` to repair summation error
    in ``m0`` (NumPy sums naively along non-contiguous axes, which matters at offsets of
    ~1e9 std); for float16/32 input ``m0`` is already exact to float64 round-off.
    """
    red = reduce_axes(x.ndim, axes)
    m0 = np.mean(x, axis=red, dtype=np.float64, keepdims=True)
    d, delta = _centre(x, m0)
    if d.dtype == np.float64:
        mean_d = np.mean(d, axis=red, dtype=np.float64, keepdims=True)
        mean = (m0 - delta) + mean_d
    else:
        mean_d, mean = delta, m0
    msq = np.mean(np.square(d, out=d), axis=red, dtype=np.float64, keepdims=True)
    return mean, np.maximum(msq - mean_d * mean_d, 0.0)


def _np_affine(x, axes, mean_b, scale_b, bias_b):
    """y = (x - mean) * scale + bias, all per-feature arrays in broadcast shape."""
    d, delta = _centre(x, mean_b)
    wt = d.dtype
    d *= scale_b.astype(wt)
    d += (bias_b - delta * scale_b).astype(wt)
    return d.astype(x.dtype, copy=False)


def _np_grad_sums(x, dy, axes, mean_b):
    """sum(dy) and sum(dy * (x - mean)) per feature, accumulated in float64."""
    red = reduce_axes(x.ndim, axes)
    d, delta = _centre(x, mean_b)
    sum_dy = np.sum(dy, axis=red, dtype=np.float64, keepdims=True)
    d *= dy
    sum_dy_d = np.sum(d, axis=red, dtype=np.float64, keepdims=True)
    return sum_dy, sum_dy_d - delta * sum_dy


def _np_input_grad(x, dy, axes, mean_b, k_b, p_b, q_b):
    """dx = k * dy + p * (x - mean) + q per feature."""
    d, delta = _centre(x, mean_b)
    wt = d.dtype
    d *= p_b.astype(wt)
    d += (q_b - p_b * delta).astype(wt)
    d += np.multiply(dy, k_b.astype(wt), dtype=wt)
    return d.astype(x.dtype, copy=False)


# --------------------------------------------------------------------------- dispatch
BACKENDS = ("auto", "numpy", "numba")
# Below this many elements "auto" stays with NumPy: launching the compiled parallel kernels
# costs ~70 us per call, more than NumPy needs for the whole job (measured crossover ~16K
# elements on 2 cores), and small arrays interleaved with BLAS calls suffer most from
# thread contention.
AUTO_NUMBA_MIN_SIZE = 1 << 15
_kernels_module = None


def _load_kernels():
    """The compiled kernels module, or None when numba is not importable (imported lazily)."""
    global _kernels_module
    if _kernels_module is None:
        try:
            from . import _kernels
        except ImportError:
            _kernels_module = False
        else:
            _kernels_module = _kernels
    return _kernels_module or None


def numba_available() -> bool:
    """Whether the compiled backend can be used (numba importable)."""
    return _load_kernels() is not None


class _Backend:
    """The four primitives on per-feature float64 vectors, for one array layout."""

    def __init__(self, name: str, x: np.ndarray, axes: tuple[int, ...]):
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
        small = name == "auto" and x.size < AUTO_NUMBA_MIN_SIZE
        kern = None if name == "numpy" or small else _load_kernels()
        if name == "numba" and kern is None:
            raise ImportError("backend='numba' needs numba: pip install numba")
        # feature axes that are not adjacent take the general (NumPy) path
        self.kern = kern if kern is not None and kern.supported(axes) else None
        self.name = "numba" if self.kern is not None else "numpy"
        self.x, self.axes = x, axes
        self.fshape = feature_shape(x.shape, axes)
        self.bshape = broadcast_shape(x.ndim, axes, x.shape)
        self._xw = None

    def _b(self, v):
        return v.reshape(self.bshape)

    def _work(self):
        if self._xw is None:
            self._xw = self.kern._work_array(self.x)
        return self._xw

    def moments(self):
        if self.kern is not None:
            mean, var, self._xw = self.kern.moments(self.x, self.axes)
            return mean.reshape(self.fshape), var.reshape(self.fshape)
        mean, var = _np_moments(self.x, self.axes, self.bshape)
        return mean.reshape(self.fshape), var.reshape(self.fshape)

    def affine(self, mean, scale, bias):
        if self.kern is not None:
            return self.kern.affine(
                self._work(), self.axes, mean.ravel(), scale.ravel(), bias.ravel(), self.x.dtype
            )
        return _np_affine(self.x, self.axes, self._b(mean), self._b(scale), self._b(bias))

    def grad_sums(self, dy, mean):
        if self.kern is not None:
            xw = self._work()
            s1, s2 = self.kern.grad_sums(xw, self.kern.as_work(dy, xw), self.axes, mean.ravel())
        else:
            s1, s2 = _np_grad_sums(self.x, dy, self.axes, self._b(mean))
        return s1.reshape(self.fshape), s2.reshape(self.fshape)

    def input_grad(self, dy, mean, k, p, q):
        if self.kern is not None:
            xw = self._work()
            return self.kern.input_grad(
                xw,
                self.kern.as_work(dy, xw),
                self.axes,
                mean.ravel(),
                k.ravel(),
                p.ravel(),
                q.ravel(),
                self.x.dtype,
            )
        return _np_input_grad(
            self.x, dy, self.axes, self._b(mean), self._b(k), self._b(p), self._b(q)
        )


# --------------------------------------------------------------------------- public API
def _prepare(x, gamma, beta, axis, eps):
    x = as_input(x)
    axes = normalize_axes(axis, x.ndim)
    fshape = feature_shape(x.shape, axes)
    g = None if gamma is None else as_feature_vector(gamma, "gamma", fshape, x.shape)
    b = None if beta is None else as_feature_vector(beta, "beta", fshape, x.shape)
    return x, axes, fshape, g, b, check_eps(eps)


def _check_not_empty(x: np.ndarray, what: str) -> None:
    if x.size == 0:
        raise ValueError(f"cannot {what} an empty batch: x has shape {x.shape}")


def moments(
    x: np.ndarray, *, axis: Axis = 1, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and biased variance of ``x``, accumulated in float64.

    Parameters
    ----------
    x : ndarray, shape (N, C, *spatial) or any layout, float16/32/64
    axis : int or tuple of int
        Feature axis (or axes); statistics reduce over all the others.
    backend : {"auto", "numpy", "numba"}
        "auto" uses the compiled kernels when numba is importable and ``x`` has at least
        ``AUTO_NUMBA_MIN_SIZE`` (32768) elements.

    Returns
    -------
    mean, var : ndarray, shape (*features), float64
    """
    x = as_input(x)
    axes = normalize_axes(axis, x.ndim)
    _check_not_empty(x, "compute statistics of")
    with _quiet():
        return _Backend(backend, x, axes).moments()


def batch_norm_train(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    *,
    axis: Axis = 1,
    eps: float = 1e-5,
    backend: str = "auto",
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
    backend : {"auto", "numpy", "numba"}
        "auto" uses the compiled kernels when numba is importable and ``x`` has at least
        ``AUTO_NUMBA_MIN_SIZE`` (32768) elements; feature axes that are not adjacent always
        take the NumPy path.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : BatchNormCache
        ``cache.mean`` and ``cache.var`` are the batch mean and biased batch variance.
    """
    x, axes, fshape, g, b, eps = _prepare(x, gamma, beta, axis, eps)
    _check_not_empty(x, "normalize")
    be = _Backend(backend, x, axes)
    with _quiet():
        mean, var = be.moments()
        inv_std = 1.0 / np.sqrt(var + eps)
        scale = inv_std if g is None else inv_std * g
        y = be.affine(mean, scale, np.zeros(fshape) if b is None else b)
    cache = BatchNormCache(
        x=x,
        gamma=None if g is None else g.copy(),
        has_beta=b is not None,
        mean=mean,
        var=var,
        inv_std=inv_std,
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
    backend: str = "auto",
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
    backend : {"auto", "numpy", "numba"}

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : BatchNormCache, only when ``return_cache`` is True
    """
    x, axes, fshape, g, b, eps = _prepare(x, gamma, beta, axis, eps)
    rm = as_feature_vector(running_mean, "running_mean", fshape, x.shape)
    rv = as_feature_vector(running_var, "running_var", fshape, x.shape)
    be = _Backend(backend, x, axes)
    with _quiet():
        inv_std = 1.0 / np.sqrt(rv + eps)
        scale = inv_std if g is None else inv_std * g
        y = be.affine(rm, scale, np.zeros(fshape) if b is None else b)
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
    dy: np.ndarray, cache: BatchNormCache, *, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of a batch-norm forward pass.

    Parameters
    ----------
    dy : ndarray, same shape as ``cache.x``, float16/32/64
        Upstream gradient; never modified.
    cache : BatchNormCache
        From :func:`batch_norm_train`, or :func:`batch_norm_eval` with ``return_cache=True``.
    backend : {"auto", "numpy", "numba"}

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
    be = _Backend(backend, cache.x, cache.axis)
    inv_std, mean = cache.inv_std, cache.mean
    with _quiet():
        sum_dy, sum_dy_xc = be.grad_sums(dy, mean)
        sum_dy_xhat = inv_std * sum_dy_xc  # = dgamma
        k = inv_std if cache.gamma is None else inv_std * cache.gamma
        if cache.batch_stats:
            # dx = k (dy - mean(dy) - x_hat mean(dy x_hat)), x_hat = (x - mean) inv_std
            m = cache.count
            p, q = -k * inv_std * sum_dy_xhat / m, -k * sum_dy / m
        else:  # statistics are constants: dx = k dy
            p = q = np.zeros_like(k)
        dx = be.input_grad(dy, mean, k, p, q)
    dgamma = None if cache.gamma is None else sum_dy_xhat
    dbeta = sum_dy if cache.has_beta else None
    return dx, dgamma, dbeta
