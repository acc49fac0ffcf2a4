"""Versioned state of the norm layers: ``state_dict``/``load_state_dict``/``save``/``load``.

A state dict is a plain mapping of the parameter and running-statistic arrays (and
``num_batches_tracked``), returned as a :class:`StateDict`, a ``dict`` that also carries
the format ``version``; checkpoints record it in their metadata. Loading migrates older
versions first (:data:`MIGRATIONS`); a dict without a version (e.g. built by hand or by
another framework's converter) is read as the current format.

The versions and their migrations live in :mod:`batchnorm.checkpoint`
(``STATE_VERSION``, ``MIGRATIONS``).
"""

from __future__ import annotations

import os
import threading

from .. import checkpoint
from .._version import __version__ as _library_version
from ..checkpoint import STATE_VERSION, check_state_dict, migrate


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


class StateMixin:
    """Mixin: the state of a norm layer (see the module docstring)."""

    _lock: threading.Lock

    def state_keys(self) -> list[str]:
        """The keys of :meth:`state_dict`, in order."""
        keys = ["gamma", "beta"] if self.affine else []
        if self.track_running_stats:
            keys += [*self.running_stat_names, "num_batches_tracked"]
        return keys

    def state_dict(self) -> StateDict:
        """Copies of the parameters and running statistics (NumPy arrays), with the format
        version in ``.version``."""
        out = StateDict()
        for key in self.state_keys():
            if key == "num_batches_tracked":
                out[key] = int(self.num_batches_tracked)
            else:
                out[key] = self._host(getattr(self, key))
        return out

    def _check_state(self, new: dict) -> None:
        """Layer-specific checks of a validated state (override to add some)."""

    def check_state(self, state: dict, *, version: int | None = None) -> dict:
        """Validate ``state`` for :meth:`load_state_dict` without changing anything.

        Returns
        -------
        dict
            The values :meth:`load_state_dict` would store (converted to the layer's dtype).
        """
        if version is None:
            version = getattr(state, "version", STATE_VERSION)
        if isinstance(state, dict):
            state = migrate({k: self._host_any(v) for k, v in state.items()}, version)
        new = check_state_dict(
            state, self.state_keys(), self.feature_shape, self.dtype, nonnegative=("running_var",)
        )
        self._check_state(new)
        return new

    def load_state_dict(self, state: dict, *, version: int | None = None):
        """Replace parameters and running statistics; all-or-nothing.

        Checks that the keys are exactly those of :meth:`state_dict`, that arrays have the
        layer's per-feature shape and a floating dtype and are finite (also in the layer's
        dtype), that the running variance is >= 0 and that ``num_batches_tracked`` is a
        non-negative integer. ``version`` (default: ``state.version`` for a
        :class:`StateDict`, else the current one) selects the migration. On any failure the
        layer is unchanged. Arrays are stored into the layer's own namespace and device.
        """
        new = self.check_state(state, version=version)
        self.__dict__["_placed"] = True  # loaded state stays in the layer's library
        with self._lock:
            for key, value in new.items():
                if key == "num_batches_tracked":
                    self.num_batches_tracked = value
                else:
                    self._store(key, value)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the state and configuration atomically: ``.safetensors`` by suffix, else npz.

        The metadata record the class and constructor arguments, the state version and the
        library version.
        """
        meta = {
            "batchnorm": self.config(),
            "state_version": STATE_VERSION,
            "library_version": _library_version,
        }
        checkpoint.save_state(path, self.state_dict(), meta=meta)

    def load(self, path: str | os.PathLike):
        """Load state written by :meth:`save` (any version); validated like
        :meth:`load_state_dict`."""
        state, meta = checkpoint.load_state(path)
        saved = meta.get("batchnorm", {}).get("class") if isinstance(meta, dict) else None
        if isinstance(meta.get("batchnorm") if isinstance(meta, dict) else None, dict) and (
            saved != type(self).__name__
        ):
            raise ValueError(
                f"{path}: the file holds a {saved!r} layer, not a {type(self).__name__}; "
                "rebuild it with batchnorm.diagnostics.layer_from_checkpoint"
            )
        return self.load_state_dict(state, version=checkpoint.state_version(meta, path))
