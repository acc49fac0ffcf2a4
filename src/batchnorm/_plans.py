"""The one plan cache of the library: everything that depends only on an input's signature,
computed once per signature and reused by every later call with such an input.

A plan is keyed on what determines it (a tuple whose first item names the kind of plan):

* ``("layout", shape, axis, ...)``: the :class:`batchnorm._validation.Layout` of a shape and
  feature axis (the axis validated against the shape);
* ``(backend name, shape, strides, dtype, axis, ...)``: the :class:`batchnorm.backends.Plan`
  of a NumPy array (its layout and the backend that runs it);
* ``("torch", shape, strides, dtype)``: how the torch adapter views a CPU tensor for the
  compiled kernels.

The store is a plain dict (reads and writes are atomic under the GIL; two threads building
the same plan at once build equal records), emptied when it holds :data:`LIMIT` plans.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["LIMIT", "PLANS", "cached", "clear"]

T = TypeVar("T")

#: Plans kept before the store is emptied (a program sees a handful of signatures).
LIMIT = 4096

#: The store: key -> plan. Read it directly on a hot path (``PLANS.get(key)``).
PLANS: dict = {}


def cached(key: tuple, build: Callable[..., T], /, *args) -> T:
    """The plan of ``key``: stored, or ``build(*args)`` stored now (an error is raised and
    nothing is stored)."""
    plan = PLANS.get(key)
    if plan is None:
        plan = build(*args)
        if len(PLANS) >= LIMIT:
            PLANS.clear()
        PLANS[key] = plan
    return plan


def clear() -> None:
    """Forget every plan (they are rebuilt on the next call)."""
    PLANS.clear()
