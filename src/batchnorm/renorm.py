r"""Batch renormalization (Ioffe 2017). With batch statistics :math:`\mu_B, \sigma_B =
\sqrt{\sigma^2_B + \epsilon}` and running estimates :math:`\mu, \sigma`,

.. math::

    r = \mathrm{clip}(\sigma_B / \sigma, 1/r_{max}, r_{max}), \quad
    d = \mathrm{clip}((\mu_B - \mu)/\sigma, -d_{max}, d_{max}), \quad
    \hat x = \frac{x - \mu_B}{\sigma_B} r + d, \quad y = \gamma \hat x + \beta,

with :math:`r, d` constants in the backward pass. Since
:math:`y = (\gamma r)\frac{x-\mu_B}{\sigma_B} + (\beta + \gamma d)`, the forward and backward
passes are the plain batch-norm kernels with scale :math:`\gamma r` and shift
:math:`\beta + \gamma d`; :math:`d\gamma = r\,\sum dy\,\frac{x-\mu_B}{\sigma_B} + d \sum dy`.
Running mean and running *standard deviation* are moving averages of :math:`\mu_B` and
:math:`\sigma_B`; inference is :math:`y = \gamma (x - \mu)/\sigma + \beta`. With
:math:`r_{max} = 1, d_{max} = 0` it is batch norm exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._dispatch import Backend
from ._validation import as_feature_vector
from .functional import (
    BatchNormCache,
    _check_not_empty,
    _normalize_batch,
    _prepare,
    batch_norm_backward,
    batch_norm_eval,
)
from .layers import BatchNorm

__all__ = [
    "BatchRenorm",
    "RenormCache",
    "RenormSchedule",
    "batch_renorm_backward",
    "batch_renorm_eval",
    "batch_renorm_train",
]


@dataclass(frozen=True, eq=False)
class RenormCache:
    """Forward record of :func:`batch_renorm_train`.

    Attributes
    ----------
    bn : BatchNormCache
        Cache of the underlying batch-norm pass (its gamma is ``gamma * r``).
    r, d : ndarray, shape (*features), float64
        The clipped correction factors (constants for the backward pass).
    has_gamma, has_beta : bool
    """

    bn: BatchNormCache
    r: np.ndarray
    d: np.ndarray
    has_gamma: bool
    has_beta: bool

    @property
    def mean(self) -> np.ndarray:
        return self.bn.mean

    @property
    def var(self) -> np.ndarray:
        return self.bn.var


def _check_limits(rmax: float, dmax: float) -> tuple[float, float]:
    rmax, dmax = float(rmax), float(dmax)
    if not (np.isfinite(rmax) and rmax >= 1.0):
        raise ValueError(f"rmax must be finite and >= 1; got {rmax!r}")
    if not (np.isfinite(dmax) and dmax >= 0.0):
        raise ValueError(f"dmax must be finite and >= 0; got {dmax!r}")
    return rmax, dmax


def batch_renorm_train(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    running_mean: np.ndarray,
    running_std: np.ndarray,
    *,
    rmax: float,
    dmax: float,
    axis=1,
    eps: float = 1e-5,
    backend: str = "auto",
) -> tuple[np.ndarray, RenormCache]:
    """Batch-renorm forward pass in training mode (see the module docstring).

    Parameters
    ----------
    x : ndarray, shape (N, C, *spatial) or any layout
    gamma, beta : ndarray, shape (*features), or None
    running_mean, running_std : ndarray, shape (*features)
        Current population estimates; ``running_std`` must be > 0.
    rmax, dmax : float
        Clipping limits, ``rmax >= 1``, ``dmax >= 0``.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : RenormCache
    """
    rmax, dmax = _check_limits(rmax, dmax)
    x, axes, fshape, g, b, eps = _prepare(x, gamma, beta, axis, eps)
    _check_not_empty(x, "normalize")
    mu = as_feature_vector(running_mean, "running_mean", fshape, x.shape)
    sigma = as_feature_vector(running_std, "running_std", fshape, x.shape)
    if np.any(sigma <= 0):
        raise ValueError(f"running_std must be > 0; got min {sigma.min()!r}")
    be = Backend(backend, x, axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_b, var_b = be.moments()
        sigma_b = np.sqrt(var_b + eps)
        r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
        d = np.clip((mean_b - mu) / sigma, -dmax, dmax)
    g1 = np.ones(fshape) if g is None else g
    b0 = np.zeros(fshape) if b is None else b
    # y = (gamma r) x_hat + (beta + gamma d): the BN output pass on the statistics above
    y, bn_cache = _normalize_batch(be, mean_b, var_b, g1 * r, b0 + g1 * d, eps)
    return y, RenormCache(bn_cache, r, d, gamma is not None, beta is not None)


def batch_renorm_backward(dy: np.ndarray, cache: RenormCache, *, backend: str = "auto"):
    """Gradients of :func:`batch_renorm_train` with r and d held constant.

    Returns
    -------
    dx : ndarray, like ``x``
    dgamma, dbeta : ndarray, shape (*features), or None where gamma / beta was None
    """
    if not isinstance(cache, RenormCache):
        raise TypeError(f"cache must be a RenormCache; got {type(cache).__name__}")
    dx, dgamma_eff, dbeta_eff = batch_norm_backward(dy, cache.bn, backend=backend)
    dgamma = cache.r * dgamma_eff + cache.d * dbeta_eff if cache.has_gamma else None
    return dx, dgamma, (dbeta_eff if cache.has_beta else None)


def batch_renorm_eval(x, gamma, beta, running_mean, running_std, *, axis=1,
                      backend: str = "auto") -> np.ndarray:
    """Inference: ``gamma * (x - running_mean) / running_std + beta``."""
    std = np.asarray(running_std, dtype=np.float64)
    return batch_norm_eval(x, gamma, beta, running_mean, std * std, axis=axis, eps=0.0,
                           backend=backend)


@dataclass(frozen=True)
class RenormSchedule:
    """Ioffe (2017)'s schedule: plain BN first, then rmax and dmax relaxed linearly.

    ``rmax = 1, dmax = 0`` for the first ``warmup_steps``; then rmax grows linearly to
    ``rmax`` at ``rmax_steps`` and dmax to ``dmax`` at ``dmax_steps`` (the paper: 5k, 3 at
    40k, 5 at 25k).
    """

    warmup_steps: int = 5000
    rmax: float = 3.0
    rmax_steps: int = 40000
    dmax: float = 5.0
    dmax_steps: int = 25000

    def __call__(self, step: int) -> tuple[float, float]:
        def ramp(final: float, start: float, end_step: int) -> float:
            if step <= self.warmup_steps:
                return start
            if step >= end_step:
                return final
            frac = (step - self.warmup_steps) / max(1, end_step - self.warmup_steps)
            return start + frac * (final - start)

        return ramp(self.rmax, 1.0, self.rmax_steps), ramp(self.dmax, 0.0, self.dmax_steps)


class BatchRenorm(BatchNorm):
    """Batch renormalization layer (Ioffe 2017).

    Parameters
    ----------
    num_features : int or tuple of int
    rmax, dmax : float or None
        Fixed clipping limits; or pass ``schedule``.
    schedule : callable(step) -> (rmax, dmax), optional
        E.g. :class:`RenormSchedule`; ``step`` is ``num_batches_tracked``.
    momentum : float
        Weight of the old value in the moving averages of mean and std (default 0.99).
    Other arguments as :class:`batchnorm.BatchNorm` (the "seed" momentum direction).

    Attributes
    ----------
    running_mean, running_std : ndarray
        Start at 0 and 1.
    """

    _running_keys = ("running_mean", "running_std")
    _nonnegative_keys = ("running_std",)

    def __init__(self, num_features, *, rmax: float | None = 3.0, dmax: float | None = 5.0,
                 schedule: Callable[[int], tuple[float, float]] | None = None,
                 axis=1, momentum: float = 0.99, eps: float = 1e-5, affine: bool = True,
                 nonfinite="raise", dtype=np.float64, backend: str = "auto"):
        super().__init__(num_features, convention="seed", axis=axis, momentum=momentum, eps=eps,
                         affine=affine, nonfinite=nonfinite, dtype=dtype, backend=backend)
        if momentum is None:
            raise ValueError("BatchRenorm needs a numeric momentum")
        if schedule is None:
            _check_limits(rmax, dmax)
        self.rmax, self.dmax, self.schedule = rmax, dmax, schedule
        self.running_std = self.running_var
        del self.running_var

    def limits(self) -> tuple[float, float]:
        """The (rmax, dmax) in force at the current step."""
        if self.schedule is not None:
            return _check_limits(*self.schedule(self.num_batches_tracked))
        return self.rmax, self.dmax

    def _batch_targets(self, mean, var, m):
        return {"running_mean": mean, "running_std": np.sqrt(var + self.eps)}

    def forward(self, x, *, training=None, update_stats=True):
        training = self.training if training is None else bool(training)
        x, axes = self._check_input(x)
        if not training:
            # inference gamma (x - mu) / sigma + beta, i.e. eval with var = sigma^2, eps = 0
            std = self.running_std.astype(np.float64)
            y, cache = batch_norm_eval(x, self.gamma, self.beta, self.running_mean, std * std,
                                       axis=axes, eps=0.0, return_cache=True,
                                       backend=self.backend)
            self._cache = cache
            return y
        self._require_two_values(x, axes)
        rmax, dmax = self.limits()
        y, cache = batch_renorm_train(
            x, self.gamma, self.beta, self.running_mean, self.running_std, rmax=rmax,
            dmax=dmax, axis=axes, eps=self.eps, backend=self.backend)
        if update_stats:
            self._update_running_stats(cache.mean, cache.var,
                                       self._batch_targets(cache.mean, cache.var, 0))
        self._cache = cache
        return y

    __call__ = forward

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError("backward() called before any forward pass")
        if isinstance(self._cache, RenormCache):
            dx, dgamma, dbeta = batch_renorm_backward(dy, self._cache, backend=self.backend)
        else:
            dx, dgamma, dbeta = batch_norm_backward(dy, self._cache, backend=self.backend)
        if self.affine:
            self.dgamma, self.dbeta = dgamma.astype(self.dtype), dbeta.astype(self.dtype)
        return dx
