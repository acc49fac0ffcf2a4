"""Input checks shared by the public entry points.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (right
kind, wrong shape or value) with a message that names the shapes and values involved.
Nothing here mutates its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def as_float_array(x: object, name: str) -> np.ndarray:
    """Return ``x`` as an ndarray of a supported floating dtype, without copying."""
    arr = np.asarray(x)
    if arr.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64; got dtype {arr.dtype} "
            f"with shape {arr.shape}"
        )
    return arr


def as_input(x: object, name: str = "x") -> np.ndarray:
    """Validate a data array: supported float dtype and at least two dimensions."""
    arr = as_float_array(x, name)
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch and features); got shape {arr.shape}"
        )
    return arr


def normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Turn ``axis`` (int or tuple of ints, negatives allowed) into sorted non-negative axes."""
    raw = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if not raw:
        raise ValueError("axis must name at least one feature axis; got an empty tuple")
    axes = []
    for a in raw:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axis entries must be integers; got {a!r} in axis={axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array with {ndim} dimensions")
        axes.append(int(a) % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis={axis!r} names the same dimension twice (ndim={ndim})")
    if len(axes) == ndim:
        raise ValueError(
            f"axis={axis!r} leaves no axis to reduce over for an array with {ndim} dimensions"
        )
    return tuple(sorted(axes))


def feature_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one per-feature vector: the sizes of the feature axes, in axis order."""
    return tuple(shape[a] for a in axes)


def broadcast_shape(ndim: int, axes: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape that lets a per-feature array broadcast against data of ``shape``."""
    return tuple(shape[i] if i in axes else 1 for i in range(ndim))


def reduce_axes(ndim: int, axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i not in axes)


def as_feature_vector(
    v: object, name: str, fshape: tuple[int, ...], x_shape: tuple[int, ...]
) -> np.ndarray:
    """Check a per-feature array (gamma, beta, running stats) and return it as float64."""
    arr = as_float_array(v, name)
    if arr.shape != fshape:
        raise ValueError(
            f"{name} has shape {arr.shape} but x with shape {x_shape} has per-feature shape "
            f"{fshape}"
        )
    return arr.astype(np.float64, copy=False)


def check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps must be a real number; got {eps!r}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be finite and >= 0; got {value!r}")
    return value
