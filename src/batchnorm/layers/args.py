"""The argument record of the norm layers: constructor arguments validated once, kept in
one record behind ``config()``, ``from_config()``, ``repr()`` and ``save()``.

Reassigning a recorded argument validates it and updates the record (so a rebuilt layer
behaves like this one); arguments that shape the state (features, axis, dtype, affine,
...) are fixed at construction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import checkpoint
from .._validation import SUPPORTED_DTYPES, check_count
from ..checkpoint import check_state_dict

_LAYER_CLASSES: dict[str, type] = {}


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
    if value not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip'; got {value!r}")
    return str(value)


def _json_value(v: object) -> object:
    if isinstance(v, tuple):
        return [_json_value(i) for i in v]
    if isinstance(v, np.dtype):
        return v.name
    return v


class ArgumentRecord:
    """Mixin: the record of constructor arguments (``_args``) and what is built from it."""

    _args: dict[str, object]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("_abstract", False):  # the base class is not a layer to build
            _LAYER_CLASSES[cls.__name__] = cls

    def _arg_validators(self) -> dict[str, Any]:
        """Constructor arguments that may be reassigned later, with their validators.

        Every other recorded argument is fixed at construction. Subclasses add their own
        (e.g. ``virtual_batch_size``).
        """
        return {}

    #: State attributes checked when reassigned (see :meth:`_check_state_attr`).
    _STATE_ATTRS = frozenset(
        {
            "gamma",
            "beta",
            "running_mean",
            "running_var",
            "num_batches_tracked",
            "skipped_updates",
            "feature_shape",
            "training",
        }
    )

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._STATE_ATTRS and self.__dict__.get("_built", False):
            value = self._check_state_attr(name, value)
            object.__setattr__(self, name, value)
            return
        args = self.__dict__.get("_args")
        if args is not None and name in args and self.__dict__.get("_built", False):
            validate = self._arg_validators().get(name)
            if validate is None:
                raise AttributeError(
                    f"{type(self).__name__}.{name} is fixed at construction; build a new layer "
                    f"(e.g. from a modified config())"
                )
            value = validate(value)
            args[name] = value
        object.__setattr__(self, name, value)

    def _check_state_attr(self, name: str, value: object) -> object:
        """Validate a reassigned state attribute (the layer is unchanged when it raises).

        Parameters and running statistics must be arrays of the layer's library with its
        per-feature shape, floating and finite (the running variance >= 0); they are stored
        in the layer's dtype. Counters are integers >= 0; ``training`` a bool;
        ``feature_shape`` is fixed.
        """
        if name == "feature_shape":
            raise AttributeError(
                f"{type(self).__name__}.feature_shape is fixed at construction; build a new layer"
            )
        if name == "training":
            return check_flag(value, "training")
        if name in ("num_batches_tracked", "skipped_updates"):
            return check_count(value, name, minimum=0)
        current = self.__dict__.get(name)
        if current is None:
            if value is None:
                return None
            raise AttributeError(
                f"{type(self).__name__} was built without {name} (affine=False or "
                "track_running_stats=False); build a new layer to have one"
            )
        if value is None:
            raise TypeError(f"{name} cannot be set to None on this {type(self).__name__}")
        try:
            checked = check_state_dict(
                {name: self._host_any(value)},
                [name],
                self.feature_shape,
                self.dtype,
                nonnegative=("running_var",),
            )[name]
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(self).__name__}.{name}: {exc}") from None
        if isinstance(current, np.ndarray):
            return checked
        from .. import _xp

        return _xp.from_numpy(self._xp, checked, self._device, current.dtype)

    def _record_args(self, **extra: object) -> None:
        """Add subclass constructor arguments to the record behind config() and repr()."""
        self._args.update(extra)

    def _forget_args(self, *names: str) -> None:
        """Drop base arguments a subclass does not take (they stay as fixed attributes)."""
        for name in names:
            del self._args[name]

    def config(self) -> dict:
        """The constructor arguments (and the class name), as JSON-friendly values."""
        return {"class": type(self).__name__, **{k: _json_value(v) for k, v in self._args.items()}}

    @classmethod
    def from_config(cls, config: dict):
        """Build a layer from :meth:`config` (the class is looked up by its name)."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict; got {type(config).__name__}")
        args = dict(config)
        name = args.pop("class", cls.__name__)
        target = _LAYER_CLASSES.get(name) if isinstance(name, str) else None
        if target is None:
            raise ValueError(
                f"unknown layer class {name!r}; expected one of {sorted(_LAYER_CLASSES)}"
            )
        if not issubclass(target, cls):
            raise ValueError(f"the config describes a {name}, which is not a {cls.__name__}")
        for key in ("num_features", "axis"):
            if isinstance(args.get(key), list):
                args[key] = tuple(args[key])
        try:
            return target(**args)
        except TypeError as exc:
            raise ValueError(f"config does not fit {name}: {exc}") from None

    def __repr__(self) -> str:
        parts = []
        for key, value in self._args.items():
            if key == "num_features":
                parts.append(repr(value[0] if len(value) == 1 else value))
            elif isinstance(value, float):
                parts.append(f"{key}={value:g}")
            else:
                parts.append(f"{key}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)}, training={self.training})"
