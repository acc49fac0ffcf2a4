"""Checks of the layers' constructor arguments (each raises before anything is built)."""

from __future__ import annotations

import math

import numpy as np

from .. import checkpoint
from .._validation import SUPPORTED_DTYPES, check_axis, check_count, check_eps, check_real

__all__ = [
    "as_feature_shape",
    "check_dtype",
    "check_flag",
    "check_nonfinite",
    "check_positive_eps",
    "feature_axis",
]


def as_feature_shape(num_features: object) -> tuple[int, ...]:
    """``num_features`` (a positive int or a non-empty sequence of them) as a shape tuple.

    At most ``checkpoint.MAX_FEATURES`` features in all (a larger layer is refused before
    anything is allocated).
    """
    if isinstance(num_features, (list, tuple)):
        if not num_features:
            raise ValueError("num_features must name at least one feature size; got ()")
        shape = tuple(check_count(n, "num_features") for n in num_features)
    else:
        shape = (check_count(num_features, "num_features"),)
    if math.prod(shape) > checkpoint.MAX_FEATURES:
        raise ValueError(
            f"num_features={num_features!r} gives {math.prod(shape)} features; at most "
            f"{checkpoint.MAX_FEATURES} are supported"
        )
    return shape


def check_dtype(dtype: object) -> np.dtype:
    """A parameter dtype: float16, float32 or float64 (any byte order, stored native)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float16, float32 or float64; got {dtype!r}") from exc
    if dt.kind == "f" and not dt.isnative:
        dt = dt.newbyteorder("=")
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float16, float32 or float64; got {dt} ({dtype!r})")
    return dt


def check_flag(value: object, name: str) -> bool:
    """A bool (Python or NumPy); strings such as "False" and numbers are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def check_nonfinite(value: object) -> str:
    """``nonfinite``: "raise" or "skip"."""
    if not isinstance(value, str) or value not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip'; got {value!r}")
    return str(value)


def check_positive_eps(value: object) -> float:
    """``eps`` of a layer whose running std must stay > 0 (batch renorm): finite, > 0."""
    if check_real(value, "eps") <= 0:
        raise ValueError(f"BatchRenorm needs eps > 0 (its running std stays > 0); got {value!r}")
    return check_eps(value)


def feature_axis(axis: object, fshape: tuple[int, ...], num_features: object):
    """``axis`` checked against the feature shape (one axis per feature dimension)."""
    axis = check_axis(axis)
    if not isinstance(axis, int) and len(set(axis)) != len(axis):
        raise ValueError(f"axis={axis!r} names the same axis twice")
    n_axes = 1 if isinstance(axis, int) else len(axis)
    if n_axes != len(fshape):
        raise ValueError(
            f"axis={axis!r} names {n_axes} feature axes but num_features={num_features!r} "
            f"gives {len(fshape)}"
        )
    return axis
