"""Elementwise functions the formulas of :mod:`batchnorm.core.coef` use beyond arithmetic.

Each takes Python/NumPy scalars, NumPy arrays, or arrays of any Array API namespace (the
namespace is read from the array). The compiled backend overloads these very functions for
numba (:mod:`batchnorm.backends.numba.coef`), so a formula written with them compiles
unchanged into the kernels: every formula exists once.
"""

from __future__ import annotations

import math

import numpy as np


def _xp(v):
    from .._xp import namespace

    return namespace(v)


def _is_numpy(v) -> bool:
    return isinstance(v, (float, int, np.ndarray, np.generic))


def sqrt(v):
    """Square root (correctly rounded in every namespace that follows IEEE 754)."""
    if isinstance(v, float):
        return math.sqrt(v) if v >= 0 else math.nan
    if _is_numpy(v):
        return np.sqrt(v)
    return _xp(v).sqrt(v)


def where(cond, a, b):
    """``a`` where ``cond`` else ``b``, elementwise (``a``/``b`` may be Python floats)."""
    if isinstance(cond, (bool, np.bool_)):
        return a if cond else b
    if _is_numpy(cond):
        return np.where(cond, a, b)
    xp = _xp(cond)
    ref = a if not isinstance(a, (int, float)) else b
    if isinstance(ref, (int, float)):
        # both numbers (e.g. the overflow scale): the namespace's default float dtype on
        # the condition's device, which every device supports
        dev = _device(cond)
        dt = xp.__array_namespace_info__().default_dtypes(device=dev)["real floating"]
    else:
        dt, dev = ref.dtype, _device(ref)
    a = xp.asarray(a, dtype=dt, device=dev) if isinstance(a, (int, float)) else a
    b = xp.asarray(b, dtype=dt, device=dev) if isinstance(b, (int, float)) else b
    return xp.where(cond, a, b)


def _device(v):
    from .._xp import device

    return device(v)


def rounded(v, like):
    """``v`` rounded to the precision of ``like``'s dtype, returned in ``v``'s dtype.

    The shift of the rounding-safe form: ``s = rounded(mean, x)`` is the mean as the data
    can hold it, so ``x - s`` is exact (Sterbenz) for data near their mean.
    """
    if v.__class__ is np.ndarray and like.__class__ is np.ndarray:  # the common case
        if like.dtype == np.float64 and v.dtype == np.float64:
            return v  # already as the data hold it
        wt = np.float64 if like.dtype == np.float64 else np.float32
        return v.astype(wt).astype(v.dtype)
    if _is_numpy(v) and _is_numpy(like):
        wt = np.float64 if np.asarray(like).dtype == np.float64 else np.float32
        return np.asarray(v).astype(wt).astype(np.asarray(v).dtype)
    xp = _xp(v)
    return xp.astype(xp.astype(v, like.dtype), v.dtype)
