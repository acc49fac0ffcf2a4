"""The reducer a layer holds: how its batch statistics and gradient sums are combined
across processes (``reducer=``; ``comm=``/``timeout=`` install an MPI reducer)."""

from __future__ import annotations

import zlib

from ..core.reduce import LOCAL


class Synchronized:
    """Mixin: the ``reducer``, ``comm`` and ``timeout`` properties."""

    @property
    def reducer(self):
        """The reducer batch statistics and gradient sums go through."""
        return self._reducer

    @reducer.setter
    def reducer(self, value) -> None:
        from ..core.reduce import Reducer

        if value is None:
            value = LOCAL
        if not isinstance(value, Reducer):
            raise TypeError(f"reducer must implement batchnorm.core.reduce.Reducer; got {value!r}")
        if value.distributed and not self.synchronizable:
            raise ValueError(f"{type(self).__name__} cannot synchronize its statistics")
        self._reducer = value

    @property
    def comm(self) -> object:
        """The communicator of the layer's MPI reducer (None: local)."""
        return getattr(self._reducer, "comm", None)

    @comm.setter
    def comm(self, value: object) -> None:
        if value is None:
            if self._reducer.distributed and getattr(self._reducer, "comm", None) is None:
                return  # a non-MPI reducer stays
            self._reducer = LOCAL
            return
        if not self.synchronizable:
            raise ValueError(f"{type(self).__name__} cannot synchronize its statistics (comm=)")
        from .._sync.reducer import MpiReducer, next_layer_tag

        self._reducer = MpiReducer(value, self._timeout)
        self.__dict__["_sync_tag"] = next_layer_tag()

    @property
    def timeout(self) -> float | None:
        """Seconds a synchronized call waits for missing ranks before aborting (None: never)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        from .._sync.reducer import check_timeout

        self._timeout = check_timeout(value)
        if hasattr(self._reducer, "timeout") and self._reducer is not LOCAL:
            self._reducer.timeout = self._timeout

    @property
    def sync_position(self) -> int:
        """The layer's position among the synchronized layers of its process (set by
        ``comm=`` in construction order, or by :func:`batchnorm.distributed.convert_sync` in
        model order); part of the name its synchronized calls compare across ranks."""
        return self._sync_tag

    @sync_position.setter
    def sync_position(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"sync_position must be an integer >= 0; got {value!r}")
        self.__dict__["_sync_tag"] = value

    def _label(self) -> str:
        """The layer's name in synchronized calls: class, features and its position among
        the synchronized layers (ranks calling different layers are then told apart)."""
        return f"{type(self).__name__}{self.feature_shape}#{self._sync_tag}"

    def _args_hash(self) -> int:
        """A hash of the arguments every rank's copy of this layer must share (the maths'
        arguments: not the backend, buffers, or a custom schedule's repr, which names a
        per-process address)."""
        local = ("backend", "reuse_buffers", "schedule")
        text = repr(sorted((k, v) for k, v in self.config().items() if k not in local))
        return zlib.crc32(text.encode()) & 0x7FFFFFFF
