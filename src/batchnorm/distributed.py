r"""Synchronized batch norm over MPI, and what data-parallel training needs around it.

With ``comm`` (an :mod:`mpi4py` communicator) the batch statistics of a training forward are
those of the union of every rank's slice of the batch. Each rank computes its local
``(count, mean, var)`` with the usual kernels; the ranks exchange them, and every rank merges
all of them in rank order with the one exact merge of the library
(:meth:`batchnorm.BatchStats.combine`, Chan et al.'s pairwise update of count, mean and M2).
Every rank runs the same float64 operations on the same numbers, so the merged statistics,
the running statistics and ``dgamma``/``dbeta`` are bit-identical on every rank; no result
depends on the order in which an MPI reduction happens to add.

Protocol of one synchronized call (a forward, a backward, a recalibration, a gradient sum):

1. every rank does its local work, catching any error instead of raising it;
2. the ranks exchange a fixed-size int64 header (status, kind of call, call number on the
   communicator, local count, feature count and shape hash, dtype, training/update flags,
   whether the local statistics are finite), point to point so that a waiting rank knows
   which ranks have not arrived;
3. if any rank failed or the ranks disagree (a rank in evaluation mode while others train,
   different feature counts or dtypes, ranks out of step), the error texts are exchanged
   and every rank raises the same :class:`DistributedError` (a ``ValueError``) naming the
   ranks and the problems, before any state changes;
4. otherwise the O(C) payload is exchanged with one ``Allgather`` and merged in rank order.

A rank that never arrives is not a silent hang: every wait polls non-blocking requests, and
after :data:`STALL_WARNING_SECONDS` (60 s) the waiting ranks print on stderr which ranks are
missing and at which call, again every 60 s; with ``timeout=T`` on the layer they call
``comm.Abort(1)`` after T seconds with that message.

Only the uppercase (buffer) methods of mpi4py are used, on NumPy arrays: nothing is pickled.
This is the only module that imports :mod:`mpi4py`, and only when a communicator is used.

Data-parallel helpers: :func:`shard` (rank r gets its contiguous slice of a global batch),
:func:`broadcast_parameters`, :func:`local_weight` and :func:`allreduce_gradients` (ranks'
gradients add up to the single-process gradient of the mean loss over the global batch),
:func:`gather_metrics`, and :func:`convert_sync` (set ``comm`` on every norm layer).
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

import numpy as np

from .backends import select
from ._validation import as_input, feature_shape, normalize_axes
from .conventions import BatchStats, NonFiniteStatisticsError

__all__ = [
    "STALL_WARNING_SECONDS",
    "DistributedError",
    "SyncBatchStats",
    "allreduce_gradients",
    "broadcast_parameters",
    "convert_sync",
    "gather_metrics",
    "local_weight",
    "shard",
    "shard_bounds",
    "traffic",
    "unsynchronized",
]

#: Seconds a rank waits for the others before it reports, on stderr, which ranks are missing
#: (and again every time as long after). Tests lower it.
STALL_WARNING_SECONDS = 60.0
#: Seconds a waiting rank polls without giving up its core (MPI progresses non-blocking
#: collectives only while the ranks poll), before it yields and then backs off.
SPIN_SECONDS = 2e-4
#: Message tag of the header messages (the payload goes through collectives).
HEADER_TAG = 31871
_MAGIC = 0x424E5359  # "BNSY": a header of this protocol

# header layout (int64)
_MAGIC_I, _STATUS, _KIND, _SEQ, _COUNT, _NFEAT, _FHASH, _DTYPE, _TRAIN, _UPDATE, _FINITE = range(11)
_LABEL, _EXTRA = 11, 12
_H = 13

KIND_TRAIN, KIND_EVAL, KIND_BACKWARD, KIND_MOMENTS, KIND_RECAL, KIND_GRADS = 1, 2, 3, 4, 5, 6
KIND_METRICS, KIND_BCAST = 7, 8
_KIND_NAMES = {
    KIND_TRAIN: "a training forward (batch statistics)",
    KIND_EVAL: "an evaluation forward (running statistics)",
    KIND_BACKWARD: "a backward pass",
    KIND_MOMENTS: "moments()",
    KIND_RECAL: "recalibrate()",
    KIND_GRADS: "allreduce_gradients()",
    KIND_METRICS: "gather_metrics()",
    KIND_BCAST: "broadcast_parameters()",
}
_MESSAGE_BYTES = 480

#: Bytes this process has sent and received through this module (headers and payloads).
traffic = {"sent": 0, "received": 0, "calls": 0}


class DistributedError(ValueError):
    """A synchronized call failed; raised with the same message on every rank."""


@dataclass(frozen=True, eq=False)
class SyncBatchStats(BatchStats):
    """Merged statistics of a batch split over ranks (``count``, ``mean``, ``var``: global).

    Attributes
    ----------
    counts : tuple of int
        Values per feature on each rank, in rank order.
    nonfinite_ranks : tuple of int
        Ranks whose local statistics were not finite.
    """

    counts: tuple[int, ...] = ()
    nonfinite_ranks: tuple[int, ...] = ()


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise ModuleNotFoundError(
            "a communicator needs mpi4py: pip install 'batchnorm[mpi]'"
        ) from exc
    return MPI


def _check_comm(comm: object) -> object:
    """``comm`` must look like an mpi4py intracommunicator (checked without importing it)."""
    if comm is not None and not all(
        hasattr(comm, a) for a in ("Get_rank", "Get_size", "Iallgather", "Isend")
    ):
        raise TypeError(f"comm must be an mpi4py communicator or None; got {comm!r}")
    return comm


# ----------------------------------------------------------------------------- one call
@dataclass
class _Call:
    """What one synchronized call tells the other ranks, and what it learned."""

    label: str
    kind: int
    training: int = 1
    update: int = 0
    timeout: float | None = None
    exchanged: bool = False
    merged: SyncBatchStats | None = None


_CURRENT: ContextVar[_Call | None] = ContextVar("batchnorm_sync_call", default=None)
_SEQ_BY_COMM: dict[int, int] = {}


def _call(label: str, kind: int) -> _Call:
    """The layer's description of the running call, or a plain one for a functional call."""
    current = _CURRENT.get()
    if current is not None and not current.exchanged:
        return current
    timeout = current.timeout if current is not None else None
    return _Call(label, kind, timeout=timeout)


def _key(comm) -> int:
    try:
        return int(comm.py2f())
    except Exception:  # noqa: BLE001 - any communicator-like object
        return id(comm)


def _next_seq(comm) -> int:
    k = _key(comm)
    _SEQ_BY_COMM[k] = _SEQ_BY_COMM.get(k, 0) + 1
    return _SEQ_BY_COMM[k]


def _hash(text: str) -> int:
    return zlib.crc32(text.encode())


def _ranks(rs) -> str:
    rs = list(rs)
    return f"rank {rs[0]}" if len(rs) == 1 else f"ranks {rs}"


def _stall_message(comm, call: _Call, seq: int, elapsed: float, missing) -> str:
    who = (
        f"{_ranks(missing)} {'has' if len(missing) == 1 else 'have'} not arrived"
        if missing is not None
        else "the data exchange has not completed"
    )
    return (
        f"batchnorm.distributed: rank {comm.Get_rank()} of {comm.Get_size()} has waited "
        f"{elapsed:.1f} s in {call.label} (synchronized call {seq} on this communicator); "
        f"{who}"
    )


def _poll(comm, pending: dict, call: _Call, seq: int, *, know_ranks: bool) -> None:
    """Wait for non-blocking requests; report stalls, abort after the call's timeout."""
    start = time.monotonic()
    warn_at = start + STALL_WARNING_SECONDS
    while True:
        for r in [r for r, req in pending.items() if req.Test()]:
            del pending[r]
        if not pending:
            return
        now = time.monotonic()
        elapsed = now - start
        if call.timeout is not None and elapsed >= call.timeout:
            msg = _stall_message(comm, call, seq, elapsed, sorted(pending) if know_ranks else None)
            print(
                f"{msg}; timeout={call.timeout:g} s reached: aborting the job",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(0.5)  # let mpiexec forward the message before the job is torn down
            comm.Abort(1)
        if now >= warn_at:
            msg = _stall_message(comm, call, seq, elapsed, sorted(pending) if know_ranks else None)
            print(f"{msg}; still waiting", file=sys.stderr, flush=True)
            warn_at = now + STALL_WARNING_SECONDS
        # poll for SPIN_SECONDS (a partner running on another core answers within
        # microseconds), then yield the core (the ranks may share cores), then back off: at
        # most 5% of the time waited, at most 5 ms
        if elapsed > SPIN_SECONDS:
            time.sleep(0 if elapsed < 5 * SPIN_SECONDS else min(0.005, elapsed / 20))


def _exchange_headers(comm, header: np.ndarray, call: _Call, seq: int) -> np.ndarray:
    """Every rank's header, shape (size, _H): point to point, so stalls name the missing ranks."""
    size, rank = comm.Get_size(), comm.Get_rank()
    table = np.zeros((size, _H), np.int64)
    table[rank] = header
    if size == 1:
        return table
    recvs = {r: comm.Irecv(table[r], source=r, tag=HEADER_TAG) for r in range(size) if r != rank}
    sends = {r: comm.Isend(header, dest=r, tag=HEADER_TAG) for r in range(size) if r != rank}
    _poll(comm, recvs, call, seq, know_ranks=True)
    _poll(comm, sends, call, seq, know_ranks=True)
    traffic["sent"] += header.nbytes * (size - 1)
    traffic["received"] += header.nbytes * (size - 1)
    return table


def _allgather(comm, send: np.ndarray, call: _Call, seq: int) -> np.ndarray:
    """Every rank's ``send`` (same shape and dtype everywhere), shape (size, *send.shape)."""
    size = comm.Get_size()
    recv = np.empty((size, *send.shape), send.dtype)
    if size == 1:
        recv[0] = send
        return recv
    req = comm.Iallgather(np.ascontiguousarray(send), recv)
    _poll(comm, {-1: req}, call, seq, know_ranks=False)
    traffic["sent"] += send.nbytes
    traffic["received"] += send.nbytes * (size - 1)
    return recv


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _group(table: np.ndarray, col: int, fmt: Callable[[int], str]) -> str:
    values: dict[int, list[int]] = {}
    for r, v in enumerate(table[:, col]):
        values.setdefault(int(v), []).append(r)
    return "; ".join(f"{_ranks(rs)}: {fmt(v)}" for v, rs in values.items())


def _problems(table: np.ndarray) -> list[str]:
    """Disagreements between the ranks' headers (identical on every rank)."""
    out = []
    if np.any(table[:, _MAGIC_I] != _MAGIC):
        bad = np.flatnonzero(table[:, _MAGIC_I] != _MAGIC).tolist()
        return [
            f"{_ranks(bad)} sent a message that is not a batchnorm header: the ranks are "
            "out of step"
        ]
    if len(set(table[:, _KIND].tolist())) > 1:
        out.append(
            "the ranks are in different calls ("
            + _group(table, _KIND, lambda k: _KIND_NAMES.get(k, f"call kind {k}"))
            + ")"
        )
    if len(set(table[:, _SEQ].tolist())) > 1:
        out.append(
            "the ranks are out of step ("
            + _group(table, _SEQ, lambda s: f"synchronized call {s}")
            + ")"
        )
    if len(set(table[:, _LABEL].tolist())) > 1:
        out.append("the ranks are in different layers or functions")
    if out:
        return out
    if len(set(table[:, _TRAIN].tolist())) > 1:
        out.append(
            "the ranks disagree on the mode ("
            + _group(table, _TRAIN, lambda t: "training" if t else "evaluation")
            + ")"
        )
    if len(set(table[:, _UPDATE].tolist())) > 1:
        out.append(
            "the ranks disagree on update_stats ("
            + _group(table, _UPDATE, lambda u: f"update_stats={bool(u)}")
            + ")"
        )
    if len(set(table[:, _NFEAT].tolist())) > 1 or len(set(table[:, _FHASH].tolist())) > 1:
        out.append(
            "the ranks have different numbers of features ("
            + _group(table, _NFEAT, lambda n: f"{n} features")
            + ")"
        )
    if len(set(table[:, _DTYPE].tolist())) > 1:
        out.append(
            "the ranks have different dtypes (" + _group(table, _DTYPE, lambda d: f"float{d}") + ")"
        )
    return out


def _agree(comm, call: _Call, error: BaseException | None, **fields: int) -> np.ndarray:
    """Steps 2-3 of the protocol: exchange headers, raise on every rank if anything is wrong.

    Returns the header table (size, _H) when every rank is fine and they agree.
    """
    seq = _next_seq(comm)
    traffic["calls"] += 1
    h = np.zeros(_H, np.int64)
    h[_MAGIC_I], h[_STATUS], h[_KIND], h[_SEQ] = _MAGIC, int(error is not None), call.kind, seq
    h[_TRAIN], h[_UPDATE], h[_LABEL] = (
        call.training,
        call.update,
        _hash(call.label.partition(" ")[0]) & 0x7FFFFFFF,
    )
    names = {
        "count": _COUNT,
        "nfeat": _NFEAT,
        "fhash": _FHASH,
        "dtype": _DTYPE,
        "finite": _FINITE,
        "extra": _EXTRA,
    }
    for k, v in fields.items():
        h[names[k]] = v
    table = _exchange_headers(comm, h, call, seq)
    call.exchanged = True
    # the same words on every rank: the full label only when every rank is in the same call
    label = (
        call.label if len(set(table[:, _KIND].tolist())) == 1 else (call.label.partition(" ")[0])
    )
    failed = np.flatnonzero(table[:, _STATUS] != 0).tolist()
    if failed:
        text = np.zeros(_MESSAGE_BYTES, np.uint8)
        if error is not None:
            raw = _error_text(error).encode("utf-8", "replace")[:_MESSAGE_BYTES]
            text[: len(raw)] = np.frombuffer(raw, np.uint8)
        texts = _allgather(comm, text, call, seq)
        parts = [
            f"rank {r}: " + bytes(texts[r]).rstrip(b"\0").decode("utf-8", "replace") for r in failed
        ]
        msg = (
            f"{label} failed on {_ranks(failed)} (synchronized call {seq}; raised on "
            f"every rank, nothing changed): " + "; ".join(parts)
        )
        raise DistributedError(msg) from error
    problems = _problems(table)
    if problems:
        raise DistributedError(
            f"{label}: {'; '.join(problems)} (synchronized call {seq}; raised on every "
            "rank, nothing changed)"
        )
    return table


def agree(comm, label: str, kind: int, fn: Callable[[], object], **fields: int) -> object:
    """Run ``fn()`` on every rank; return its result, or raise on every rank if any failed."""
    call = _call(label, kind)
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - every error must reach every rank
        error = exc
    _agree(comm, call, error, **fields)
    return result


# ----------------------------------------------------------------------------- statistics
def _local_stats(be, xw: np.ndarray, axes: tuple[int, ...]) -> BatchStats:
    """This rank's (count, mean, var) with the usual kernels; an empty slice has count 0."""
    fshape = feature_shape(xw.shape, axes)
    c = int(np.prod(fshape, dtype=np.int64))
    if c == 0:
        raise ValueError(f"x with shape {xw.shape} has no features along axes {axes}")
    count = xw.size // c
    if count == 0:
        return BatchStats(0, np.zeros(fshape), np.zeros(fshape))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean, var = be.moments(xw, axes)
    return BatchStats(count, mean, var)


def _merge(
    comm, call: _Call, local: BatchStats | None, dtype: np.dtype | None, error: BaseException | None
) -> SyncBatchStats:
    """Steps 2-4 for batch statistics: agree, gather every rank's (mean, var), merge in order."""
    fields = {}
    if local is not None:
        fshape = np.shape(local.mean)
        finite = bool(np.all(np.isfinite(local.mean)) and np.all(np.isfinite(local.var)))
        fields = {
            "count": local.count,
            "nfeat": int(np.prod(fshape, dtype=np.int64)),
            "fhash": _hash(repr(tuple(fshape))) & 0x7FFFFFFF,
            "dtype": 8 * dtype.itemsize,
            "finite": int(finite),
        }
    table = _agree(comm, call, error, **fields)
    c = int(table[0, _NFEAT])
    send = np.empty(2 * c)
    send[:c] = np.ravel(local.mean)
    send[c:] = np.ravel(local.var)
    recv = _allgather(comm, send, call, int(table[0, _SEQ]))
    counts = tuple(int(n) for n in table[:, _COUNT])
    parts = [
        BatchStats(n, recv[r, :c].reshape(fshape), recv[r, c:].reshape(fshape))
        for r, n in enumerate(counts)
    ]
    whole = BatchStats.combine(parts)
    mean, var = whole.mean, whole.var
    if whole.count == 0:  # no rank holds a value: the statistics of nothing are undefined
        mean, var = np.full(fshape, np.nan), np.full(fshape, np.nan)
    bad = tuple(int(r) for r in np.flatnonzero(table[:, _FINITE] == 0))
    merged = SyncBatchStats(whole.count, mean, var, counts, bad)
    call.merged = merged
    return merged


def synchronized_batch(
    comm, label: str, prepare: Callable, finish: Callable, kind: int = KIND_TRAIN
):
    """Local statistics, a merge across ranks, then ``finish`` with the global statistics.

    ``prepare()`` validates the inputs and returns ``(state, be, xw, axes, dtype)``;
    ``finish(state, be, xw, axes, stats)`` computes the result from the merged
    :class:`SyncBatchStats`. An error in ``prepare`` (or in the local statistics) on any rank
    raises :class:`DistributedError` on every rank.
    """
    call = _call(label, kind)
    state = be = xw = axes = local = dtype = error = None
    try:
        state, be, xw, axes, dtype = prepare()
        local = _local_stats(be, xw, axes)
    except Exception as exc:  # noqa: BLE001 - every error must reach every rank
        error = exc
    merged = _merge(comm, call, local, dtype, error)
    return finish(state, be, xw, axes, merged)


def moments(x, *, axis, backend: str, comm) -> tuple[np.ndarray, np.ndarray]:
    """:func:`batchnorm.moments` over the union of every rank's ``x`` (see there)."""

    def prepare():
        xa = as_input(x)
        axes = normalize_axes(axis, xa.ndim)
        be = select(backend, xa.size, axes)
        return None, be, be.work(xa), axes, xa.dtype

    return synchronized_batch(
        comm, "moments", prepare, lambda s, be, xw, axes, st: (st.mean, st.var), KIND_MOMENTS
    )


def batch_norm_train(x, gamma, beta, *, axis, eps, backend: str, comm, out=None):
    """:func:`batchnorm.batch_norm_train` with statistics over every rank's ``x``."""
    from . import functional as F

    def prepare():
        xa, axes, _, g, b, e = F._prepare(x, gamma, beta, axis, eps)
        o = F.check_out(out, xa, "out", xa, gamma, beta)
        be = select(backend, xa.size, axes, xa.shape)
        return (xa, g, b, e, o), be, be.work(xa), axes, xa.dtype

    def finish(state, be, xw, axes, st):
        xa, g, b, e, o = state
        y, cache = F._normalize_batch(be, xa, xw, axes, st.mean, st.var, g, b, e, o)
        return y, replace(cache, count=st.count, comm=comm)

    return synchronized_batch(comm, "batch_norm_train", prepare, finish)


def check_backward(comm, check: Callable[[], np.ndarray]) -> np.ndarray:
    """Run the backward's input checks on every rank; raise on every rank if any failed."""
    return agree(comm, "batch_norm_backward", KIND_BACKWARD, check)


def sum_over_ranks(comm, *arrays: np.ndarray) -> list[np.ndarray]:
    """Sums over ranks of per-feature float64 arrays, added in rank order (identical everywhere).

    Called after :func:`check_backward` (the header of the call) by the backward pass.
    """
    call = _call("batch_norm_backward", KIND_BACKWARD)
    seq = _SEQ_BY_COMM.get(_key(comm), 0)
    flat = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)
    recv = _allgather(comm, flat, call, seq)
    total = recv[0].copy()
    for r in range(1, recv.shape[0]):
        total += recv[r]
    out, pos = [], 0
    for a in arrays:
        out.append(total[pos : pos + a.size].reshape(np.shape(a)))
        pos += a.size
    return out


# ----------------------------------------------------------------------------- layers
def _layer_label(layer) -> str:
    return f"{type(layer).__name__}{layer.feature_shape}"


def layer_forward(layer, x, training: bool, update_stats: bool) -> np.ndarray:
    """:meth:`batchnorm.NormLayer.forward` of a layer with ``comm``: checked and merged together.

    Every rank validates its input and computes its local statistics; errors are exchanged
    before anything is merged, the global count must be >= 2 (0 with ``nonfinite="skip"``
    skips the update), and only then does any rank commit.
    """
    comm = layer.comm
    batch = layer.uses_batch_stats and (training or not layer.track_running_stats)
    update = bool(batch and training and update_stats and layer.track_running_stats)
    kind = KIND_TRAIN if batch else KIND_EVAL
    what = "training forward" if batch else "evaluation forward"
    call = _Call(
        f"{_layer_label(layer)} {what}",
        kind,
        training=int(training),
        update=int(update),
        timeout=layer.timeout,
    )
    token = _CURRENT.set(call)
    try:
        stats = None
        try:
            xa, axes = layer.check_input(x)
            if batch:
                y, cache, stats = layer._forward_batch(xa, axes)
            else:
                y, cache = layer._forward_running(xa, axes)
            error = None
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error must reach every rank
            if call.exchanged:  # pragma: no cover - finishing after the merge does not fail
                raise
            error = exc
        if not call.exchanged:
            if batch and error is None:
                error = TypeError(f"{type(layer).__name__} does not synchronize its statistics")
            if batch:  # join the training ranks' exchange with the error
                _merge(comm, call, None, None, error)
            else:
                _agree(comm, call, error, nfeat=int(np.prod(layer.feature_shape)))
        if batch:
            merged = call.merged
            stats = BatchStats(merged.count, stats.mean, stats.var) if stats is not None else merged
            if merged.count < 2 and not (merged.count == 0 and layer.nonfinite == "skip"):
                raise DistributedError(
                    f"{call.label}: batch statistics need at least 2 values per feature over "
                    f"all ranks; the ranks hold {list(merged.counts)} (total {merged.count}); "
                    "raised on every rank, nothing changed"
                )
        with layer._lock:
            try:
                new = layer._new_running(stats) if update else None
            except NonFiniteStatisticsError as exc:
                bad = call.merged.nonfinite_ranks
                where = (
                    f"non-finite local statistics on {_ranks(bad)}"
                    if bad
                    else ("the merged statistics overflowed")
                )
                raise NonFiniteStatisticsError(
                    f"{call.label}: {where} (raised on every rank): {exc}"
                ) from None
            layer._commit(cache, stats, new, update)
        return y
    finally:
        _CURRENT.reset(token)


@contextmanager
def layer_call(layer, what: str) -> Iterator[None]:
    """Describe the calls a layer makes inside the block (its label and timeout)."""
    if layer.comm is None:
        yield
        return
    kind = KIND_BACKWARD if what == "backward" else KIND_TRAIN
    token = _CURRENT.set(_Call(f"{_layer_label(layer)} {what}", kind, timeout=layer.timeout))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _norm_layers(model) -> list:
    from .recalibrate import find_batchnorms

    return find_batchnorms(model)


def convert_sync(model: object, comm: object, *, timeout: float | None = None) -> object:
    """Set ``comm`` (and ``timeout``) on every norm layer of ``model`` that uses batch statistics.

    Parameters
    ----------
    model : NormLayer or container with ``.modules`` (e.g. :class:`batchnorm.nn.Sequential`)
    comm : mpi4py communicator or None
        None makes the layers local again.
    timeout : float, optional
        Seconds after which a rank waiting for missing ranks aborts the job.

    Returns
    -------
    model
    """
    layers = _norm_layers(model)
    for layer in layers:
        layer.comm = comm
        layer.timeout = timeout
    return model


@contextmanager
def unsynchronized(model: object) -> Iterator[object]:
    """Make the norm layers of ``model`` local inside the block (e.g. to evaluate on one rank).

    Parameters
    ----------
    model : NormLayer or container with ``.modules``

    Yields
    ------
    model
        With every norm layer's ``comm`` set to None; restored on leaving the block.
    """
    layers = _norm_layers(model)
    saved = [layer.comm for layer in layers]
    for layer in layers:
        layer.comm = None
    try:
        yield model
    finally:
        for layer, c in zip(layers, saved, strict=True):
            layer.comm = c


# ----------------------------------------------------------------------------- recalibration
def merge_moments(comm, collect: Callable[[], tuple[list, int]], shapes: list[tuple[int, ...]]):
    """Run a recalibration pass on every rank's shard and merge the per-layer moments.

    ``collect()`` returns ``(moments per layer, batches)`` for this rank's data; ``shapes``
    are the layers' feature shapes. Returns the merged moments (identical on every rank, in
    rank order) and the total number of batches.
    """
    from .recalibrate import Moments

    call = _call("recalibrate", KIND_RECAL)
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    acc, n_batches, error = [], 0, None
    try:
        acc, n_batches = collect()
    except Exception as exc:  # noqa: BLE001 - every error must reach every rank
        error = exc
    table = _agree(
        comm,
        call,
        error,
        count=n_batches,
        nfeat=int(sum(sizes)),
        fhash=_hash(repr(shapes)) & 0x7FFFFFFF,
        extra=len(shapes),
    )
    rows = []
    for a, c in zip(acc, sizes, strict=True):
        vec = np.zeros(3 + 4 * c)
        if a.count:
            vec[:3] = a.count, a.batches, min(a.batch_sizes)
            for i, v in enumerate((a.mean, a.m2, a.sum_batch_mean, a.sum_batch_var)):
                vec[3 + i * c : 3 + (i + 1) * c] = np.ravel(v)
        rows.append(vec)
    recv = _allgather(comm, np.concatenate(rows), call, int(table[0, _SEQ]))
    merged, pos = [], 0
    for shape, c in zip(shapes, sizes, strict=True):
        total = Moments()
        for r in range(recv.shape[0]):
            v = recv[r, pos : pos + 3 + 4 * c]
            if v[0] == 0:
                continue
            part = [v[3 + i * c : 3 + (i + 1) * c].reshape(shape) for i in range(4)]
            total = total.merge(
                Moments(float(v[0]), part[0], part[1], int(v[1]), part[2], part[3], {int(v[2])})
            )
        merged.append(total)
        pos += 3 + 4 * c
    return merged, int(table[:, _COUNT].sum())


# ----------------------------------------------------------------------------- data parallel
def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` when ``n`` rows are split over ``size`` ranks.

    Contiguous slices in rank order; the first ``n % size`` ranks get one row more.

    Parameters
    ----------
    n : int
        Rows of the global batch.
    size, rank : int
        Number of ranks and this rank (``0 <= rank < size``).

    Returns
    -------
    lo, hi : int
    """
    if size < 1 or not 0 <= rank < size or n < 0:
        raise ValueError(f"cannot split {n} rows over {size} ranks for rank {rank}")
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard(x: np.ndarray, comm: object) -> np.ndarray:
    """This rank's contiguous slice of a global batch along axis 0 (see :func:`shard_bounds`).

    Parameters
    ----------
    x : ndarray, shape (N, ...)
        The global batch (the same on every rank).
    comm : mpi4py communicator

    Returns
    -------
    ndarray, shape (n_r, ...)
        A view; ``n_r`` is ``N // R`` or one more.
    """
    lo, hi = shard_bounds(len(x), comm.Get_size(), comm.Get_rank())
    return x[lo:hi]


def local_weight(local_count: int, comm: object) -> float:
    """``n_r / N``: this rank's share of the global batch (one small exchange).

    Multiply the gradient of the *local* mean loss by it before the backward pass; then the
    ranks' gradients are the terms of the gradient of the mean loss over the global batch,
    which :func:`allreduce_gradients` adds up.

    Parameters
    ----------
    local_count : int
        Samples in this rank's slice.
    comm : mpi4py communicator

    Returns
    -------
    float
    """
    table = _agree(comm, _call("local_weight", KIND_METRICS), None, count=int(local_count))
    total = int(table[:, _COUNT].sum())
    if total == 0:
        raise DistributedError("local_weight: no rank holds any sample")
    return local_count / total


def _modules(model) -> list:
    if hasattr(model, "modules"):
        out = []
        for m in model.modules:
            out.extend(_modules(m))
        return out
    return [model]


def _cache_comm(cache) -> object:
    while cache is not None and not hasattr(cache, "comm"):
        cache = getattr(cache, "bn", None)
    return getattr(cache, "comm", None)


def _partial_gradients(model) -> list[tuple[str, np.ndarray | None]]:
    """Gradients that are per-rank partial sums (a synchronized norm layer's are global)."""
    out = []
    for i, m in enumerate(_modules(model)):
        if getattr(m, "comm", None) is not None and _cache_comm(getattr(m, "_cache", None)):
            continue
        out.extend((f"{i}.{k}", g) for k, g in m.gradients().items())
    return out


def allreduce_gradients(model: object, comm: object) -> None:
    """Sum every rank's partial parameter gradients, in rank order, in place on every rank.

    Each rank must have run its backward pass from its share of the global mean loss (the
    gradient of its local mean loss times :func:`local_weight`); then the sums are the
    single-process gradients of the mean loss over the global batch, bit-identical on every
    rank. Gradients of synchronized norm layers are already global sums and are left alone.

    Parameters
    ----------
    model : module or container with ``.modules``
    comm : mpi4py communicator
    """

    call = _call("allreduce_gradients", KIND_GRADS)
    grads, sizes, error, fields = [], [], None, {}
    try:
        grads = _partial_gradients(model)
        missing = [k for k, g in grads if g is None]
        if missing:
            raise ValueError(f"no gradient for {missing[:4]}: run backward() first")
        sizes = [g.size for _, g in grads]
        layout = repr([(k, g.shape) for k, g in grads])
        fields = {"nfeat": int(sum(sizes)), "fhash": _hash(layout) & 0x7FFFFFFF}
    except Exception as exc:  # noqa: BLE001 - every error must reach every rank
        error = exc
    table = _agree(comm, call, error, **fields)
    flat = (
        np.concatenate([np.ravel(g).astype(np.float64) for _, g in grads])
        if grads
        else (np.zeros(0))
    )
    recv = _allgather(comm, flat, call, int(table[0, _SEQ]))
    total = recv[0].copy()
    for r in range(1, recv.shape[0]):
        total += recv[r]
    pos = 0
    for (_, g), n in zip(grads, sizes, strict=True):
        g[...] = total[pos : pos + n].reshape(g.shape)
        pos += n


def broadcast_parameters(model: object, comm: object, root: int = 0) -> None:
    """Copy rank ``root``'s parameters (and norm layers' running statistics) to every rank.

    Parameters
    ----------
    model : module or container with ``.modules``
    comm : mpi4py communicator
    root : int
    """
    arrays = [p for m in _modules(model) for p in m.parameters().values()]
    for layer in _norm_layers(model):
        if layer.track_running_stats:
            arrays += [getattr(layer, k) for k in layer.running_stat_names]
    names = repr([(a.shape, a.dtype.str) for a in arrays])
    call = _call("broadcast_parameters", KIND_BCAST)
    table = _agree(
        comm, call, None, nfeat=int(sum(a.size for a in arrays)), fhash=_hash(names) & 0x7FFFFFFF
    )
    flat = (
        np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])
        if arrays
        else (np.zeros(0))
    )
    if comm.Get_size() > 1:
        req = comm.Ibcast(flat, root=root)
        _poll(comm, {-1: req}, call, int(table[0, _SEQ]), know_ranks=False)
        traffic["sent" if comm.Get_rank() == root else "received"] += flat.nbytes
    pos = 0
    for a in arrays:
        a[...] = flat[pos : pos + a.size].reshape(a.shape)
        pos += a.size


def gather_metrics(
    metrics: dict[str, float], comm: object, root: int = 0
) -> list[dict[str, float]] | None:
    """Every rank's metrics on rank ``root`` (a list in rank order); None on the other ranks.

    Parameters
    ----------
    metrics : dict of str to float
        The same keys on every rank.
    comm : mpi4py communicator
    root : int

    Returns
    -------
    list of dict or None
        On ``root``: one dict per rank, in rank order; elsewhere None.
    """
    keys = sorted(metrics)
    call = _call("gather_metrics", KIND_METRICS)
    table = _agree(comm, call, None, nfeat=len(keys), fhash=_hash(repr(keys)) & 0x7FFFFFFF)
    vals = np.array([float(metrics[k]) for k in keys], np.float64)
    recv = _allgather(comm, vals, call, int(table[0, _SEQ]))
    if comm.Get_rank() != root:
        return None
    return [dict(zip(keys, map(float, row), strict=True)) for row in recv]
