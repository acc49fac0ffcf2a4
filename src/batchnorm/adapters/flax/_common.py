"""What the linen and nnx modules share: feature axes, the checks of Flax arguments this
library does not support, the output dtype, and batch renorm's warm-up schedule as traced
arithmetic (the step count is a variable, so the limits are arrays under ``jit``)."""

from __future__ import annotations

from collections.abc import Iterable

import jax.numpy as jnp

from ..._validation import check_count, check_renorm_limits
from ...renorm import RenormSchedule
from ..jax._args import momentum as _momentum

__all__ = [
    "checked_dtype",
    "checked_limits",
    "checked_momentum",
    "checked_steps",
    "feature_axes",
    "out_dtype",
    "renorm_limits",
    "unsupported",
]


def feature_axes(ndim: int, axis) -> tuple[int, ...]:
    """Flax's feature axes: sorted, non-negative, deduplicated; an axis out of range is
    refused naming the input's rank."""
    axes = tuple(axis) if isinstance(axis, Iterable) else (axis,)
    out = set()
    for a in axes:
        if not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(f"axis={axis!r} is out of range for an input with {ndim} axes")
        out.add(a % ndim)
    return tuple(sorted(out))


def unsupported(mask, axis_index_groups) -> None:
    """Refuse, clearly, the Flax options this library does not implement."""
    if mask is not None:
        raise NotImplementedError(
            "batchnorm.flax does not support mask= (statistics over a subset of the batch); "
            "use flax's own BatchNorm for masked batches"
        )
    if axis_index_groups is not None:
        raise NotImplementedError(
            "batchnorm.flax does not support axis_index_groups; its statistics are merged "
            "over the whole axis_name"
        )


def renorm_limits(step, r_max: float, d_max: float, warmup_steps: int, schedule):
    """``(rmax, dmax)`` at training step ``step`` (a traced int array): plain batch norm
    (1, 0) for the first ``warmup_steps`` steps, then ``(r_max, d_max)``; or, given a
    :class:`batchnorm.RenormSchedule`, its linear relaxation evaluated with array
    arithmetic (as :meth:`batchnorm.RenormSchedule.__call__`)."""
    step = jnp.asarray(step, jnp.float32)
    if schedule is None:
        warm = step < warmup_steps
        return jnp.where(warm, 1.0, float(r_max)), jnp.where(warm, 0.0, float(d_max))
    if not isinstance(schedule, RenormSchedule):
        raise TypeError(f"schedule must be a batchnorm.RenormSchedule or None; got {schedule!r}")
    return (
        _ramp(step, schedule.warmup_steps, schedule.rmax_steps, 1.0, schedule.rmax),
        _ramp(step, schedule.warmup_steps, schedule.dmax_steps, 0.0, schedule.dmax),
    )


def _ramp(step, warmup: int, end: int, start: float, final: float):
    frac = (step - warmup) / max(1, end - warmup)
    value = start + jnp.clip(frac, 0.0, 1.0) * (final - start)
    value = jnp.where(step >= end, final, value)
    return jnp.where(step <= warmup, start, value)


def out_dtype(x, scale, bias, dtype):
    """Flax's result dtype: ``dtype`` if given, else the promotion of ``x`` and the
    parameters. ``x`` is normalized in it, as ``flax.nnx.BatchNorm`` does (so the linen
    and nnx modules compute the same)."""
    args = [a for a in (x, scale, bias) if a is not None]
    return checked_dtype(dtype) if dtype is not None else jnp.result_type(*args)


def checked_dtype(dtype):
    """The module's ``dtype`` field as a floating dtype (None kept): an integer, bool or
    complex ``dtype`` is refused naming the field, not the input it would be cast to."""
    if dtype is None:
        return None
    dt = jnp.dtype(dtype)
    if dt.name not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(
            f"dtype={dt.name}: batchnorm.flax computes and returns a floating dtype "
            "(float16, bfloat16, float32 or float64), or None for the promotion of x and "
            "the parameters"
        )
    return dt


def checked_momentum(momentum: object) -> float:
    """``momentum`` as a Python float in [0, 1] (checked before anything is computed)."""
    return _momentum(momentum)


def checked_limits(r_max: object, d_max: object) -> tuple[float, float]:
    """``(r_max, d_max)`` as floats, ``r_max >= 1``, ``d_max >= 0`` (else a clear error)."""
    try:
        return check_renorm_limits(r_max, d_max)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("rmax", "r_max").replace("dmax", "d_max")) from None


def checked_steps(warmup_steps: object) -> int:
    """``warmup_steps`` as an int >= 0."""
    return check_count(warmup_steps, "warmup_steps", minimum=0)
