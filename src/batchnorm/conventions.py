"""Framework conventions for running statistics, stated once.

Every framework keeps running averages of the batch statistics by exponential smoothing,
``running <- (1 - w) * running + w * batch``, but they disagree on what "momentum" means:

=========  ================================  ========  =====  =====================  ====
preset     momentum means                    momentum  eps    running var            axis
=========  ================================  ========  =====  =====================  ====
seed       weight of the old running value   0.9       1e-5   biased                 1
torch      weight of the new batch value     0.1       1e-5   unbiased m/(m-1)       1
keras      weight of the old running value   0.99      1e-3   biased                 -1
flax       weight of the old running value   0.99      1e-5   biased                 -1
=========  ================================  ========  =====  =====================  ====

So ``w = 1 - momentum`` for seed/keras/flax and ``w = momentum`` for torch. ``momentum=None``
(any preset) gives a true cumulative average of all batch statistics seen so far,
``w = 1 / t`` for the ``t``-th tracked batch. Running mean starts at 0, running variance at 1,
and evaluation always adds eps to the running variance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np

from ._validation import COUNT_LIMIT, check_count, check_eps, check_real
from .core.stats import BatchStats, RunningStats

__all__ = [
    "CONVENTIONS",
    "BatchStats",
    "Convention",
    "NonFiniteStatisticsError",
    "RunningStats",
    "check_momentum",
    "convention_config",
    "get_convention",
    "new_value_weight",
    "update_running",
]


def check_momentum(momentum: object) -> float | None:
    """Validate a momentum value: None or a real number in [0, 1]."""
    if momentum is None:
        return None
    value = check_real(momentum, "momentum")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None; got {value!r}")
    return value


@dataclass(frozen=True)
class Convention:
    """Defaults of one framework's batch-norm layer.

    Attributes
    ----------
    name : str
    momentum_weights : {"old", "new"}
        Whether ``momentum`` is the weight of the old running value or of the new batch value.
    momentum : float
        Default momentum, read in the ``momentum_weights`` direction.
    eps : float
    unbiased : bool
        Whether the running variance is fed the unbiased batch variance ``m/(m-1) * var``.
    axis : int
        Default feature axis.
    """

    name: str
    momentum_weights: Literal["old", "new"]
    momentum: float
    eps: float
    unbiased: bool
    axis: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Convention name must be a non-empty str; got {self.name!r}")
        if self.momentum_weights not in ("old", "new"):
            raise ValueError(
                f"momentum_weights must be 'old' or 'new'; got {self.momentum_weights!r}"
            )
        if check_momentum(self.momentum) is None:
            raise ValueError("a convention's default momentum must be a number")
        check_eps(self.eps)
        if not isinstance(self.unbiased, (bool, np.bool_)):
            raise TypeError(f"unbiased must be True or False; got {self.unbiased!r}")
        if isinstance(self.axis, (bool, np.bool_)) or not isinstance(self.axis, (int, np.integer)):
            raise TypeError(f"a convention's axis must be an int; got {self.axis!r}")


#: The presets, read-only (a ``Mapping``: assigning to it raises).
CONVENTIONS: Mapping[str, Convention] = MappingProxyType(
    {
        "seed": Convention("seed", "old", 0.9, 1e-5, False, 1),
        "torch": Convention("torch", "new", 0.1, 1e-5, True, 1),
        "keras": Convention("keras", "old", 0.99, 1e-3, False, -1),
        "flax": Convention("flax", "old", 0.99, 1e-5, False, -1),
    }
)


def get_convention(name: str | Convention | dict) -> Convention:
    """Look up a preset by name; a :class:`Convention` passes through, and a dict of its
    fields (as :func:`convention_config` writes for custom conventions) builds one.

    Examples
    --------
    >>> import batchnorm as bn
    >>> c = bn.get_convention("torch")
    >>> c.momentum, c.momentum_weights, c.unbiased
    (0.1, 'new', True)
    """
    if isinstance(name, Convention):
        return name
    if isinstance(name, dict):
        try:
            return Convention(**name)
        except TypeError as exc:
            raise ValueError(f"{name!r} does not describe a Convention: {exc}") from None
    try:
        return CONVENTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown convention {name!r}; choose one of {sorted(CONVENTIONS)}"
        ) from None


def convention_config(conv: Convention) -> str | dict:
    """A preset's name, or a custom convention's fields (JSON-friendly either way)."""
    if CONVENTIONS.get(conv.name) == conv:
        return conv.name
    return {
        "name": conv.name,
        "momentum_weights": conv.momentum_weights,
        "momentum": conv.momentum,
        "eps": conv.eps,
        "unbiased": bool(conv.unbiased),
        "axis": int(conv.axis),
    }


def new_value_weight(
    momentum: float | None, momentum_weights: Literal["old", "new"], num_batches_tracked: int
) -> float:
    """Weight ``w`` of the new batch statistic in ``running <- (1 - w) running + w batch``.

    Parameters
    ----------
    momentum : float or None
        None means a cumulative average.
    momentum_weights : {"old", "new"}
        Direction in which ``momentum`` is read.
    num_batches_tracked : int
        Count of tracked batches *including* the current one (used when momentum is None).
    """
    if momentum is None:
        if num_batches_tracked < 1:
            raise ValueError(
                f"num_batches_tracked must count the current batch (>= 1); got "
                f"{num_batches_tracked}"
            )
        return 1.0 / num_batches_tracked
    return momentum if momentum_weights == "new" else 1.0 - momentum


class NonFiniteStatisticsError(ValueError):
    """A batch's statistics, or the running statistics they would produce, are not finite."""


def _all_finite(a: np.ndarray, b: np.ndarray) -> bool:
    """True when every element of ``a`` and ``b`` is finite (False may be a false alarm
    when a sum of finite values overflows)."""
    return math.isfinite(float(np.add.reduce(a, axis=None)) + float(np.add.reduce(b, axis=None)))


def update_running(
    running: RunningStats,
    batch: BatchStats,
    *,
    momentum: float | None,
    momentum_weights: Literal["old", "new"],
    unbiased: bool = False,
    smooth: Literal["var", "std"] = "var",
    eps: float = 0.0,
) -> RunningStats:
    r"""One update of the running statistics; the inputs are never modified.

    ``mean <- (1 - w) mean + w batch.mean`` and the same for the variance, where ``w`` is
    :func:`new_value_weight` (``1/t`` for ``momentum=None``), the batch variance is first
    made unbiased (``m/(m-1)``) when ``unbiased``; with ``smooth="std"`` (batch renorm) the
    standard deviations :math:`\sqrt{var + \epsilon}` are averaged instead and the result
    is stored back as ``std**2 - eps`` (clipped at 0).

    Returns
    -------
    RunningStats
        The new state, in the dtype of ``running``, with ``num_batches_tracked + 1``.

    Raises
    ------
    NonFiniteStatisticsError
        When the batch statistics or the new state (in its dtype) are not finite.
    ValueError
        When ``unbiased`` and the batch has fewer than 2 values per feature.

    Examples
    --------
    >>> import numpy as np
    >>> import batchnorm as bn
    >>> running = bn.RunningStats(np.zeros(2), np.ones(2), num_batches_tracked=0)
    >>> batch = bn.BatchStats(4, np.array([1.0, 2.0]), np.array([3.0, 3.0]))
    >>> new = bn.update_running(running, batch, momentum=0.1, momentum_weights="new")
    >>> new.mean, new.var, new.num_batches_tracked
    (array([0.1, 0.2]), array([1.2, 1.2]), 1)
    """
    if not isinstance(running, RunningStats) or not isinstance(batch, BatchStats):
        raise TypeError(
            f"update_running needs a RunningStats and a BatchStats; got "
            f"{type(running).__name__} and {type(batch).__name__}"
        )
    momentum = check_momentum(momentum)
    if momentum_weights not in ("old", "new"):
        raise ValueError(f"momentum_weights must be 'old' or 'new'; got {momentum_weights!r}")
    if smooth not in ("var", "std"):
        raise ValueError(f"smooth must be 'var' or 'std'; got {smooth!r}")
    eps = check_eps(eps)
    if not isinstance(unbiased, (bool, np.bool_)):
        raise TypeError(f"unbiased must be True or False; got {unbiased!r}")
    check_count(running.num_batches_tracked, "running.num_batches_tracked", minimum=0)
    check_count(batch.count, "batch.count", minimum=0)
    for name, v in (("running.mean", running.mean), ("running.var", running.var)):
        h = _host(v)
        if h.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating array; got dtype {h.dtype}")
    run_var = _host(running.var)
    if np.any(run_var < 0):
        raise ValueError(f"running.var must be >= 0; got min {np.min(run_var)!r}")
    for name, v in (("batch.mean", batch.mean), ("batch.var", batch.var)):
        if _host(v).dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a real array; got dtype {_host(v).dtype}")
    host_var = _host(batch.var)
    if np.any(host_var < 0):
        raise ValueError(f"batch variance must be >= 0; got min {np.min(host_var)!r}")
    return update_running_unchecked(
        running, batch, momentum, momentum_weights, unbiased=unbiased, smooth=smooth, eps=eps
    )


def update_running_unchecked(
    running: RunningStats,
    batch: BatchStats,
    momentum: float | None,
    momentum_weights: str,
    *,
    unbiased: bool = False,
    smooth: str = "var",
    eps: float = 0.0,
) -> RunningStats:
    """:func:`update_running` on arguments that are already valid (the layers' own, checked
    when they were set): the same maths, without re-validating them on every step."""
    if not isinstance(running.mean, np.ndarray):  # O(C) state of another library: via host
        return _staged(
            running, batch, momentum, momentum_weights, unbiased=unbiased, smooth=smooth, eps=eps
        )
    mean, var = np.asarray(batch.mean, np.float64), np.asarray(batch.var, np.float64)
    if mean.shape != running.mean.shape or var.shape != running.var.shape:
        raise ValueError(
            f"batch statistics of shape {mean.shape}/{var.shape} do not match running "
            f"statistics of shape {running.mean.shape}/{running.var.shape}"
        )
    with np.errstate(all="ignore"):
        # all finite <=> the sums are finite, unless a sum of finite values overflowed:
        # the per-element check runs only then (small batches pay for two reductions)
        if not _all_finite(mean, var):
            bad = ~(np.isfinite(mean) & np.isfinite(var))
            if bad.any():
                where = np.flatnonzero(bad)
                raise NonFiniteStatisticsError(
                    f"training batch has non-finite statistics (features {where[:8].tolist()} "
                    f"of {mean.size}; first mean={mean.ravel()[where[0]]!r}, "
                    f"var={var.ravel()[where[0]]!r})"
                )
        if unbiased:
            if batch.count < 2:
                raise ValueError(
                    f"the unbiased variance needs at least 2 values per feature; got {batch.count}"
                )
            var = var * (batch.count / (batch.count - 1))
        t = running.num_batches_tracked + 1
        if t >= COUNT_LIMIT:  # a state dict (and a checkpoint) holds it as an int64
            raise ValueError(
                f"num_batches_tracked={running.num_batches_tracked} cannot count another "
                "batch: it would reach 2**63, which no state dict or checkpoint can hold; "
                "running statistics left unchanged"
            )
        w = new_value_weight(momentum, momentum_weights, t)
        dtype = running.mean.dtype
        if smooth == "var" and dtype in _COMPILED and running.var.dtype == dtype:
            return RunningStats(*_compiled_update(running, mean, var, float(w)), t)
        old_mean = np.asarray(running.mean, np.float64)
        old_var = np.asarray(running.var, np.float64)
        new_mean = (1.0 - w) * old_mean + w * mean
        if smooth == "std":
            std = (1.0 - w) * np.sqrt(old_var + eps) + w * np.sqrt(var + eps)
            new_var = np.maximum(std * std - eps, 0.0)
        else:
            new_var = (1.0 - w) * old_var + w * var
        dtype = running.mean.dtype
        out_mean = new_mean.astype(dtype, copy=False)
        out_var = new_var.astype(dtype, copy=False)
        if not (
            _all_finite(out_mean, out_var)
            or (np.all(np.isfinite(out_mean)) and np.all(np.isfinite(out_var)))
        ):
            raise NonFiniteStatisticsError(
                f"updating the running statistics would overflow the layer dtype {dtype} "
                f"(max |batch mean| {np.max(np.abs(mean))!r}, max batch var {np.max(var)!r})"
            )
    return RunningStats(out_mean, out_var, t)


_COMPILED = (np.dtype(np.float32), np.dtype(np.float64))  # what running_update compiles for


def _compiled_update(running: RunningStats, mean, var, w: float):
    """``(1 - w) old + w new`` for the mean and variance, formed in float64 and rounded once
    to the running statistics' dtype: :func:`batchnorm.backends.numba.small.running_update`
    (the one implementation, shared with the torch adapter) on copies of them.

    Raises
    ------
    NonFiniteStatisticsError
        When a new value is not finite in that dtype (nothing is returned then).
    """
    from .backends.numba.small import running_update  # numba: imported on first use

    out_mean = np.array(running.mean, copy=True, order="C")
    out_var = np.array(running.var, copy=True, order="C")
    flat = (a.reshape(-1) for a in (out_mean, out_var, mean, var))
    if not running_update(*flat, 1.0 - w, w, w):
        raise NonFiniteStatisticsError(
            f"updating the running statistics would overflow the layer dtype {out_mean.dtype} "
            f"(max |batch mean| {np.max(np.abs(mean))!r}, max batch var {np.max(var)!r})"
        )
    return out_mean, out_var


def _host(v) -> np.ndarray:
    """A per-feature array as NumPy (an explicit, O(C) copy off its device when needed)."""
    if isinstance(v, (np.ndarray, np.generic, int, float)):
        return np.asarray(v)
    from ._xp import to_numpy

    return to_numpy(v)


def _staged(running: RunningStats, batch: BatchStats, *args, **kwargs) -> RunningStats:
    """The running update of state held by another array library (torch, JAX, ...): the
    O(C) statistics are staged through host memory, updated with the NumPy maths, and
    returned in the state's library, device and dtype."""
    from ._xp import device, from_numpy, namespace

    xp, dev, dtype = namespace(running.mean), device(running.mean), running.mean.dtype
    host = RunningStats(
        np.array(_host(running.mean)), np.array(_host(running.var)), running.num_batches_tracked
    )
    b = BatchStats(batch.count, np.asarray(_host(batch.mean), np.float64), _host(batch.var))
    new = update_running_unchecked(host, b, *args, **kwargs)
    return RunningStats(
        from_numpy(xp, new.mean, dev, dtype),
        from_numpy(xp, new.var, dev, dtype),
        new.num_batches_tracked,
    )
