"""The MPI reducer: statistics and sums over the ranks of an mpi4py communicator.

Each rank computes its local ``(count, mean, var)``; the ranks agree (the header protocol
of :mod:`.protocol`), exchange the O(C) statistics with one ``Allgather``, and every rank
merges all of them in rank order with the one exact merge of the library
(:meth:`batchnorm.BatchStats.combine`). Every rank runs the same float64 operations on the
same numbers, so merged statistics and gradient sums are bit-identical on every rank; no
result depends on the order in which an MPI reduction happens to add.

Statistics of arrays of other namespaces (torch, JAX, ...) are O(C) and are staged through
host memory (NumPy) for the exchange; the merged result is returned in NumPy float64 and
the caller moves it back to its device.
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np

from .._validation import COUNT_LIMIT
from ..core.reduce import Call, SyncBatchStats, collect, resolve
from ..core.stats import BatchStats
from . import protocol as P


class _Positions:
    """The one process-wide namespace of layer positions (``sync_position``), for every
    route that names a layer: drawn (``comm=``, ``reducer=``, an assigned reducer), a block
    drawn in model order (:func:`batchnorm.distributed.convert_sync`), or assigned. A
    position is held by one live layer at a time, so two layers of a process never share
    a name in synchronized calls (ranks reaching different layers could then be merged
    with each other: a split brain). Draws never return a position drawn or assigned
    before; an assigned position moves the next draw past it. Positions are int64
    (``0 .. 2**63 - 1``); a draw past the last one is refused."""

    #: One past the last position (positions are int64, like every count of the library).
    LIMIT = COUNT_LIMIT

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self._holders: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def draw(self, holder: object) -> int:
        """The next position, now held by ``holder``."""
        with self._lock:
            value = self._next
            self._check_left(1)
            self._next += 1
            self._hold(holder, value)
            return value

    def reserve(self, count: int) -> int:
        """The first of ``count`` consecutive positions no draw will return (a block for
        :func:`batchnorm.distributed.convert_sync`, claimed one by one)."""
        with self._lock:
            first = self._next
            self._check_left(count)
            self._next += count
            return first

    def _check_left(self, count: int) -> None:
        """Refuse, with nothing changed, a draw of ``count`` positions past the last one."""
        if self._next + count > self.LIMIT:
            raise ValueError(
                f"no sync position is left for {count} more layer(s): positions are int64 "
                f"(0 to 2**63 - 1) and the next free one is {self._next} (an assigned "
                "sync_position moves every later draw past it); assign smaller positions "
                "(nothing changed)"
            )

    def claim(self, holder: object, value: int, owner: str) -> None:
        """``holder`` holds ``value``; refused, with nothing changed, when another live
        layer holds it."""
        with self._lock:
            other = self._holders.get(value)
            if other is not None and other is not holder:
                raise ValueError(
                    f"sync_position={value}: another {getattr(other, 'owner', 'layer')} of "
                    f"this process holds position {value} (two layers of one name could be "
                    f"merged with each other across ranks); {owner} keeps its position. Use "
                    "an unused position, or batchnorm.distributed.convert_sync to number a "
                    "model's layers"
                )
            self._hold(holder, value)
            self._next = max(self._next, value + 1)

    def _hold(self, holder: object, value: int) -> None:
        old = self._held.get(holder)
        if old is not None and self._holders.get(old) is holder:
            del self._holders[old]
        self._holders[value] = holder
        self._held[holder] = value


#: The process-wide positions of the synchronized layers (see :class:`_Positions`).
LAYER_POSITIONS = _Positions()


def next_layer_tag(holder: object) -> int:
    """The next position among the synchronized layers of this process, held by
    ``holder`` (a layer's synchronization record).

    Ranks run the same program, so they number their layers alike; a rank whose forward
    reaches a different layer than the others is then reported, never merged silently.
    """
    return LAYER_POSITIONS.draw(holder)


def check_comm(comm: object) -> object:
    """``comm`` must be a usable mpi4py intracommunicator (checked without importing it)."""
    if comm is None:
        return None
    if not all(hasattr(comm, a) for a in ("Get_rank", "Get_size", "Iallgather", "Isend")):
        raise TypeError(f"comm must be an mpi4py communicator or None; got {comm!r}")
    try:
        from mpi4py import MPI
    except ImportError:  # a communicator-like object without mpi4py (tests)
        return comm
    if comm == MPI.COMM_NULL:
        raise ValueError(
            "comm is MPI.COMM_NULL (what Split(MPI.UNDEFINED) gives a rank outside every "
            "group): this rank takes part in no communicator; pass None for a local layer"
        )
    return comm


def check_timeout(value: object) -> float | None:
    """A timeout in seconds (> 0, finite) or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"timeout must be a number of seconds or None; got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float's range
        v = math.inf
    if not (v > 0 and np.isfinite(v)):
        raise ValueError(f"timeout must be > 0 seconds or None; got {value!r}")
    return v


def _to_host(a) -> np.ndarray:
    """An O(C) per-feature array as NumPy float64 (explicitly staged off its device)."""
    if isinstance(a, (np.ndarray, np.generic, float, int)):
        return np.asarray(a, np.float64)
    from .._xp import to_numpy

    return np.asarray(to_numpy(a), np.float64)


class MpiReducer:
    """Reduce over the ranks of ``comm`` (see the module docstring).

    Parameters
    ----------
    comm : mpi4py intracommunicator
    timeout : float, optional
        Seconds a synchronized call may take, waiting for missing ranks, before this rank
        aborts the job: one deadline for the whole call (headers and payload), counted
        from the moment this rank entered it (None: warn on stderr every
        :data:`batchnorm.distributed.STALL_WARNING_SECONDS`, never abort).

    Attributes
    ----------
    traffic : dict
        Bytes sent and received and synchronized calls made through this reducer.
    """

    distributed = True

    def __init__(self, comm: object, timeout: float | None = None) -> None:
        comm = check_comm(comm)
        if comm is None:
            raise ValueError("MpiReducer needs a communicator")
        self.comm = comm
        self.timeout = check_timeout(timeout)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.traffic = {"sent": 0, "received": 0, "calls": 0}
        self._seq = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MpiReducer(rank={self.rank}, size={self.size}, timeout={self.timeout})"

    @staticmethod
    def check_seconds(value: object, name: str) -> float:
        """A number of seconds > 0 and finite (``name`` in the error)."""
        if value is None:
            raise TypeError(f"{name} must be a number of seconds > 0; got None")
        try:
            return check_timeout(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(str(exc).replace("timeout", name, 1).replace(" or None", "")) from None

    @property
    def timeout(self) -> float | None:
        """Seconds a waiting rank waits for missing ranks before aborting the job (None:
        never); checked when assigned (a bad value found inside a synchronized call would
        leave this rank's exchange half done)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: object) -> None:
        self._timeout = check_timeout(value)

    def __getstate__(self):
        raise TypeError("an MpiReducer (a live communicator) cannot be copied or pickled")

    # ------------------------------------------------------------------ bookkeeping
    def next_seq(self) -> int:
        """Number the next synchronized call (the ranks compare numbers: out of step)."""
        with self._lock:
            self._seq += 1
            self.traffic["calls"] += 1
            P.TOTAL_TRAFFIC["calls"] += 1
            return self._seq

    def count_traffic(self, sent: int, received: int) -> None:
        """Add to this reducer's and the process-wide traffic counters."""
        for t in (self.traffic, P.TOTAL_TRAFFIC):
            t["sent"] += sent
            t["received"] += received

    # ------------------------------------------------------------------ the protocol
    @staticmethod
    def attempt(fn, /, *args, **kwargs):
        """This rank's local step: ``(value, None)``, or ``(None, error)`` when it failed
        (the next :meth:`agree` / :meth:`merge` / :meth:`sum` raises it on every rank)."""
        return collect(fn, *args, **kwargs)

    def dispatch(self, local, synchronized, call, error, /, *args):
        """``synchronized(self, call, error, *args)``: the pass that merges across ranks
        (``local``, the fused single-process pass, is not for a distributed reducer)."""
        return synchronized(self, resolve(call), error, *args)

    def agree(self, call: Call, error: BaseException | None, **fields: int) -> np.ndarray:
        """Exchange headers; raise :class:`DistributedError` on every rank if any failed or
        the ranks disagree. Returns the header table (one row per rank)."""
        with P.exchange():
            return P.agree(self, resolve(call), error, **fields)

    def _exchange(self, call: Call, error, send: np.ndarray, **fields: int) -> tuple:
        """``(table, recv)``: agree, then every rank's ``send``, as one exchange of this
        process (threads take turns: their exchanges must not interleave)."""
        with P.exchange():
            table = P.agree(self, call, error, **fields)
            return table, P.allgather(self, send, call, int(table[0, P.COL_SEQ]))

    def merge(
        self, call: Call, local: BatchStats | None, error: BaseException | None, dtype: object
    ) -> SyncBatchStats:
        """Agree, gather every rank's (mean, var), merge in rank order.

        ``local`` is None when this rank failed (``error``); ``dtype`` is the input dtype
        (the ranks must agree on it). A merge in which no rank holds a value gives NaN
        statistics with count 0.
        """
        call = resolve(call)
        (send, fshape, fields), error = _payload(error, _merge_payload, local, dtype)
        table, recv = self._exchange(call, error, send, **fields)
        c = int(table[0, P.COL_NFEAT])
        counts = tuple(int(n) for n in table[:, P.COL_COUNT])
        parts = [
            BatchStats(n, recv[r, :c].reshape(fshape), recv[r, c:].reshape(fshape))
            for r, n in enumerate(counts)
        ]
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is data here
            whole = BatchStats.combine(parts)
        mean, var = whole.mean, whole.var
        if whole.count == 0:  # no rank holds a value: the statistics of nothing are undefined
            mean, var = np.full(fshape, np.nan), np.full(fshape, np.nan)
        bad = tuple(int(r) for r in np.flatnonzero(table[:, P.COL_FINITE] == 0))
        return SyncBatchStats(whole.count, mean, var, counts, bad)

    def sum(self, call: Call, arrays: list, error: BaseException | None = None) -> list:
        """Agree, then per-feature float64 sums over ranks, added in rank order."""
        call = resolve(call)
        (flat, shapes, fields), error = _payload(error, _sum_payload, arrays)
        table, recv = self._exchange(call, error, flat, **fields)
        total = recv[0].copy()
        for r in range(1, recv.shape[0]):
            total += recv[r]
        out, pos = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            out.append(total[pos : pos + size].reshape(shape))
            pos += size
        return out

    def gather(
        self, call: Call, vector: object, error: BaseException | None = None, **fields: int
    ) -> tuple[list[int], list]:
        """Agree (with ``fields``, e.g. ``count``), then every rank's float64 ``vector``
        (the same length on every rank: put the length in ``nfeat``)."""
        call = resolve(call)
        (vector, _, fields), error = _payload(error, _gather_payload, vector, fields)
        table, recv = self._exchange(call, error, vector, **fields)
        return [int(n) for n in table[:, P.COL_COUNT]], list(recv)

    def bcast(self, call: Call, flat: np.ndarray, root: int, seq: int) -> None:
        """Broadcast ``flat`` (float64, same size everywhere) from ``root``, in place."""
        if self.size > 1:
            req = self.comm.Ibcast(flat, root=root)
            P.poll(self, {-1: req}, call, seq, know_ranks=False)
            if self.rank == root:
                self.count_traffic(flat.nbytes, 0)
            else:
                self.count_traffic(0, flat.nbytes)


def _payload(error, build, *args) -> tuple:
    """``(build(*args), error)``: what this rank sends and the header fields it declares;
    nothing (and the error that stopped it) when it failed, so that it still takes part in
    the agreement that raises the error on every rank."""
    if error is None:
        try:
            return build(*args), None
        except Exception as exc:  # noqa: BLE001 - every error must reach every rank
            error = exc
    return (np.zeros(0), (), {}), error


def _merge_payload(local: BatchStats, dtype: object) -> tuple:
    mean, var = _to_host(local.mean), _to_host(local.var)
    finite = bool(np.all(np.isfinite(mean)) and np.all(np.isfinite(var)))
    fields = {
        "count": int(local.count),
        "nfeat": int(mean.size),
        "fhash": P.text_hash(repr(tuple(mean.shape))),
        "dtype": P.dtype_code(dtype),
        "finite": int(finite),
    }
    return np.concatenate([np.ravel(mean), np.ravel(var)]), mean.shape, fields


def _sum_payload(arrays: list) -> tuple:
    host = [_to_host(a) for a in arrays]
    flat = np.concatenate([np.ravel(a) for a in host]) if host else np.zeros(0)
    shapes = [a.shape for a in host]
    return flat, shapes, {"nfeat": int(flat.size), "fhash": P.text_hash(repr(shapes))}


def _gather_payload(vector: object, fields: dict) -> tuple:
    vector = np.ascontiguousarray(vector, np.float64)
    return vector, vector.shape, {"nfeat": int(vector.size), **fields}
