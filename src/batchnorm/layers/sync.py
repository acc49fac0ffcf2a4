"""The reducer a layer holds: how its batch statistics and gradient sums are combined
across processes (``reducer=``; ``comm=``/``timeout=`` install an MPI reducer)."""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

import numpy as np

from ..core.reduce import LOCAL, check_reducer

__all__ = ["Sync", "args_hash"]


class Sync:
    """One layer's synchronization settings: the reducer, its timeout, the layer's position.

    The position names the layer in its synchronized calls, so ranks that reach different
    layers are refused instead of merged. A layer is numbered the first time it gets a
    distributed reducer, by any route (``comm=``, ``reducer=``, assigning ``reducer`` or
    ``comm``), with the next position of the process
    (:func:`batchnorm._sync.reducer.next_layer_tag`): ranks running the same program number
    their layers alike. It keeps that number when it gets another reducer later (so taking
    a layer out of synchronization on one rank, e.g. in
    :func:`batchnorm.distributed.unsynchronized`, shifts nobody's numbering), until
    ``sync_position`` is assigned (:func:`batchnorm.distributed.convert_sync` numbers a
    model's layers in model order, with a block of fresh positions). Positions come from
    one process-wide namespace (:data:`batchnorm._sync.reducer.LAYER_POSITIONS`): a
    position is held by one live layer at a time, whichever route gave it, so two layers
    of a process never share a name (an assignment of a held position is refused). A new
    reducer numbers its calls from 1 on every rank, so a rank that installs it at another
    point of the program than the others is refused as out of step. A copy of a layer is
    a new layer: it is numbered when synchronized.

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
        self.numbered = False
        #: The reducer of the last training forward: the backward of a synchronized forward
        #: sums its gradients over the same participants, whatever reducer is installed now
        #: (an ``unsynchronized`` block or ``comm = None`` in between once made it local:
        #: partial sums reported as global, the other ranks left waiting).
        self.forward_reducer: Any = None

    def __getstate__(self) -> dict:
        if self.reducer is not LOCAL:
            raise TypeError(
                f"a synchronized {self.owner} (reducer {self.reducer!r}) cannot be copied; copy "
                "it with comm=None and set comm on the copy"
            )
        return {**self.__dict__, "forward_reducer": None}  # a copy's forward was not its own

    def backward_reducer(self) -> Any:
        """The reducer the backward of a synchronized forward sums through: the forward's.
        A layer without it (a copy made after the forward) refuses: a local sum would be a
        partial one."""
        if self.forward_reducer is None or not self.forward_reducer.distributed:
            raise ValueError(
                f"{self.owner}.backward: the last forward was synchronized, but this layer "
                "does not hold the reducer it merged through (a copy made after the "
                "forward?); run the forward again"
            )
        return self.forward_reducer

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reducer = LOCAL
        self.tag, self.numbered = 0, False  # a new layer: numbered when synchronized

    def set_reducer(self, value: object) -> None:
        """Install ``value`` (None: local) after checking it is a usable reducer."""
        if value is None:
            value = LOCAL
        check_reducer(value)
        if value.distributed and not self.synchronizable:
            raise ValueError(f"{self.owner} cannot synchronize its statistics")
        if value.distributed:
            self._number()
        self.reducer = value

    def set_comm(self, value: object) -> None:
        """Install an MPI reducer over ``value`` (None: local; a non-MPI reducer stays)."""
        if value is None:
            if not (self.reducer.distributed and getattr(self.reducer, "comm", None) is None):
                self.reducer = LOCAL
            return
        if not self.synchronizable:
            raise ValueError(f"{self.owner} cannot synchronize its statistics (comm=)")
        from .._sync.reducer import MpiReducer

        reducer = MpiReducer(value, self.timeout)
        self._number()
        self.reducer = reducer

    def get_timeout(self) -> float | None:
        """The timeout that applies: a distributed reducer's own, else the one a later
        ``comm=`` will use."""
        if self.reducer.distributed:
            return getattr(self.reducer, "timeout", None)
        return self.timeout

    def set_timeout(self, value: object) -> None:
        """Seconds a synchronized call waits for missing ranks (None: never); set on a
        distributed reducer too. Refused, with nothing changed, when the reducer has no
        timeout or does not let it be set (it would be ignored: a missing rank would hang)."""
        from .._sync.reducer import check_timeout

        value = check_timeout(value)
        red = self.reducer
        if red.distributed:
            if not hasattr(red, "timeout"):
                raise TypeError(
                    f"{self.owner}.timeout: the reducer {red!r} has no timeout; set the "
                    "timeout on the reducer itself (nothing changed)"
                )
            old = red.timeout
            try:
                red.timeout = value
            except Exception as exc:  # noqa: BLE001 - any refusal of the reducer's
                raise TypeError(
                    f"{self.owner}.timeout = {value!r}: the reducer {red!r} does not let its "
                    f"timeout be set ({type(exc).__name__}: {exc}); nothing changed"
                ) from exc
            kept = getattr(red, "timeout", None)
            if kept != value:  # a setter that ignored or changed it
                with contextlib.suppress(Exception):
                    red.timeout = old
                raise TypeError(
                    f"{self.owner}.timeout = {value!r}: the reducer {red!r} kept timeout "
                    f"{kept!r}; nothing changed"
                )
        self.timeout = value

    def set_tag(self, value: object) -> None:
        """The layer's position among the synchronized layers of its process; refused,
        with nothing changed, when another live layer of the process holds it."""
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"sync_position must be an integer >= 0; got {value!r}")
        from .._sync.reducer import LAYER_POSITIONS

        if not 0 <= value < LAYER_POSITIONS.LIMIT:  # an int64, like the other counts
            raise ValueError(
                f"sync_position must be an integer from 0 to 2**63 - 1 (an int64); got "
                f"{int(value)}; {self.owner} keeps its position"
            )

        LAYER_POSITIONS.claim(self, int(value), self.owner)
        self.tag, self.numbered = int(value), True

    def _number(self) -> None:
        """Give the layer the next position of the process, unless it has one."""
        if not self.numbered:
            from .._sync.reducer import next_layer_tag

            self.tag, self.numbered = next_layer_tag(self), True


def args_hash(config: dict) -> int:
    """A hash of the arguments every rank's copy of a layer must share (the maths'
    arguments: not the backend, buffers, or a custom schedule's repr, which names a
    per-process address)."""
    local = ("backend", "reuse_buffers", "schedule")
    text = repr(sorted((k, v) for k, v in config.items() if k not in local))
    return zlib.crc32(text.encode()) & 0x7FFFFFFF
