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

The layer stores :math:`\sigma` like every other norm layer, as a running variance
:math:`\sigma^2 - \epsilon` (so :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}`), so
inference is the plain batch-norm evaluation and every tool (freezing, folding, export,
diagnostics, recalibration) treats it like :class:`batchnorm.BatchNorm`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from .backends import select
from ._validation import as_feature_vector, check_count, check_real
from .conventions import BatchStats, RunningStats, _update_running
from .functional import (
    BatchNormCache,
    _check_not_empty,
    _normalize_batch,
    _prepare,
    batch_norm_backward,
    batch_norm_eval,
)
from .layers import NormLayer

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
        """Batch mean."""
        return self.bn.mean

    @property
    def var(self) -> np.ndarray:
        """Biased batch variance."""
        return self.bn.var


def _check_limits(rmax: object, dmax: object) -> tuple[float, float]:
    rmax, dmax = check_real(rmax, "rmax"), check_real(dmax, "dmax")
    if rmax < 1.0:
        raise ValueError(f"rmax must be finite and >= 1; got {rmax!r}")
    if dmax < 0.0:
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
    comm: object = None,
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
    comm : mpi4py communicator, optional
        Batch statistics over the union of every rank's ``x`` (see
        :mod:`batchnorm.distributed`); the cache remembers it for the backward pass.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : RenormCache
    """

    def prepare():
        lim = _check_limits(rmax, dmax)
        xa, axes, fshape, g, b, e = _prepare(x, gamma, beta, axis, eps)
        if comm is None:
            _check_not_empty(xa, "normalize")
        mu = as_feature_vector(running_mean, "running_mean", fshape, xa.shape)
        sigma = as_feature_vector(running_std, "running_std", fshape, xa.shape)
        if np.any(sigma <= 0):
            raise ValueError(f"running_std must be > 0; got min {sigma.min()!r}")
        be = select(backend, xa.size, axes)
        return (xa, fshape, g, b, e, mu, sigma, lim), be, be.work(xa), axes, xa.dtype

    if comm is not None:  # local statistics, merged across ranks
        from .distributed import synchronized_batch

        return synchronized_batch(
            comm, "batch_renorm_train", prepare, lambda *a: _renorm_finish(*a, comm=comm)
        )
    state, be, xw, axes, _ = prepare()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_b, var_b = be.moments(xw, axes)
    return _renorm_finish(state, be, xw, axes, BatchStats(0, mean_b, var_b), comm=None)


def _renorm_finish(state, be, xw, axes, stats, *, comm):
    """r, d and the output pass, given the batch statistics (local or merged)."""
    x, fshape, g, b, eps, mu, sigma, (rmax, dmax) = state
    mean_b, var_b = stats.mean, stats.var
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_b = np.sqrt(var_b + eps)
        r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
        d = np.clip((mean_b - mu) / sigma, -dmax, dmax)
    g1 = np.ones(fshape) if g is None else g
    b0 = np.zeros(fshape) if b is None else b
    # y = (gamma r) x_hat + (beta + gamma d): the BN output pass on the statistics above
    y, bn_cache = _normalize_batch(be, x, xw, axes, mean_b, var_b, g1 * r, b0 + g1 * d, eps)
    if comm is not None:
        bn_cache = replace(bn_cache, count=stats.count, comm=comm)
    return y, RenormCache(bn_cache, r, d, g is not None, b is not None)


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


def batch_renorm_eval(
    x, gamma, beta, running_mean, running_std, *, axis=1, backend: str = "auto"
) -> np.ndarray:
    """Inference: ``gamma * (x - running_mean) / running_std + beta``.

    Parameters
    ----------
    x : ndarray, any layout
    gamma, beta : ndarray, shape (*features), or None
    running_mean, running_std : ndarray, shape (*features)

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    """
    std = np.asarray(running_std, dtype=np.float64)
    return batch_norm_eval(
        x, gamma, beta, running_mean, std * std, axis=axis, eps=0.0, backend=backend
    )


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

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "rmax_steps", "dmax_steps"):
            check_count(getattr(self, name), f"RenormSchedule.{name}", minimum=0)
        _check_limits(self.rmax, self.dmax)

    def __call__(self, step: int) -> tuple[float, float]:
        def ramp(final: float, start: float, end_step: int) -> float:
            if step <= self.warmup_steps:
                return start
            if step >= end_step:
                return final
            frac = (step - self.warmup_steps) / max(1, end_step - self.warmup_steps)
            return start + frac * (final - start)

        return ramp(self.rmax, 1.0, self.rmax_steps), ramp(self.dmax, 0.0, self.dmax_steps)


def _schedule_from_config(schedule: object) -> Callable[[int], tuple[float, float]] | None:
    if isinstance(schedule, dict):
        try:
            return RenormSchedule(**schedule)
        except TypeError as exc:
            raise ValueError(f"schedule {schedule!r} is not a RenormSchedule: {exc}") from None
    if schedule is not None and not callable(schedule):
        raise TypeError(
            f"schedule must be a callable step -> (rmax, dmax) (e.g. RenormSchedule) or None; "
            f"got {schedule!r}"
        )
    return schedule


class BatchRenorm(NormLayer):
    """Batch renormalization layer (Ioffe 2017).

    Parameters
    ----------
    num_features : int or tuple of int
    rmax, dmax : float
        Fixed clipping limits (``rmax >= 1``, ``dmax >= 0``); ignored when ``schedule`` is
        given.
    schedule : callable(step) -> (rmax, dmax), optional
        E.g. :class:`RenormSchedule`; ``step`` is ``num_batches_tracked``.
    momentum : float or None
        Weight of the old value in the moving averages of mean and std (default 0.99).
    axis, eps, affine, nonfinite, dtype, backend, comm, timeout
        As :class:`batchnorm.BatchNorm` (the "seed" momentum direction).

    Attributes
    ----------
    running_mean, running_var : ndarray
        The running std is ``sqrt(running_var + eps)``; they start at 0 and
        ``max(1 - eps, 0)`` (a running std of 1, or ``sqrt(eps)`` when eps > 1).
    """

    def __init__(
        self,
        num_features,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        schedule: Callable[[int], tuple[float, float]] | dict | None = None,
        axis=1,
        momentum: float | None = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        nonfinite="raise",
        dtype=np.float64,
        backend: str = "auto",
        comm: object = None,
        timeout: float | None = None,
    ):
        schedule = _schedule_from_config(schedule)
        rmax, dmax = _check_limits(rmax, dmax)
        if check_real(eps, "eps") <= 0:
            raise ValueError(f"BatchRenorm needs eps > 0 (its running std stays > 0); got {eps!r}")
        super().__init__(
            num_features,
            convention="seed",
            axis=axis,
            momentum=momentum,
            eps=eps,
            affine=affine,
            nonfinite=nonfinite,
            dtype=dtype,
            backend=backend,
            comm=comm,
            timeout=timeout,
        )
        self.rmax, self.dmax, self.schedule = rmax, dmax, schedule
        self.running_var[...] = max(1.0 - self.eps, 0.0)  # the running std starts at 1
        self._forget_args("convention", "unbiased", "track_running_stats")
        described = asdict(schedule) if isinstance(schedule, RenormSchedule) else None
        if schedule is not None and described is None:
            described = repr(schedule)  # a custom callable: shown, but not rebuildable
        self._record_args(rmax=rmax, dmax=dmax, schedule=described)

    @property
    def running_std(self) -> np.ndarray:
        """The running standard deviation ``sqrt(running_var + eps)`` (float64)."""
        return np.sqrt(self.running_var.astype(np.float64) + self.eps)

    def limits(self) -> tuple[float, float]:
        """The (rmax, dmax) in force at the current step."""
        if self.schedule is not None:
            return _check_limits(*self.schedule(self.num_batches_tracked))
        return self.rmax, self.dmax

    def _forward_batch(self, x, axes):
        self._values_per_feature(x, axes)
        rmax, dmax = self.limits()
        y, cache = batch_renorm_train(
            x,
            self.gamma,
            self.beta,
            self.running_mean,
            self.running_std,
            rmax=rmax,
            dmax=dmax,
            axis=axes,
            eps=self.eps,
            backend=self.backend,
            comm=self.comm,
        )
        return y, cache, BatchStats(cache.bn.count, cache.mean, cache.var)

    def _running_update(self, running: RunningStats, stats: BatchStats) -> RunningStats:
        return _update_running(running, stats, self.momentum, "old", smooth="std", eps=self.eps)

    def _arg_validators(self) -> dict:
        def positive_eps(value):
            if check_real(value, "eps") <= 0:
                raise ValueError(f"BatchRenorm needs eps > 0; got {value!r}")
            return float(value)

        return {
            **super()._arg_validators(),
            "eps": positive_eps,
            "rmax": lambda v: _check_limits(v, self.dmax)[0],
            "dmax": lambda v: _check_limits(self.rmax, v)[1],
        }

    def _backward(self, dy, cache):
        if isinstance(cache, RenormCache):
            return batch_renorm_backward(dy, cache, backend=self.backend)
        return batch_norm_backward(dy, cache, backend=self.backend)
