"""The formulas of :mod:`batchnorm.core.coef`, made callable from compiled code.

numba compiles the very functions the NumPy backend and the array-API passes call: each
formula is registered as jitable (a plain Python function that numba compiles where a
kernel calls it), and the elementwise ops of :mod:`batchnorm.core.ops` get scalar
implementations. Nothing here restates a formula.
"""

from __future__ import annotations

import math

from numba import types
from numba.extending import overload, register_jitable

from ...core import coef, ops

FORMULAS = (
    coef.inv_std,
    coef.mean_offset,
    coef.overflow_limit,
    coef.moments_from_shifted_sums,
    coef.overflow_needed,
    coef.overflow_scale,
    coef.output_coef,
    coef.backward_coef,
    coef.input_grad_coef,
    coef.centred_grad_sum,
)
for _f in FORMULAS:
    register_jitable(_f)


@overload(ops.sqrt, inline="always")
def _sqrt(v):
    if isinstance(v, types.Float):
        return lambda v: math.sqrt(v) if v >= 0.0 else math.nan
    return None


@overload(ops.where, inline="always")
def _where(cond, a, b):
    if isinstance(cond, types.Boolean):

        def impl(cond, a, b):
            return a if cond else b

        return impl
    return None
