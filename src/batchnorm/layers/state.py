"""A layer's state: one :class:`LayerState` record the layer owns, the attributes that expose
it (validated when assigned, or read-only), and versioned state dicts.

A state dict is a plain mapping of the parameter and running-statistic arrays (and
``num_batches_tracked``), returned as a :class:`StateDict`, a ``dict`` that also carries
the format ``version``; checkpoints record it in their metadata. Loading migrates older
versions first (``batchnorm.checkpoint.MIGRATIONS``); a dict without a version (e.g. built by
hand or by another framework's converter) is read as the current format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import checkpoint
from .._validation import check_count
from .._version import __version__ as library_version
from ..checkpoint import STATE_VERSION, check_state_dict, migrate
from .args import build, config_name
from .checks import check_flag

__all__ = ["LayerState", "ReadOnly", "StateArray", "StateCount", "StateDict"]

#: The per-feature arrays a layer may keep, in state-dict order.
ARRAYS = ("gamma", "beta", "running_mean", "running_var")


@dataclass(eq=False)
class LayerState:
    """Everything a layer changes after construction (plain attributes; the layer's lock
    guards the running statistics and counters).

    Attributes
    ----------
    gamma, beta, running_mean, running_var : array, shape (*features), or None
    num_batches_tracked, skipped_updates : int
    training : bool
    last_batch_stats : BatchStats or None
    dgamma, dbeta : array or None
    gradients_reduced : bool
    cache : object
        What the last forward left for the backward pass.
    """

    gamma: Any = None
    beta: Any = None
    running_mean: Any = None
    running_var: Any = None
    num_batches_tracked: int = 0
    skipped_updates: int = 0
    training: bool = True
    last_batch_stats: Any = None
    dgamma: Any = None
    dbeta: Any = None
    gradients_reduced: bool = False
    cache: Any = None

    def fresh(self) -> bool:
        """Whether the layer has never run nor been loaded (it may still move)."""
        return (
            self.cache is None
            and self.num_batches_tracked == 0
            and self.last_batch_stats is None
            and self.dgamma is None
        )

    def arrays(self) -> dict[str, Any]:
        """The per-feature arrays and gradients by name (absent ones included as None)."""
        return {k: getattr(self, k) for k in (*ARRAYS, "dgamma", "dbeta")}


class StateDict(dict):
    """A layer's state: a dict of arrays (and ``num_batches_tracked``) with a ``version``."""

    def __init__(self, *args, version: int = STATE_VERSION, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.version = version

    def copy(self) -> StateDict:
        """A shallow copy that keeps the version."""
        return StateDict(self, version=self.version)

    def __reduce__(self):  # copies keep the version
        return (type(self), (dict(self),), {"version": self.version})


class ReadOnly:
    """A state attribute the layer sets itself (results of forward/backward): read-only."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj._state, self.name)

    def __set__(self, obj: Any, value: object) -> None:
        raise AttributeError(
            f"{type(obj).__name__}.{self.name} is a result the layer computes; it is read-only"
        )


class StateCount(ReadOnly):
    """A counter (``num_batches_tracked``, ``skipped_updates``): an integer >= 0."""

    def __set__(self, obj: Any, value: object) -> None:
        checked = check_count(value, self.name, minimum=0)
        with obj._lock:
            setattr(obj._state, self.name, checked)


class StateFlag(ReadOnly):
    """``training``: True or False."""

    def __set__(self, obj: Any, value: object) -> None:
        setattr(obj._state, self.name, check_flag(value, self.name))


class StateArray(ReadOnly):
    """A parameter or running statistic: validated like a loaded state entry (the layer's
    per-feature shape, floating, finite, ``running_var >= 0``), stored in the layer's dtype,
    library and device; the layer is unchanged when the check fails."""

    def __set__(self, obj: Any, value: object) -> None:
        current = getattr(obj._state, self.name)
        if current is None:
            if value is None:
                return
            raise AttributeError(
                f"{type(obj).__name__} was built without {self.name} (affine=False or "
                "track_running_stats=False); build a new layer to have one"
            )
        if value is None:
            raise TypeError(f"{self.name} cannot be set to None on this {type(obj).__name__}")
        try:
            checked = check_state_dict(
                {self.name: obj.place.host_any(value)},
                [self.name],
                obj.feature_shape,
                obj.dtype,
                nonnegative=("running_var",),
            )[self.name]
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(obj).__name__}.{self.name}: {exc}") from None
        with obj._lock:
            setattr(obj._state, self.name, obj.place.from_host(checked, obj.dtype))


def state_keys(layer: Any) -> list[str]:
    """The keys of ``layer.state_dict()``, in order."""
    keys = ["gamma", "beta"] if layer.affine else []
    if layer.track_running_stats:
        keys += ["running_mean", "running_var", "num_batches_tracked"]
    return keys


def collect(layer: Any) -> StateDict:
    """Copies of the layer's parameters and running statistics (NumPy), with the version."""
    out = StateDict()
    st = layer._state
    for key in state_keys(layer):
        if key == "num_batches_tracked":
            out[key] = int(st.num_batches_tracked)
        else:
            out[key] = layer.place.host(getattr(st, key))
    return out


def checked(layer: Any, state: object, version: int | None) -> dict:
    """What ``load_state_dict`` would store (validated, migrated, in the layer's dtype)."""
    if version is None:
        version = getattr(state, "version", STATE_VERSION)
    if isinstance(state, dict):
        state = migrate({k: layer.place.host_any(v) for k, v in state.items()}, version)
    return check_state_dict(
        state, state_keys(layer), layer.feature_shape, layer.dtype, nonnegative=("running_var",)
    )


def store(layer: Any, new: dict) -> None:
    """Replace the layer's state with checked values (the caller holds the lock)."""
    st = layer._state
    for key, value in new.items():
        if key == "num_batches_tracked":
            st.num_batches_tracked = value
        elif isinstance(getattr(st, key), np.ndarray) and layer.place.xp is None:
            getattr(st, key)[...] = value  # in place: arrays handed out stay the layer's
        else:
            setattr(st, key, layer.place.from_host(value, layer.dtype))
    layer.place.placed = True  # loaded state stays in the layer's library


def check_savable(layer: Any, path: str | os.PathLike) -> dict:
    """The configuration ``save`` records, once it is known to rebuild this layer's class
    (what ``load``, ``layer_from_checkpoint`` and ``batchnorm inspect`` do); ValueError
    naming the reason otherwise, before anything is written."""
    why = layer.unsavable_reason()
    cfg = layer.config()
    if why is None:
        try:
            rebuilt = build(object, cfg)
        except (TypeError, ValueError) as exc:
            why = f"its configuration does not rebuild it ({exc})"
        else:
            if type(rebuilt) is not type(layer):
                why = f"its configuration rebuilds a {type(rebuilt).__name__}"
    if why is not None:
        raise ValueError(
            f"cannot save {path}: a file of this {type(layer).__name__} could not be read "
            f"back: {why}; nothing was written"
        )
    return cfg


def save(layer: Any, path: str | os.PathLike) -> None:
    """``layer.save(path)``: the state and the configuration, written atomically."""
    meta = {
        "batchnorm": check_savable(layer, path),
        "state_version": STATE_VERSION,
        "library_version": library_version,
    }
    checkpoint.save_state(path, layer.state_dict(), meta=meta)


def load(layer: Any, path: str | os.PathLike) -> Any:
    """``layer.load(path)``: state written by a layer of the same class and configuration,
    validated; a file without a configuration (not written by ``save``) is refused."""
    state, meta = checkpoint.load_state(path)
    cfg = meta.get("batchnorm") if isinstance(meta, dict) else None
    if cfg is None:  # every file save writes has one: without it, nothing can be compared
        raise ValueError(
            f"{path} holds no layer configuration (no 'batchnorm' entry in its metadata, "
            "which every file written by save() has), so load cannot check that its eps, "
            "momentum, convention ... are this layer's; nothing changed. To take the arrays "
            "alone, use load_state_dict(batchnorm.checkpoint.load_state(path)[0])"
        )
    # a configuration naming no class, or contradicting its own arrays, is refused first
    cfg = checkpoint.layer_config(meta, path, state)
    if cfg["class"] != config_name(type(layer)):
        raise ValueError(
            f"{path}: the file holds a {cfg['class']!r} layer, not a {type(layer).__name__}; "
            "rebuild it with batchnorm.diagnostics.layer_from_checkpoint"
        )
    check_file_config(layer, cfg, path)
    return layer.load_state_dict(state, version=checkpoint.state_version(meta, path))


#: Fields of a file's configuration that may differ from the loading layer's: how and where
#: it computes (the per-feature state means the same); arrays are stored in the layer's
#: dtype, checked there. ``num_features`` is checked against the arrays' shapes.
MAY_DIFFER = ("backend", "reuse_buffers", "schedule", "dtype", "axis", "num_features")


def check_file_config(layer: Any, cfg: dict, path: str | os.PathLike) -> None:
    """Refuse a file whose configuration is not valid (the constructor's own checks, naming
    the field) or differs from ``layer``'s in a field that decides what the state means or
    how it evolves (eps, momentum, convention, unbiased, affine, ...): ``load`` restores the
    state, never the configuration. Fields the file lacks (an older file) count as the
    constructor's defaults."""
    name = type(layer).__name__
    try:
        mine = build(object, cfg).config()
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: the file's configuration is not a valid {name}'s ({exc}); nothing changed"
        ) from None
    ours = layer.config()
    for key in [k for k in {**mine, **ours} if k not in MAY_DIFFER]:
        if mine.get(key) != ours.get(key):
            raise ValueError(
                f"{path}: the file's {key}={mine.get(key)!r} differs from this {name}'s "
                f"{key}={ours.get(key)!r}; load restores the state, not the configuration "
                "(nothing changed): build the file's layer with "
                "batchnorm.diagnostics.layer_from_checkpoint, or load the arrays alone with "
                "load_state_dict(batchnorm.checkpoint.load_state(path)[0])"
            )
