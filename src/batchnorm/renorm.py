r"""Batch renormalization (Ioffe 2017). With batch statistics :math:`\mu_B, \sigma_B =
\sqrt{\sigma^2_B + \epsilon}` and running estimates :math:`\mu, \sigma`,

.. math::

    r = \mathrm{clip}(\sigma_B / \sigma, 1/r_{max}, r_{max}), \quad
    d = \mathrm{clip}((\mu_B - \mu)/\sigma, -d_{max}, d_{max}),

    \hat x = \frac{x - \mu_B}{\sigma_B} r + d, \quad y = \gamma \hat x + \beta,

with :math:`r, d` constants in the backward pass. Since
:math:`y = (\gamma r)\frac{x-\mu_B}{\sigma_B} + (\beta + \gamma d)`, the forward and backward
passes are the plain batch-norm kernels with scale :math:`\gamma r` and shift
:math:`\beta + \gamma d`; :math:`d\gamma = r\,\sum dy\,\frac{x-\mu_B}{\sigma_B} + d \sum dy`.
Running mean and running *standard deviation* are moving averages of :math:`\mu_B` and
:math:`\sigma_B`; inference is :math:`y = \gamma (x - \mu)/\sigma + \beta`. With
:math:`r_{max} = 1, d_{max} = 0` it is batch norm exactly.

The layer stores :math:`\sigma` like every other norm layer, as a running variance
:math:`\sigma^2 - \epsilon` (so :math:`\sigma = \sqrt{\mathtt{running\_var} + \epsilon}`), so
inference is the plain batch-norm evaluation and every tool (freezing, folding, export,
diagnostics, recalibration) treats it like :class:`batchnorm.BatchNorm`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ._compose import LOCAL, eval_pass, inputs, merged_stats, normalize, reducer_of
from ._validation import check_count, check_real, check_renorm_limits
from .conventions import BatchStats, RunningStats, _update_running
from .core.ops import sqrt, where
from .core.reduce import KIND_TRAIN, Call, attempt
from .functional import BatchNormCache, batch_norm_backward
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


def batch_renorm_train(
    x,
    gamma,
    beta,
    running_mean,
    running_std,
    *,
    rmax: float,
    dmax: float,
    axis=1,
    eps: float = 1e-5,
    backend: str = "auto",
    comm: object = None,
    reducer: object = None,
    timeout: float | None = None,
) -> tuple[object, RenormCache]:
    """Batch-renorm forward pass in training mode (see the module docstring).

    Parameters
    ----------
    x : array, shape (N, C, *spatial) or any layout (NumPy or any Array API library)
    gamma, beta : array, shape (*features), or None
    running_mean, running_std : array, shape (*features)
        Current population estimates; ``running_std`` must be > 0.
    rmax, dmax : float
        Clipping limits, ``rmax >= 1``, ``dmax >= 0``.
    comm : mpi4py communicator, optional
        Batch statistics over the union of every rank's ``x`` (see
        :mod:`batchnorm.distributed`); the backward pass needs the same ``comm``.
    reducer : Reducer, optional
        Any reducer instead of ``comm``.
    timeout : float, optional
        With ``comm``: seconds after which a rank waiting for missing ranks aborts the job.

    Returns
    -------
    y : array, same shape, dtype and library as ``x``
    cache : RenormCache
    """
    red = reducer_of(comm, reducer, timeout)
    args, error = attempt(
        red, _renorm_inputs, x, gamma, beta, running_mean, running_std, rmax, dmax, axis, eps,
        backend, red,
    )  # fmt: skip
    y, cache, _ = renorm_pass(args, red, Call("batch_renorm_train", KIND_TRAIN), error)
    return y, cache


def _renorm_inputs(
    x, gamma, beta, running_mean, running_std, rmax, dmax, axis, eps, backend, reducer
):
    lim = check_renorm_limits(rmax, dmax)
    inp = inputs(x, gamma, beta, axis, eps, backend, reducer=reducer)
    mu = inp.be.feature(running_mean, "running_mean", inp.lay, inp.x)
    sigma = inp.be.feature(running_std, "running_std", inp.lay, inp.x)
    if inp.be.any_le_zero(sigma):
        raise ValueError(f"running_std must be > 0; got {sigma!r}")
    return inp, mu, sigma, lim


def _clip(v, lo, hi):
    """``v`` clipped to [lo, hi]; NaN stays NaN."""
    return where(v < lo, lo, where(v > hi, hi, v))


def renorm_pass(args, reducer=LOCAL, call=None, error=None):
    """Batch renorm on validated inputs: ``(y, cache, stats)``.

    The batch statistics (merged by ``reducer`` when it is distributed) give
    ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mu_B - mu) / sigma, -dmax,
    dmax)``, and the output is the BN output pass with scale ``gamma r`` and shift
    ``beta + gamma d``.
    """
    inp, mu, sigma, (rmax, dmax) = args if args is not None else (None, None, None, (1, 0))
    mean_b, var_b, st, split = merged_stats(
        inp, reducer, call or Call("batch_renorm_train", KIND_TRAIN), error
    )
    be, lay = inp.be, inp.lay
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_b = sqrt(var_b + inp.eps)
        r = _clip(sigma_b / sigma, 1.0 / rmax, rmax)
        d = _clip((mean_b - mu) / sigma, -dmax, dmax)
        g1 = be.ones(lay.fshape) if inp.gamma is None else inp.gamma
        b0 = be.zeros(lay.fshape) if inp.beta is None else inp.beta
        # y = (gamma r) x_hat + (beta + gamma d): the BN output pass on the statistics above
        y, bn_cache = normalize(
            inp, mean_b, var_b, g1 * r, b0 + g1 * d, st.count, reducer.distributed, split
        )
    return y, RenormCache(bn_cache, r, d, inp.gamma is not None, inp.beta is not None), st


def batch_renorm_backward(
    dy,
    cache: RenormCache,
    *,
    backend: str = "auto",
    comm: object = None,
    reducer: object = None,
    timeout: float | None = None,
):
    """Gradients of :func:`batch_renorm_train` with r and d held constant (after a
    synchronized forward: the same ``comm``/``reducer``).

    Returns
    -------
    dx : ndarray, like ``x``
    dgamma, dbeta : ndarray, shape (*features), or None where gamma / beta was None
    """
    if not isinstance(cache, RenormCache):
        raise TypeError(f"cache must be a RenormCache; got {type(cache).__name__}")
    dx, dgamma_eff, dbeta_eff = batch_norm_backward(
        dy, cache.bn, backend=backend, comm=comm, reducer=reducer, timeout=timeout
    )
    return _renorm_grads(cache, dx, dgamma_eff, dbeta_eff)


def _renorm_grads(cache: RenormCache, dx, dgamma_eff, dbeta_eff):
    """dgamma = r sum(dy x_hat) + d sum(dy): gamma enters through gamma r and gamma d."""
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
    inp = inputs(x, gamma, beta, axis, 0.0, backend, None, running_mean, running_std, empty_ok=True)
    mu = inp.be.feature(running_mean, "running_mean", inp.lay, inp.x)
    std = inp.be.feature(running_std, "running_std", inp.lay, inp.x)
    if inp.be.any_le_zero(std):
        raise ValueError(f"running_std must be > 0; got {std!r}")
    return eval_pass(inp, mu, std * std, return_cache=False)


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
        check_renorm_limits(self.rmax, self.dmax)

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
        reducer: object = None,
    ):
        schedule = _schedule_from_config(schedule)
        rmax, dmax = check_renorm_limits(rmax, dmax)
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
            reducer=reducer,
        )
        self.rmax, self.dmax, self.schedule = rmax, dmax, schedule
        self.running_var[...] = max(1.0 - self.eps, 0.0)  # the running std starts at 1
        self._forget_args("convention", "unbiased", "track_running_stats")
        described = asdict(schedule) if isinstance(schedule, RenormSchedule) else None
        if schedule is not None and described is None:
            described = repr(schedule)  # a custom callable: shown, but not rebuildable
        self._record_args(rmax=rmax, dmax=dmax, schedule=described)

    @property
    def running_std(self):
        """The running standard deviation ``sqrt(running_var + eps)`` (float64 for NumPy)."""
        v = self.running_var
        if isinstance(v, np.ndarray):
            return np.sqrt(v.astype(np.float64) + self.eps)
        return sqrt(v + self.eps)

    def limits(self) -> tuple[float, float]:
        """The (rmax, dmax) in force at the current step."""
        if self.schedule is not None:
            return check_renorm_limits(*self.schedule(self.num_batches_tracked))
        return self.rmax, self.dmax

    def _forward_batch(self, inp, reducer, call, error):
        if not reducer.distributed:
            self._check_count(inp)
        args = None
        if inp is not None:
            try:  # a schedule may fail (or give invalid limits) on one rank only
                rmax, dmax = self.limits()
                be = inp.be
                args = (inp, be.param(self.running_mean), be.param(self.running_std), (rmax, dmax))
            except Exception as exc:  # noqa: BLE001 - every error must reach every rank
                if not reducer.distributed:
                    raise
                error = exc
        y, cache, st = renorm_pass(args if error is None else None, reducer, call, error)
        return y, cache, st

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
            "rmax": lambda v: check_renorm_limits(v, self.dmax)[0],
            "dmax": lambda v: check_renorm_limits(self.rmax, v)[1],
        }

    def _backward(self, dy, cache):
        if isinstance(cache, RenormCache):
            dx, dg, db = super()._backward(dy, cache.bn)
            return _renorm_grads(cache, dx, dg, db)
        return super()._backward(dy, cache)
