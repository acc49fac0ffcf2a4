"""The reducer a layer holds: how its batch statistics and gradient sums are combined
across processes (``reducer=``; ``comm=``/``timeout=`` install an MPI reducer)."""

from __future__ import annotations

import zlib
from typing import Any

from ..core.reduce import LOCAL, check_reducer

__all__ = ["Sync", "args_hash"]


class Sync:
    """One layer's synchronization settings: the reducer, its timeout, the layer's position.

    Parameters
    ----------
    owner : str
        The layer's class name (for error messages).
    synchronizable : bool
        Whether a distributed reducer may be installed.
    """

    def __init__(self, owner: str, synchronizable: bool) -> None:
        self.owner = owner
        self.synchronizable = synchronizable
        self.reducer: Any = LOCAL
        self.timeout: float | None = None
        self.tag = 0

    def __getstate__(self) -> dict:
        if self.reducer is not LOCAL:
            raise TypeError(
                f"a synchronized {self.owner} (reducer {self.reducer!r}) cannot be copied; copy "
                "it with comm=None and set comm on the copy"
            )
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reducer = LOCAL

    def set_reducer(self, value: object) -> None:
        """Install ``value`` (None: local) after checking it is a usable reducer."""
        if value is None:
            value = LOCAL
        check_reducer(value)
        if value.distributed and not self.synchronizable:
            raise ValueError(f"{self.owner} cannot synchronize its statistics")
        self.reducer = value

    def set_comm(self, value: object) -> None:
        """Install an MPI reducer over ``value`` (None: local; a non-MPI reducer stays)."""
        if value is None:
            if not (self.reducer.distributed and getattr(self.reducer, "comm", None) is None):
                self.reducer = LOCAL
            return
        if not self.synchronizable:
            raise ValueError(f"{self.owner} cannot synchronize its statistics (comm=)")
        from .._sync.reducer import MpiReducer, next_layer_tag

        reducer = MpiReducer(value, self.timeout)
        self.reducer, self.tag = reducer, next_layer_tag()

    def set_timeout(self, value: object) -> None:
        """Seconds a synchronized call waits for missing ranks (None: never)."""
        from .._sync.reducer import check_timeout

        self.timeout = check_timeout(value)
        if hasattr(self.reducer, "timeout") and self.reducer is not LOCAL:
            self.reducer.timeout = self.timeout

    def set_tag(self, value: object) -> None:
        """The layer's position among the synchronized layers of its process."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"sync_position must be an integer >= 0; got {value!r}")
        self.tag = value


def args_hash(config: dict) -> int:
    """A hash of the arguments every rank's copy of a layer must share (the maths'
    arguments: not the backend, buffers, or a custom schedule's repr, which names a
    per-process address)."""
    local = ("backend", "reuse_buffers", "schedule")
    text = repr(sorted((k, v) for k, v in config.items() if k not in local))
    return zlib.crc32(text.encode()) & 0x7FFFFFFF
