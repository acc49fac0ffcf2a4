"""The argument record of the norm layers and the registry of layer classes.

A layer's constructor arguments live in one :class:`Arguments` record the layer owns; it is
what ``config()``, ``from_config()``, ``repr()`` and ``save()`` are built from. Each argument
is also an attribute of the layer, an :class:`Argument` descriptor: reading it reads the
record; assigning it runs the same check as the constructor and updates the record (so a
layer rebuilt from ``config()`` behaves like this one), or, for the arguments that shape the
state (features, axis, dtype, affine, ...), raises ``AttributeError``.

Registry: the classes ``from_config`` may build, keyed by module-qualified name
(``batchnorm.layers.batchnorm.BatchNorm``). The library's own classes are registered under
their short names as well, which is what their configs record; a class nobody registered
never builds from a config, whatever it is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "Argument",
    "Arguments",
    "Constant",
    "by_value",
    "layer_class",
    "library_layer",
    "qualified_name",
    "register_layer",
]

_REGISTRY: dict[str, type] = {}  # module-qualified name -> class
_LIBRARY: dict[str, str] = {}  # short name of a library class -> its qualified name


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class: the key of the registry."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer(cls: type) -> type:
    """Let :meth:`NormLayer.from_config` build ``cls`` from a config naming its qualified name.

    Usable as a class decorator for your own norm layers; their configs record the
    qualified name, so they never collide with the library's classes.
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_layer needs a class; got {cls!r}")
    _REGISTRY[qualified_name(cls)] = cls
    return cls


def library_layer(cls: type) -> type:
    """Register one of the library's own layer classes (also under its short name)."""
    if not cls.__module__.startswith("batchnorm."):
        raise ValueError(f"{qualified_name(cls)} is not a class of the batchnorm library")
    _LIBRARY[cls.__name__] = qualified_name(cls)
    return register_layer(cls)


def config_name(cls: type) -> str:
    """The name a config of ``cls`` records: the short name for the library's classes."""
    if _LIBRARY.get(cls.__name__) == qualified_name(cls):
        return cls.__name__
    return qualified_name(cls)


def layer_class(name: object) -> type:
    """The registered class a config's ``"class"`` names (ValueError when none is)."""
    if isinstance(name, str):
        target = _REGISTRY.get(_LIBRARY.get(name, name))
        if target is not None:
            return target
    raise ValueError(
        f"unknown layer class {name!r}; expected one of {sorted(_LIBRARY)} or the qualified "
        "name of a class registered with batchnorm.layers.register_layer"
    )


def build(cls: type, config: object) -> Any:
    """A layer of the registered class ``config["class"]`` names (a subclass of ``cls``),
    built from the other entries."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict; got {type(config).__name__}")
    args = dict(config)
    name = args.pop("class", config_name(cls))
    target = layer_class(name)
    if not issubclass(target, cls):
        raise ValueError(f"the config describes a {name}, which is not a {cls.__name__}")
    for key in ("num_features", "axis"):
        if isinstance(args.get(key), list):
            args[key] = tuple(args[key])
    try:
        return target(**args)
    except TypeError as exc:
        raise ValueError(f"config does not fit {name}: {exc}") from None


def json_value(v: object) -> object:
    """A recorded argument as a JSON-friendly value (tuples as lists, dtypes by name)."""
    if isinstance(v, tuple):
        return [json_value(i) for i in v]
    if isinstance(v, np.dtype):
        return v.name
    return v


_NEVER: Any = object()


class Arguments:
    """The record of one layer's constructor arguments: values in constructor order, and
    what ``config()`` shows for each (a JSON-friendly form)."""

    def __init__(self) -> None:
        self._values: dict[str, object] = {}
        self._shown: dict[str, object] = {}
        self._omit: dict[str, object] = {}

    def add(self, name: str, value: object, shown: object = _NEVER, omit_if: object = _NEVER):
        """Record ``name``; ``shown`` replaces the value in ``config()``; a value equal to
        ``omit_if`` is left out of ``config()`` (so older configs stay as they were)."""
        self._values[name] = value
        self._shown[name] = value if shown is _NEVER else shown
        if omit_if is not _NEVER:
            self._omit[name] = omit_if

    def order(self, names: tuple[str, ...]) -> None:
        """Put the named arguments first, in this order (the constructor's)."""
        rest = [k for k in self._values if k not in names]
        self._values = {k: self._values[k] for k in (*names, *rest)}
        self._shown = {k: self._shown[k] for k in (*names, *rest)}

    def __getitem__(self, name: str) -> object:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def set(self, name: str, value: object) -> None:
        """Store an already validated value of a recorded argument."""
        self._values[name] = value
        self._shown[name] = value

    def describe(self) -> str:
        """The arguments as a layer's ``repr`` shows them (``8, eps=1e-05, ...``)."""
        parts = []
        for key, value in self.items():
            if key == "num_features":
                parts.append(repr(value[0] if len(value) == 1 else value))
            elif isinstance(value, float):
                parts.append(f"{key}={value:g}")
            elif isinstance(value, np.dtype):
                parts.append(f"{key}={value.name!r}")
            else:
                parts.append(f"{key}={value!r}")
        return ", ".join(parts)

    def config(self) -> dict[str, object]:
        """The JSON-friendly arguments, in constructor order."""
        return {k: json_value(v) for k, v in self.items()}

    def items(self) -> list[tuple[str, object]]:
        """``(name, shown value)`` pairs, omitted defaults left out (what ``repr`` shows)."""
        return [
            (k, v)
            for k, v in self._shown.items()
            if not (k in self._omit and self._values[k] == self._omit[k])
        ]


def by_value(check: Callable[..., object], *args: object) -> Callable[[Any, object], object]:
    """The check of an :class:`Argument` whose value is checked on its own (not against the
    layer's other arguments): ``check(value, *args)``, the very function (and message) the
    constructor calls."""

    def run(layer: Any, value: object) -> object:
        return check(value, *args)

    run.__qualname__ = run.__name__ = f"by_value({getattr(check, '__name__', check)})"
    return run


class Argument:
    """A constructor argument as a layer attribute (see the module docstring).

    Parameters
    ----------
    check : callable(layer, value) -> value, optional
        Validates a new value (the constructor's check); None: fixed at construction.
    """

    def __init__(self, check: Callable[[Any, object], object] | None = None, doc: str = ""):
        self.check = check
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj._args._values[self.name]

    def __set__(self, obj: Any, value: object) -> None:
        if self.check is None:
            raise AttributeError(
                f"{type(obj).__name__}.{self.name} is fixed at construction; build a new layer "
                "(e.g. from a modified config())"
            )
        obj._args.set(self.name, self.check(obj, value))


class Constant:
    """A fact of a layer class (``uses_batch_stats``, ``synchronizable``, ...): readable on
    the class and its instances, never assignable on an instance."""

    def __init__(self, value: object, doc: str = "") -> None:
        self.value = value
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self.value

    def __set__(self, obj: Any, value: object) -> None:
        raise AttributeError(f"{type(obj).__name__}.{self.name} is a fact of the class; read-only")
