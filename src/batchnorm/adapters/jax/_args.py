"""Argument checks of :mod:`batchnorm.jax` (eager, at trace time: shapes, dtypes and the
static arguments; nothing here looks at array values, so everything traces under ``jit``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..._validation import Layout, check_count, check_real, check_renorm_limits, layout
from . import _collective as coll

__all__ = [
    "as_x",
    "check_axis_name",
    "data_layout",
    "features",
    "mode",
    "momentum",
    "renorm_limits",
    "required",
    "running",
    "static_eps",
    "virtual_batch",
]

_FLOATS = ("float16", "bfloat16", "float32", "float64")
_STATIC = "(a Python value: mark it static under jax.jit, e.g. static_argnames)"


def mode(training: object) -> bool:
    """``training`` as a Python bool (a traced value cannot choose the computation)."""
    if isinstance(training, bool) or type(training).__name__ == "bool_":
        return bool(training)
    raise TypeError(f"training must be True or False {_STATIC}; got {training!r}")


def _is_float(dtype) -> bool:
    return jnp.dtype(dtype).name in _FLOATS


def as_x(x: object) -> jax.Array:
    """The input as a JAX array of a floating dtype, with at least one value."""
    if not isinstance(x, jax.Array):
        x = jnp.asarray(x)
    if not _is_float(x.dtype):
        raise TypeError(f"x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have at least one axis; got a 0-d array")
    return x


def data_layout(x, axis: object) -> Layout:
    """The layout of ``x`` with feature ``axis``; an empty batch is refused."""
    lay = layout(tuple(x.shape), axis)
    if lay.count == 0:
        raise ValueError(f"cannot normalize an empty batch: x has shape {tuple(x.shape)}")
    return lay


def features(lay: Layout, axis: object, **arrays) -> dict:
    """Each named per-feature array as a JAX array of the feature shape (None kept)."""
    out = {}
    for name, v in arrays.items():
        if v is None:
            out[name] = None
            continue
        if not isinstance(v, jax.Array):
            v = jnp.asarray(v)
        if not _is_float(v.dtype):
            raise TypeError(f"{name} must be a floating array; got dtype {v.dtype}")
        if tuple(v.shape) != lay.fshape:
            raise ValueError(
                f"{name} has shape {tuple(v.shape)} but x with shape {lay.shape} and "
                f"axis={axis!r} has per-feature shape {lay.fshape}"
            )
        out[name] = v
    return out


def required(name: str, v: object) -> None:
    """Refuse a missing running statistic."""
    if v is None:
        raise TypeError(f"{name} is required (an array of the per-feature shape)")


def static_eps(eps: object) -> float:
    """eps as a finite Python float >= 0."""
    try:
        value = check_real(eps, "eps")
    except TypeError:
        raise TypeError(f"eps must be a real number {_STATIC}; got {eps!r}") from None
    if value < 0:
        raise ValueError(f"eps must be finite and >= 0; got {value!r}")
    return value


def momentum(value: object) -> float:
    """momentum as a Python float in [0, 1] (the weight of the old running value)."""
    if value is None:
        raise TypeError(
            "momentum=None (a cumulative average) needs a step count, which these pure "
            "functions do not keep; pass a momentum in [0, 1]"
        )
    try:
        m = check_real(value, "momentum")
    except TypeError:
        raise TypeError(f"momentum must be a real number {_STATIC}; got {value!r}") from None
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1]; got {m!r}")
    return m


def virtual_batch(size: object, lay: Layout) -> int:
    """A ghost batch size (samples along axis 0, which must not be a feature axis)."""
    vbs = check_count(size, "virtual_batch_size")
    if 0 in lay.axes:
        raise ValueError(
            f"ghost batch norm splits axis 0 into virtual batches, but axis 0 is a feature "
            f"axis (feature axes {lay.axes} of x with shape {lay.shape})"
        )
    per_sample = lay.count // lay.shape[0]
    if vbs * per_sample < 2:
        raise ValueError(
            f"virtual_batch_size={vbs} on x of shape {lay.shape} gives virtual batches with "
            "1 value per feature, which have no variance; use a larger virtual_batch_size"
        )
    return vbs


def check_axis_name(axis_name: object) -> None:
    """``axis_name`` must be bound (inside ``pmap``, ``shard_map`` or a named ``vmap``)."""
    if axis_name is None:
        return
    try:
        coll.axis_size(axis_name)
    except (NameError, KeyError, ValueError) as exc:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here: call this inside jax.pmap, "
            "jax.shard_map or jax.vmap with that axis name"
        ) from exc


def renorm_limits(rmax: object, dmax: object) -> jax.Array:
    """``(rmax, dmax)`` as one float32 array: Python numbers are checked
    (:func:`batchnorm._validation.check_renorm_limits`); JAX arrays (values unknown under
    ``jit``) must be 0-d and floating or integer, and are used as given."""
    if isinstance(rmax, jax.Array) or isinstance(dmax, jax.Array):
        pair = []
        for name, v in (("rmax", rmax), ("dmax", dmax)):
            v = jnp.asarray(v)
            if v.ndim != 0 or not (_is_float(v.dtype) or jnp.issubdtype(v.dtype, jnp.integer)):
                raise TypeError(
                    f"{name} must be a real number or a 0-d real array; got shape "
                    f"{tuple(v.shape)}, dtype {v.dtype}"
                )
            pair.append(jnp.astype(v, jnp.float32))
        return jnp.stack(pair)
    return jnp.asarray(check_renorm_limits(rmax, dmax), jnp.float32)


def running(name: str, v: object) -> None:
    """Refuse a missing running statistic, and a float16 one: its range (65504) is smaller
    than that of the statistics it would hold (a batch variance of 1e5 would be stored as
    inf). Keep running statistics in float32 (as Flax's ``batch_stats`` are) or wider."""
    required(name, v)
    dtype = getattr(v, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) == jnp.float16:
        raise TypeError(
            f"{name} is float16, whose largest value (65504) the running statistics can "
            "exceed (they would become inf); keep them in float32 (x may stay float16)"
        )
