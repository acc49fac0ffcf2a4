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

from ._compose import (
    LOCAL,
    eval_pass,
    inputs,
    local_moments,
    merged_stats,
    normalize,
    reducer_of,
)
from ._validation import check_renorm_limits
from .conventions import BatchStats, RunningStats, get_convention, update_running_unchecked
from .core.ops import sqrt, where
from .core.reduce import KIND_TRAIN, Call, attempt
from .functional import BatchNormCache, batch_norm_backward
from .layers import BatchStatsLayer
from .layers.args import Argument, by_value, library_layer
from .layers.checks import check_positive_eps
from .layers.schedule import RenormSchedule, schedule_from_config

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
    return reducer.dispatch(renorm_local, renorm_synced, call or _RENORM_CALL, error, args)


_RENORM_CALL = Call("batch_renorm_train", KIND_TRAIN)


def renorm_local(args):
    """:func:`renorm_pass` of a single process (local statistics, ``args`` validated)."""
    st, split = local_moments(args[0])
    return _renorm_output(args, st.mean, st.var, st, False, split)


def renorm_synced(reducer, call, error, args):
    """:func:`renorm_pass` over participants (``args`` None where this one failed)."""
    inp = None if args is None else args[0]
    mean_b, var_b, st = merged_stats(reducer, call, error, inp)
    return _renorm_output(args, mean_b, var_b, st, True, None)


def _renorm_output(args, mean_b, var_b, st, synchronized, split):
    inp, mu, sigma, (rmax, dmax) = args
    be, lay = inp.be, inp.lay
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_b = sqrt(var_b + inp.eps)
        r = _clip(sigma_b / sigma, 1.0 / rmax, rmax)
        d = _clip((mean_b - mu) / sigma, -dmax, dmax)
        g1 = be.ones(lay.fshape) if inp.gamma is None else inp.gamma
        b0 = be.zeros(lay.fshape) if inp.beta is None else inp.beta
        # y = (gamma r) x_hat + (beta + gamma d): the BN output pass on the statistics above
        y, bn_cache = normalize(
            inp, mean_b, var_b, g1 * r, b0 + g1 * d, st.count, synchronized, split
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


def _rmax(layer: BatchRenorm, value: object) -> float:
    return check_renorm_limits(value, layer.dmax)[0]


def _dmax(layer: BatchRenorm, value: object) -> float:
    return check_renorm_limits(layer.rmax, value)[1]


#: Batch renorm reads momentum as the weight of the old value (the "seed" direction).
SEED = get_convention("seed")


@library_layer
class BatchRenorm(BatchStatsLayer):
    """Batch renormalization layer (Ioffe 2017).

    Parameters
    ----------
    num_features : int or tuple of int
    rmax, dmax : float
        Fixed clipping limits (``rmax >= 1``, ``dmax >= 0``); ignored when ``schedule`` is
        given.
    schedule : callable(step) -> (rmax, dmax), optional
        E.g. :class:`batchnorm.RenormSchedule`; ``step`` is ``num_batches_tracked``.
    momentum : float or None
        Weight of the old value in the moving averages of mean and std (default 0.99).
    axis, eps, affine, nonfinite, dtype, backend, comm, timeout, reducer
        As :class:`batchnorm.BatchNorm` (``eps > 0``).

    Attributes
    ----------
    running_mean, running_var : ndarray
        The running std is ``sqrt(running_var + eps)``; they start at 0 and
        ``max(1 - eps, 0)`` (a running std of 1, or ``sqrt(eps)`` when eps > 1).
    convention : Convention
        Read-only: the "seed" convention, whose momentum weighs the old value.
    """

    eps = Argument(by_value(check_positive_eps), doc="Added to the variance; > 0.")
    rmax = Argument(_rmax, doc="Fixed limit of r (>= 1).")
    dmax = Argument(_dmax, doc="Fixed limit of d (>= 0).")
    schedule = Argument(doc="The schedule of (rmax, dmax) (fixed).")

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
        schedule = schedule_from_config(schedule)
        rmax, dmax = check_renorm_limits(rmax, dmax)
        super().__init__(
            num_features,
            axis=axis,
            momentum=momentum,
            eps=check_positive_eps(eps),
            affine=affine,
            track_running_stats=True,
            nonfinite=nonfinite,
            dtype=dtype,
            backend=backend,
            comm=comm,
            timeout=timeout,
            reducer=reducer,
        )
        self._state.running_var[...] = max(1.0 - self.eps, 0.0)  # the running std starts at 1
        described = asdict(schedule) if isinstance(schedule, RenormSchedule) else None
        if schedule is not None and described is None:
            described = repr(schedule)  # a custom callable: shown, but not rebuildable
        self._args.order(("num_features", "axis", "momentum", "eps", "affine", "nonfinite"))
        self._args.add("rmax", rmax)
        self._args.add("dmax", dmax)
        self._args.add("schedule", schedule, shown=described)

    @property
    def convention(self):
        """The "seed" convention: ``momentum`` weighs the old value (read-only)."""
        return SEED

    @property
    def running_std(self):
        """The running standard deviation ``sqrt(running_var + eps)`` (float64 for NumPy)."""
        v = self._state.running_var
        if isinstance(v, np.ndarray):
            return np.sqrt(v.astype(np.float64) + self.eps)
        return sqrt(v + self.eps)

    def unsavable_reason(self) -> str | None:
        """A custom schedule (a callable other than :class:`batchnorm.RenormSchedule`) cannot be
        written to a file; ``save()`` refuses it before writing anything."""
        if self.schedule is None or isinstance(self.schedule, RenormSchedule):
            return None
        return (
            f"its schedule {self.schedule!r} is a custom callable, which a file cannot hold; "
            "use a RenormSchedule, or save state_dict() and rebuild the layer in code"
        )

    def limits(self) -> tuple[float, float]:
        """The (rmax, dmax) in force at the current step."""
        if self.schedule is not None:
            return check_renorm_limits(*self.schedule(self.num_batches_tracked))
        return self.rmax, self.dmax

    def _forward_batch(self, inp):
        self._check_count(inp)
        return renorm_local(self._renorm_args(inp))

    def _forward_merged(self, inp, reducer, call, error):
        args = None
        if inp is not None:  # a schedule may fail (or give invalid limits) on one rank only
            args, own = reducer.attempt(self._renorm_args, inp)
            error = error or own
        return renorm_synced(reducer, call, error, args if error is None else None)

    def _renorm_args(self, inp) -> tuple:
        """``(inputs, running mean, running std, (rmax, dmax))`` for :func:`renorm_pass`."""
        rmax, dmax = self.limits()
        be = inp.be
        return inp, be.param(self._state.running_mean), be.param(self.running_std), (rmax, dmax)

    def _running_update(self, running: RunningStats, stats: BatchStats) -> RunningStats:
        return update_running_unchecked(
            running, stats, self.momentum, "old", smooth="std", eps=self.eps
        )

    def _backward(self, dy, cache):
        if isinstance(cache, RenormCache):
            dx, dg, db = super()._backward(dy, cache.bn)
            return _renorm_grads(cache, dx, dg, db)
        return super()._backward(dy, cache)
