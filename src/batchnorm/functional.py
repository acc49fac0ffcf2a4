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

Numerics. Statistics are accumulated in float64 and the data are centred before squaring, so
no E[x^2] - E[x]^2 cancellation happens even at mean 1e6 and std 1 in float32: the NumPy path
(:mod:`batchnorm.backends.numpy`) centres on the float64 mean rounded to the working
precision, the compiled path (:mod:`batchnorm.backends.numba.kernels`) on one sample of each feature with
the differences formed in float64. Elementwise work runs in the working precision (float64
for float64 input, float32 otherwise; float16 is computed in float32) in the rounding-safe
form ``(x - s) * a + b``. Results come back in the input dtype. The kernels never write to
their inputs, and NaN/Inf propagate without raising.

Backends. Every pass is made of four primitives (moments, the affine map, the two gradient
sums, the input gradient) that both backends implement with one contract (see
:mod:`batchnorm.backends`); the public functions below compose them, so the maths lives in
one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .backends import BACKENDS, numba_available, select
from .backends.numpy import overflow_scale
from .backends.numpy import work_dtype as _work_dtype
from ._validation import (
    as_feature_vector,
    as_float_array,
    as_input,
    broadcast_shape,
    check_eps,
    feature_shape,
    normalize_axes,
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


@dataclass(frozen=True, eq=False)
class BatchNormCache:
    """What the backward pass needs from a forward pass.

    Attributes
    ----------
    x : ndarray
        The forward input (a reference, not a copy: do not modify it before the backward pass).
    work : ndarray
        The array the backend read (``x`` itself, or its C-contiguous / float16-to-float32
        conversion), kept so the backward pass does not convert ``x`` again.
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
    count : int
        Number of values per feature the statistics reduce over (over all ranks with ``comm``).
    comm : mpi4py communicator or None
        The ranks a synchronized forward merged its statistics over; the backward pass
        reduces its two per-feature sums over the same ranks.
    """

    x: np.ndarray
    work: np.ndarray
    gamma: np.ndarray | None
    has_beta: bool
    mean: np.ndarray
    var: np.ndarray
    inv_std: np.ndarray
    axis: tuple[int, ...]
    eps: float
    batch_stats: bool
    count: int
    comm: object = None

    @property
    def x_hat(self) -> np.ndarray:
        """The normalized input, recomputed in float64 (for inspection and teaching)."""
        bshape = broadcast_shape(self.x.ndim, self.axis, self.x.shape)
        return (self.x.astype(np.float64) - self.mean.reshape(bshape)) * self.inv_std.reshape(
            bshape
        )


# --------------------------------------------------------------------------- public API
def _prepare(x, gamma, beta, axis, eps):
    x = as_input(x)
    axes = normalize_axes(axis, x.ndim)
    fshape = feature_shape(x.shape, axes)
    g = None if gamma is None else as_feature_vector(gamma, "gamma", fshape, x.shape)
    b = None if beta is None else as_feature_vector(beta, "beta", fshape, x.shape)
    return x, axes, fshape, g, b, check_eps(eps)


def _distributed():
    from . import distributed

    return distributed


def _check_dy(dy: object, cache: BatchNormCache) -> np.ndarray:
    dy = as_float_array(dy, "dy")
    if dy.shape != cache.x.shape:
        raise ValueError(
            f"dy has shape {dy.shape} but the forward input x had shape {cache.x.shape}"
        )
    return dy


def _check_not_empty(x: np.ndarray, what: str) -> None:
    if x.size == 0:
        raise ValueError(f"cannot {what} an empty batch: x has shape {x.shape}")


def check_out(out: object, like: np.ndarray, name: str, *inputs: object) -> np.ndarray | None:
    """Validate an ``out=`` array: None, or a writeable C-contiguous ndarray with the shape
    and dtype of ``like`` that shares no memory with any of ``inputs``."""
    if out is None:
        return None
    if type(out) is not np.ndarray:
        raise TypeError(f"{name} must be a numpy.ndarray or None; got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"{name} has shape {out.shape} but the result has shape {like.shape}")
    if out.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {out.dtype} but the result has dtype {like.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} (shape {out.shape}) must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} (shape {out.shape}) is read-only")
    for a in inputs:
        if isinstance(a, np.ndarray) and np.may_share_memory(out, a):
            raise ValueError(
                f"{name} (shape {out.shape}) overlaps an input of shape {a.shape}; pass a "
                "separate array (inputs are never modified)"
            )
    return out


def moments(
    x: np.ndarray, *, axis: Axis = 1, backend: str = "auto", comm: object = None
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
    comm : mpi4py communicator, optional
        Statistics of the union of every rank's ``x`` (ranks may hold no rows; NaN when
        none holds any), bit-identical on every rank; see :mod:`batchnorm.distributed`.

    Returns
    -------
    mean, var : ndarray, shape (*features), float64
    """
    if comm is not None:  # local statistics, merged across ranks
        return _distributed().moments(x, axis=axis, backend=backend, comm=comm)
    x = as_input(x)
    axes = normalize_axes(axis, x.ndim)
    _check_not_empty(x, "compute statistics of")
    be = select(backend, x.size, axes, x.shape)
    with _quiet():
        return be.moments(be.work(x), axes)


def batch_norm_train(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    *,
    axis: Axis = 1,
    eps: float = 1e-5,
    backend: str = "auto",
    out: np.ndarray | None = None,
    comm: object = None,
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
    out : ndarray, optional
        Where to write ``y`` (NumPy's convention): same shape and dtype as ``x``,
        C-contiguous, writeable, sharing no memory with ``x``, ``gamma`` or ``beta``.
        Saves allocating (and page-faulting) a fresh array per call.
    comm : mpi4py communicator, optional
        Synchronized batch norm: the statistics are those of the union of every rank's
        ``x`` (see :mod:`batchnorm.distributed`); the cache remembers ``comm``.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x`` (``out`` when given)
    cache : BatchNormCache
        ``cache.mean`` and ``cache.var`` are the batch mean and biased batch variance.
    """
    if comm is not None:  # local statistics, merged across ranks
        return _distributed().batch_norm_train(
            x, gamma, beta, axis=axis, eps=eps, backend=backend, comm=comm, out=out
        )
    x, axes, fshape, g, b, eps = _prepare(x, gamma, beta, axis, eps)
    _check_not_empty(x, "normalize")
    out = check_out(out, x, "out", x, gamma, beta)
    return train_checked(x, axes, g, b, eps, backend, out)


def train_checked(x, axes, g, b, eps, backend, out=None) -> tuple[np.ndarray, BatchNormCache]:
    """:func:`batch_norm_train` on arguments that are already validated (internal).

    ``x`` a non-empty supported ndarray, ``axes`` normalized, ``g``/``b`` float64 arrays of
    the per-feature shape or None, ``eps`` a checked float, ``out`` checked or None. Used by
    the layers, which validate once per call (and cache what depends only on the layout).
    """
    be = select(backend, x.size, axes, x.shape)
    xw = be.work(x)
    with _quiet():
        if g is None or b is None:
            fshape = tuple(x.shape[a] for a in axes)
            g1 = np.ones(fshape) if g is None else g
            b0 = np.zeros(fshape) if b is None else b
        else:
            g1, b0 = g, b
        y, mean, var = be.train(xw, axes, g1, b0, eps, x.dtype, out)
        inv_std = 1.0 / np.sqrt(var + eps)
    return y, _train_cache(x, xw, axes, mean, var, inv_std, g, b, eps)


def _train_cache(x, xw, axes, mean, var, inv_std, g, b, eps) -> BatchNormCache:
    return BatchNormCache(
        x=x,
        work=xw,
        gamma=None if g is None else g.copy(),
        has_beta=b is not None,
        mean=mean,
        var=var,
        inv_std=inv_std,
        axis=axes,
        eps=eps,
        batch_stats=True,
        count=x.size // max(1, mean.size),
    )


def _normalize_batch(
    be, x, xw, axes, mean, var, g, b, eps, out=None
) -> tuple[np.ndarray, BatchNormCache]:
    """The output pass and cache of a training forward, given the batch statistics.

    Used by batch renorm (which needs the statistics first to choose its scale and
    shift), so the statistics pass runs once.
    """
    with _quiet():
        inv_std = 1.0 / np.sqrt(var + eps)
        scale = inv_std if g is None else inv_std * g
        h = overflow_scale(mean, var, x.size // max(1, mean.size), _work_dtype(xw.dtype))
        bias = np.zeros_like(mean) if b is None else b
        y = be.affine(xw, axes, mean, scale, bias, x.dtype, out, h)
    return y, _train_cache(x, xw, axes, mean, var, inv_std, g, b, eps)


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
    out: np.ndarray | None = None,
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
    out : ndarray, optional
        Where to write ``y``: same shape and dtype as ``x``, C-contiguous, writeable,
        sharing no memory with any input.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x`` (``out`` when given)
    cache : BatchNormCache, only when ``return_cache`` is True
    """
    x, axes, fshape, g, b, eps = _prepare(x, gamma, beta, axis, eps)
    rm = as_feature_vector(running_mean, "running_mean", fshape, x.shape)
    rv = as_feature_vector(running_var, "running_var", fshape, x.shape)
    out = check_out(out, x, "out", x, gamma, beta, running_mean, running_var)
    return eval_checked(x, axes, g, b, rm, rv, eps, backend, out, return_cache)


def eval_checked(x, axes, g, b, rm, rv, eps, backend, out=None, return_cache=False):
    """:func:`batch_norm_eval` on validated arguments (internal; see :func:`train_checked`)."""
    be = select(backend, x.size, axes, x.shape)
    xw = be.work(x)
    with _quiet():
        inv_std = 1.0 / np.sqrt(rv + eps)
        scale = inv_std if g is None else inv_std * g
        h = overflow_scale(rm, rv, 0, _work_dtype(xw.dtype))
        bias = np.zeros(rm.shape) if b is None else b
        y = be.affine(xw, axes, rm, scale, bias, x.dtype, out, h)
    if not return_cache:
        return y
    cache = BatchNormCache(
        x=x,
        work=xw,
        gamma=None if g is None else g.copy(),
        has_beta=b is not None,
        mean=rm.copy(),
        var=rv.copy(),
        inv_std=inv_std,
        axis=axes,
        eps=eps,
        batch_stats=False,
        count=x.size // max(1, rm.size),
    )
    return y, cache


def batch_norm_backward(
    dy: np.ndarray,
    cache: BatchNormCache,
    *,
    backend: str = "auto",
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of a batch-norm forward pass.

    Parameters
    ----------
    dy : ndarray, same shape as ``cache.x``, float16/32/64
        Upstream gradient; never modified.
    cache : BatchNormCache
        From :func:`batch_norm_train`, or :func:`batch_norm_eval` with ``return_cache=True``.
    backend : {"auto", "numpy", "numba"}
    out : ndarray, optional
        Where to write ``dx``: same shape and dtype as ``cache.x``, C-contiguous,
        writeable, sharing no memory with ``dy`` or the forward input.

    Returns
    -------
    dx : ndarray, same shape and dtype as ``cache.x`` (``out`` when given)
    dgamma, dbeta : ndarray, shape (*features), float64, or None when gamma / beta was None
        With ``cache.comm`` the sums over every rank, identical on every rank.
    """
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache must be a BatchNormCache; got {type(cache).__name__}")

    def checked() -> tuple[np.ndarray, np.ndarray | None]:
        d = _check_dy(dy, cache)
        return d, check_out(out, cache.x, "out", d, cache.x, cache.work)

    if cache.comm is not None:  # every rank checks dy (and out) before any rank reduces
        dy, out = _distributed().check_backward(cache.comm, checked)
    else:
        dy, out = checked()
    return backward_checked(dy, cache, backend, out)


def backward_checked(dy, cache, backend, out=None):
    """:func:`batch_norm_backward` on validated arguments (internal).

    Single process: one fused pass gives the two gradient sums and ``dx``. After a
    synchronized forward (``cache.comm``) the local sums are first summed over the ranks (in
    rank order, identical everywhere), then this rank's ``dx`` is formed from them.
    """
    be = select(backend, cache.x.size, cache.axis, cache.x.shape)
    inv_std, mean, axes, xw = cache.inv_std, cache.mean, cache.axis, cache.work
    dyw = be.work_dy(dy, xw)
    with _quiet():
        k = inv_std if cache.gamma is None else inv_std * cache.gamma
        var = cache.var if cache.batch_stats else np.zeros_like(cache.var)
        h = overflow_scale(mean, var, cache.count, _work_dtype(xw.dtype))
        if cache.comm is None:
            dx, sum_dy, sum_dy_xc = be.backward(
                xw, dyw, axes, mean, inv_std, k, h, cache.batch_stats, cache.x.dtype, out
            )
        else:
            sum_dy, sum_dy_xc = be.grad_sums(xw, dyw, axes, mean, h)
            sum_dy, sum_dy_xc = _distributed().sum_over_ranks(cache.comm, sum_dy, sum_dy_xc)
            if cache.batch_stats:
                # dx = k (dy - mean(dy) - x_hat mean(dy x_hat)), means over all ranks' values
                m = cache.count
                p, q = -k * inv_std * (inv_std * sum_dy_xc) / m, -k * sum_dy / m
            else:
                p = q = np.zeros_like(k)
            dx = be.input_grad(xw, dyw, axes, mean, k, p, q, cache.x.dtype, out, h)
        sum_dy_xhat = inv_std * sum_dy_xc  # = dgamma
    dgamma = None if cache.gamma is None else sum_dy_xhat
    dbeta = sum_dy if cache.has_beta else None
    return dx, dgamma, dbeta
