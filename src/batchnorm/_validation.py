"""Input checks shared by the public entry points.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (right
kind, wrong shape or value) with a message that names the shapes and values involved.
Nothing here mutates its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._plans import PLANS, cached

SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: Counts (batch counters, merged value counts) are int64 in state dicts, checkpoints and
#: torch buffers: every count stays below this.
COUNT_LIMIT = 2**63


def as_float_array(x: object, name: str) -> np.ndarray:
    """Return ``x`` as an ndarray of a supported floating dtype, without copying.

    Non-native byte order (e.g. ``'>f4'``) is converted to the native one (a copy); masked
    arrays are refused, since their mask would be silently ignored.
    """
    if not isinstance(x, (np.ndarray, np.generic)) and _is_array(x):
        from ._xp import check_float

        return check_float(x, name)  # an array of another library: kept as it is
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array (shape {x.shape}); its mask would be ignored. Pass "
            f"{name}.filled(value) or the unmasked rows instead"
        )
    try:
        arr = np.asarray(x)
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a torch tensor needing grad
        raise TypeError(
            f"{name} ({type(x).__name__}) cannot be read as a NumPy array: {exc}"
        ) from None
    if arr.dtype.kind == "f" and not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64; got dtype {arr.dtype} "
            f"with shape {arr.shape}"
        )
    return arr


def _is_array(x: object) -> bool:
    """Whether ``x`` is an array of an Array API library other than NumPy (torch, JAX,
    CuPy, array-api-strict, ...), recognised without importing any of them."""
    mod = type(x).__module__.split(".")[0]
    if mod in ("builtins", "numpy"):
        return False
    from ._xp import is_array

    return is_array(x)


def as_input(x: object, name: str = "x") -> np.ndarray:
    """Validate a data array: supported float dtype and at least two dimensions."""
    arr = as_float_array(x, name)
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch and features); got shape "
            f"{tuple(arr.shape)}"
        )
    return arr


def check_axis(axis: object) -> int | tuple[int, ...]:
    """``axis`` as an int or a non-empty tuple of ints (range is checked against the data)."""
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, (bool, np.bool_)):
        return int(axis)
    if isinstance(axis, (tuple, list)) and axis:
        if all(
            isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) for a in axis
        ):
            return tuple(int(a) for a in axis)
    raise TypeError(f"axis must be an int or a non-empty tuple of ints; got {axis!r}")


def normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Turn ``axis`` (int or tuple of ints, negatives allowed) into sorted non-negative axes."""
    if isinstance(axis, (tuple, list)) and not axis:
        raise ValueError("axis must name at least one feature axis; got an empty tuple")
    axis = check_axis(axis)
    raw = (axis,) if isinstance(axis, int) else axis
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
    """The axes statistics reduce over: all but the feature axes."""
    return tuple(i for i in range(ndim) if i not in axes)


def as_feature_vector(
    v: object, name: str, fshape: tuple[int, ...], x_shape: tuple[int, ...]
) -> np.ndarray:
    """Check a per-feature array (gamma, beta, running stats) of NumPy data and return it as
    float64 (an array of another library is refused: one call, one library)."""
    if not isinstance(v, (np.ndarray, np.generic)) and _is_array(v):
        raise TypeError(
            f"{name} is a {type(v).__module__}.{type(v).__name__} but x is a NumPy array "
            f"(shape {x_shape}); pass arrays of one library"
        )
    arr = as_float_array(v, name)
    if arr.shape != fshape:
        raise ValueError(
            f"{name} has shape {arr.shape} but x with shape {x_shape} has per-feature shape "
            f"{fshape}"
        )
    return arr.astype(np.float64, copy=False)


def same_layout(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays of one shape lie in memory alike: equal strides on every axis of
    more than one element (a size-1 axis may carry any stride)."""
    return all(p == q for p, q, n in zip(a.strides, b.strides, a.shape, strict=True) if n > 1)


def dense(a: np.ndarray) -> bool:
    """Whether ``a`` fills its memory in some axis order (C order or a transpose of it), so
    that ``np.empty_like(a)`` is laid out like it."""
    if a.flags.c_contiguous:
        return True
    order = sorted(range(a.ndim), key=lambda i: -a.strides[i])
    return a.transpose(order).flags.c_contiguous


def _memory_of(a: object) -> np.ndarray | None:
    """The NumPy view of ``a``'s memory (no copy), or None for objects with no buffer of
    their own (None, numbers, lists, arrays of other libraries)."""
    if isinstance(a, np.ndarray):
        return a
    if isinstance(a, memoryview) or hasattr(a, "__array_interface__"):
        try:
            return np.asarray(a)
        except (TypeError, ValueError):
            return None
    return None


def check_no_overlap(out: np.ndarray, name: str, inputs: dict[str, object]) -> None:
    """Refuse an ``out`` array that shares memory with any of ``inputs`` (name -> the
    argument as the caller passed it, before any conversion), whatever the view, dtype or
    byte order: a big-endian input and a native-order view of its buffer overlap too.
    Memory bounds are compared (``np.may_share_memory``), so interleaved views count as
    overlapping: nothing the library writes may alias what it reads."""
    for what, a in inputs.items():
        if a is None:
            continue
        mem = a if isinstance(a, np.ndarray) else _memory_of(a)
        if mem is not None and np.may_share_memory(out, mem):
            raise ValueError(
                f"{name} (shape {out.shape}, dtype {out.dtype}) shares memory with {what} "
                f"(shape {mem.shape}, dtype {mem.dtype}); pass a separate array (inputs "
                "are never modified)"
            )


def check_out(out: object, like, name: str, inputs: dict[str, object]):
    """Validate an ``out=`` array: None, or a writeable ndarray with the shape and dtype of
    ``like``, C-contiguous or with the strides of ``like`` (e.g. a channels-last view of NCHW
    memory, written in that memory order), that shares no memory with any of ``inputs``
    (:func:`check_no_overlap`)."""
    if out is None:
        return None
    if not isinstance(like, np.ndarray):
        raise TypeError(
            f"{name}= is supported for NumPy arrays only; the input is a {type(like).__name__}"
            " (its library allocates the result; arrays of some libraries, e.g. JAX, are "
            "immutable)"
        )
    if type(out) is not np.ndarray:
        raise TypeError(f"{name} must be a numpy.ndarray or None; got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"{name} has shape {out.shape} but the result has shape {like.shape}")
    if out.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {out.dtype} but the result has dtype {like.dtype}")
    if not (out.flags.c_contiguous or same_layout(out, like)):
        raise ValueError(
            f"{name} (shape {out.shape}, strides {out.strides}) must be C-contiguous or laid "
            f"out like the input (strides {like.strides})"
        )
    if not out.flags.writeable:
        raise ValueError(f"{name} (shape {out.shape}) is read-only")
    check_no_overlap(out, name, inputs)
    return out


def check_real(value: object, name: str) -> float:
    """A finite real number as a Python float (bools, strings, overflow and NaN refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.floating, np.integer)
    ):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite; got {value!r:.60}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite; got {out!r}")
    return out


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (bools, floats such as 2.5 or inf, strings refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return int(value)


def check_eps(eps: object) -> float:
    """Validate ``eps``: a finite real number >= 0."""
    value = check_real(eps, "eps")
    if value < 0:
        raise ValueError(f"eps must be finite and >= 0; got {value!r}")
    return value


def check_renorm_limits(rmax: object, dmax: object) -> tuple[float, float]:
    """Batch renorm's clipping limits as floats: finite, ``rmax >= 1``, ``dmax >= 0``."""
    r, d = check_real(rmax, "rmax"), check_real(dmax, "dmax")
    if r < 1.0:
        raise ValueError(f"rmax must be finite and >= 1; got {r!r}")
    if d < 0.0:
        raise ValueError(f"dmax must be finite and >= 0; got {d!r}")
    return r, d


@dataclass(frozen=True)
class Layout:
    """Everything about an input that depends only on its shape and the feature axes.

    Attributes
    ----------
    shape : tuple of int
    axes : tuple of int
        Feature axes, non-negative and sorted.
    red : tuple of int
        The axes statistics reduce over.
    bshape : tuple of int
        Shape that broadcasts a per-feature array against the data.
    fshape : tuple of int
        Shape of one per-feature array (the sizes of the feature axes, in axis order).
    count : int
        Values per feature.
    """

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    red: tuple[int, ...]
    bshape: tuple[int, ...]
    fshape: tuple[int, ...]
    count: int


def _make_layout(shape: tuple[int, ...], axis: object) -> Layout:
    if isinstance(axis, (tuple, list)) and not axis:
        normalize_axes(axis, len(shape))  # raises: no feature axis
    key = check_axis(axis)
    axes = normalize_axes(tuple(key) if isinstance(key, list) else key, len(shape))
    red = reduce_axes(len(shape), axes)
    return Layout(
        shape,
        axes,
        red,
        broadcast_shape(len(shape), axes, shape),
        feature_shape(shape, axes),
        math.prod(shape[i] for i in red),
    )


def axis_key(axis: object) -> tuple:
    """What identifies a feature ``axis`` in a plan key: the value and its type (``True``
    hashes like ``1`` but is refused), element types for a sequence."""
    if axis.__class__ is int:
        return (axis, int)
    if isinstance(axis, (tuple, list)):
        return (tuple(axis), axis.__class__, *map(type, axis))
    return (axis, axis.__class__)


def layout(shape: tuple[int, ...], axis: object) -> Layout:
    """The :class:`Layout` of data of ``shape`` with feature ``axis``, from the plan cache
    (:mod:`batchnorm._plans`: computed once per distinct pair). Raises like
    :func:`normalize_axes`."""
    shape = tuple(shape)
    key = ("layout", shape, *axis_key(axis))
    try:
        lay = PLANS.get(key)
    except TypeError:  # an unhashable axis: refused with its own message
        return _make_layout(shape, axis)
    return lay if lay is not None else cached(key, _make_layout, shape, axis)


# ----------------------------------------------------------------------------- state arrays
#: What :func:`check_state_array` accepts by default: real floating arrays.
STATE_KINDS = "f"


def check_state_array(
    value: object, name: str, *, kinds: str = STATE_KINDS, finite: bool = True
) -> np.ndarray:
    """The one check of an array that enters as state (a state dict, a checkpoint, another
    framework's state, fold weights, given statistics): every door calls it first.

    Refused, the same way at every door: masked arrays (the mask would be dropped), and any
    dtype whose kind is not in ``kinds`` (real floats by default; ``"fiu"`` also takes
    integers): complex, object, string, bytes, bool, datetime, structured. With ``finite``
    (the default) NaN and infinities are refused, naming the first offending entries.

    Parameters
    ----------
    value : array_like
        A NumPy array or anything ``np.asarray`` reads without guessing (another library's
        array must be converted to NumPy by the caller, explicitly).
    name : str
        How the error messages name the value, e.g. ``"state['running_var']"``.

    Returns
    -------
    numpy.ndarray
        ``value`` as a NumPy array (not copied when it already is one).

    Raises
    ------
    TypeError
        A masked array, or a dtype of a refused kind.
    ValueError
        Non-finite values (with ``finite``).
    """
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array; its mask would be ignored")
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real array; got the string {value!r:.40}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} is not an array: {exc}") from None
    if arr.dtype.kind not in kinds or arr.dtype.fields is not None:
        want = "a real floating" if kinds == "f" else "a real numeric"
        raise TypeError(f"{name} must be {want} array; got dtype {arr.dtype} ({arr.shape})")
    if finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))
        raise ValueError(
            f"{name} has non-finite values: entries {bad[:8].tolist()} of {arr.size}, first "
            f"{arr.ravel()[bad[0]]!r}"
        )
    return arr
