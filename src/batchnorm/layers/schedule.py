"""Batch renorm's schedule of its clipping limits (Ioffe 2017), a record a layer's config
can hold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .._validation import check_count, check_renorm_limits

__all__ = ["RenormSchedule", "schedule_from_config"]


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


def schedule_from_config(schedule: object) -> Callable[[int], tuple[float, float]] | None:
    """A schedule argument: a :class:`RenormSchedule`'s fields (from a config) build one; a
    callable or None passes; anything else is refused."""
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
