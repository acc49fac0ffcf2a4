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
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["CONVENTIONS", "Convention", "get_convention", "new_value_weight", "update_running"]


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


CONVENTIONS: dict[str, Convention] = {
    "seed": Convention("seed", "old", 0.9, 1e-5, False, 1),
    "torch": Convention("torch", "new", 0.1, 1e-5, True, 1),
    "keras": Convention("keras", "old", 0.99, 1e-3, False, -1),
    "flax": Convention("flax", "old", 0.99, 1e-5, False, -1),
}


def get_convention(name: str | Convention) -> Convention:
    """Look up a preset by name (or pass a :class:`Convention` through)."""
    if isinstance(name, Convention):
        return name
    try:
        return CONVENTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown convention {name!r}; choose one of {sorted(CONVENTIONS)}"
        ) from None


def check_momentum(momentum: object) -> float | None:
    """Validate a momentum value: None or a real number in [0, 1]."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(
        momentum, (int, float, np.floating, np.integer)
    ):
        raise TypeError(f"momentum must be a real number in [0, 1] or None; got {momentum!r}")
    value = float(momentum)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"momentum must be in [0, 1] or None; got {value!r}")
    return value


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


def update_running(running: np.ndarray, batch: np.ndarray, weight_new: float) -> np.ndarray:
    """Return ``(1 - w) * running + w * batch`` as a new array (inputs untouched)."""
    return (1.0 - weight_new) * running + weight_new * batch
