"""The reducer a layer holds: how its batch statistics and gradient sums are combined
across processes (``reducer=``; ``comm=``/``timeout=`` install an MPI reducer)."""

from __future__ import annotations

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
        from .._sync.reducer import MpiReducer

        self._reducer = MpiReducer(value, self._timeout)

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

    def _label(self) -> str:
        return f"{type(self).__name__}{self.feature_shape}"
