"""The header protocol of the MPI reducer: every synchronized call agrees before data moves.

Protocol of one synchronized call (a forward, a backward, a recalibration, a gradient sum):

1. every rank does its local work, catching any error instead of raising it;
2. the ranks exchange a fixed-size int64 header (status, kind of call, call number on the
   reducer, local count, feature count and shape hash, dtype, training/update flags,
   whether the local statistics are finite), point to point so that a waiting rank knows
   which ranks have not arrived;
3. if any rank failed or the ranks disagree (a rank in evaluation mode while others train,
   different feature counts or dtypes, ranks out of step), the error texts are exchanged
   and every rank raises the same :class:`DistributedError` (a ``ValueError``) naming the
   ranks and the problems, before any state changes;
4. otherwise the O(C) payload is exchanged with one ``Allgather`` and merged in rank order.

A rank that never arrives is not a silent hang: every wait polls non-blocking requests, and
after :data:`STALL_WARNING_SECONDS` (60 s) the waiting ranks print on stderr which ranks are
missing and at which call, again every 60 s; with a timeout on the reducer they call
``comm.Abort(1)`` once the call has taken that many seconds (a deadline for the whole call:
headers, error texts and payload together, from the moment this rank entered it), with that
message; on a reducer's first calls the message names the likely cause, a rank still
compiling the numba kernels.

Only the uppercase (buffer) methods of mpi4py are used, on NumPy arrays: nothing is pickled.
The functions take the reducer (:class:`batchnorm._sync.reducer.MpiReducer`), which holds
the communicator, the timeout, the call counter and the traffic counters.
"""

from __future__ import annotations

import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from ..core.reduce import KIND_NAMES, Call


class DistributedError(ValueError):
    """A synchronized call failed; raised with the same message on every rank."""


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
(
    COL_MAGIC_I,
    COL_STATUS,
    COL_KIND,
    COL_SEQ,
    COL_COUNT,
    COL_NFEAT,
    COL_FHASH,
    COL_DTYPE,
    COL_TRAIN,
    COL_UPDATE,
    COL_FINITE,
) = range(11)
COL_LABEL, COL_EXTRA = 11, 12
HEADER_WORDS = 13

_MESSAGE_BYTES = 480

#: Held through each synchronized exchange of this process (header agreement and payload):
#: threads take turns, so the exchanges of one thread never interleave with another's on
#: the same communicator (MPI matches collectives by order); ranks whose threads take
#: turns in different orders are refused on every rank (different layers, out of step).
EXCHANGE_LOCK = threading.RLock()

#: Bytes this process has sent and received through every MPI reducer (headers and
#: payloads), and the number of synchronized calls: a process-wide total for reports; each
#: reducer also counts its own (``MpiReducer.traffic``).
TOTAL_TRAFFIC = {"sent": 0, "received": 0, "calls": 0}


def text_hash(text: str) -> int:
    """A non-negative 31-bit hash of ``text`` (CRC-32), the same in every process."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


#: Header codes of the data dtypes (the bits of the float dtypes; bfloat16, which NumPy
#: lacks, its own code).
DTYPE_CODES = {"float16": 16, "float32": 32, "float64": 64, "bfloat16": 1016}


def dtype_code(dtype: object) -> int:
    """The header word of a data dtype of any library (``torch.bfloat16``, ``float32``,
    ...): never raises, so a rank with an odd dtype still reaches the agreement that
    reports it on every rank."""
    name = str(dtype).rsplit(".", 1)[-1]
    return DTYPE_CODES.get(name) or text_hash(name) or 1


def dtype_name(code: int) -> str:
    """The dtype a header word names (the words of :func:`dtype_code`)."""
    names = {v: k for k, v in DTYPE_CODES.items()}
    return names.get(int(code), f"another dtype (code {int(code)})")


def _ranks(rs) -> str:
    rs = list(rs)
    return f"rank {rs[0]}" if len(rs) == 1 else f"ranks {rs}"


def _stall_message(red, call: Call, seq: int, elapsed: float, missing) -> str:
    who = (
        f"{_ranks(missing)} {'has' if len(missing) == 1 else 'have'} not arrived"
        if missing is not None
        else "the data exchange has not completed"
    )
    return (
        f"batchnorm.distributed: rank {red.rank} of {red.size} has waited "
        f"{elapsed:.1f} s in {call.label} (synchronized call {seq} on this communicator); "
        f"{who}"
    )


class _Clock(threading.local):
    """The clock of the synchronized call this thread is in: when it began and when the
    next stall report is due (None outside a call)."""

    start: float | None = None
    warn_at: float = 0.0


_CLOCK = _Clock()


@contextmanager
def exchange() -> Iterator[None]:
    """One synchronized call of this process (header agreement, error texts, payload):
    holds :data:`EXCHANGE_LOCK` (threads take turns) and starts the call's clock, so a
    reducer's timeout is a deadline for the whole call, not for each wait in it (a call
    once waited up to twice the timeout: the headers, then the payload). Nested calls
    share the outer clock."""
    with EXCHANGE_LOCK:
        outer = _CLOCK.start is not None
        if not outer:
            _CLOCK.start = time.monotonic()
            _CLOCK.warn_at = _CLOCK.start + STALL_WARNING_SECONDS
        try:
            yield
        finally:
            if not outer:
                _CLOCK.start = None


#: A reducer's calls up to this number are its first forward and backward: a partner may
#: still be compiling the numba kernels then (seconds without the disk cache).
FIRST_CALLS = 2


def _abort_message(red, call: Call, seq: int, elapsed: float, missing) -> str:
    msg = _stall_message(red, call, seq, elapsed, missing)
    msg += f"; timeout={red.timeout:g} s reached: aborting the job"
    if seq <= FIRST_CALLS:
        msg += (
            ". This is among the first synchronized calls of this reducer: the likely cause "
            "is a rank still compiling the numba kernels (about 5-20 s per kind of call "
            "without the disk cache). Compile them first (`batchnorm warmup`, or one local "
            "forward and backward of each layer before synchronizing) or use a timeout "
            "above the compile time"
        )
    return msg


def poll(red, pending: dict, call: Call, seq: int, *, know_ranks: bool) -> None:
    """Wait for non-blocking requests; report stalls, abort once the call has taken the
    reducer's timeout (measured from the start of the call: :func:`exchange`)."""
    clock = _CLOCK if _CLOCK.start is not None else _Clock()
    if clock.start is None:  # a wait outside a call: its own clock
        clock.start = time.monotonic()
        clock.warn_at = clock.start + STALL_WARNING_SECONDS
    start, timeout = clock.start, red.timeout
    while True:
        for r in [r for r, req in pending.items() if req.Test()]:
            del pending[r]
        if not pending:
            return
        now = time.monotonic()
        elapsed = now - start
        if timeout is not None and elapsed >= timeout:
            missing = sorted(pending) if know_ranks else None
            print(_abort_message(red, call, seq, elapsed, missing), file=sys.stderr, flush=True)
            time.sleep(0.5)  # let mpiexec forward the message before the job is torn down
            red.comm.Abort(1)
        if now >= clock.warn_at:
            msg = _stall_message(red, call, seq, elapsed, sorted(pending) if know_ranks else None)
            print(f"{msg}; still waiting", file=sys.stderr, flush=True)
            clock.warn_at = now + STALL_WARNING_SECONDS
        # poll for SPIN_SECONDS (a partner running on another core answers within
        # microseconds), then yield the core (the ranks may share cores), then back off: at
        # most 5% of the time waited, at most 5 ms
        if elapsed > SPIN_SECONDS:
            time.sleep(0 if elapsed < 5 * SPIN_SECONDS else min(0.005, elapsed / 20))


def _exchange_headers(red, header: np.ndarray, call: Call, seq: int) -> np.ndarray:
    """Every rank's header, shape (size, HEADER_WORDS): point to point, so stalls name the
    missing ranks."""
    comm, size, rank = red.comm, red.size, red.rank
    table = np.zeros((size, HEADER_WORDS), np.int64)
    table[rank] = header
    if size == 1:
        return table
    recvs = {r: comm.Irecv(table[r], source=r, tag=HEADER_TAG) for r in range(size) if r != rank}
    sends = {r: comm.Isend(header, dest=r, tag=HEADER_TAG) for r in range(size) if r != rank}
    poll(red, recvs, call, seq, know_ranks=True)
    poll(red, sends, call, seq, know_ranks=True)
    red.count_traffic(header.nbytes * (size - 1), header.nbytes * (size - 1))
    return table


def allgather(red, send: np.ndarray, call: Call, seq: int) -> np.ndarray:
    """Every rank's ``send`` (same shape and dtype everywhere), shape (size, *send.shape)."""
    size = red.size
    recv = np.empty((size, *send.shape), send.dtype)
    if size == 1:
        recv[0] = send
        return recv
    req = red.comm.Iallgather(np.ascontiguousarray(send), recv)
    poll(red, {-1: req}, call, seq, know_ranks=False)
    red.count_traffic(send.nbytes, send.nbytes * (size - 1))
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
    if np.any(table[:, COL_MAGIC_I] != _MAGIC):
        bad = np.flatnonzero(table[:, COL_MAGIC_I] != _MAGIC).tolist()
        return [
            f"{_ranks(bad)} sent a message that is not a batchnorm header: the ranks are "
            "out of step"
        ]
    if len(set(table[:, COL_KIND].tolist())) > 1:
        out.append(
            "the ranks are in different calls ("
            + _group(table, COL_KIND, lambda k: KIND_NAMES.get(k, f"call kind {k}"))
            + ")"
        )
    if len(set(table[:, COL_SEQ].tolist())) > 1:
        out.append(
            "the ranks are out of step ("
            + _group(table, COL_SEQ, lambda s: f"synchronized call {s}")
            + ")"
        )
    if len(set(table[:, COL_LABEL].tolist())) > 1:
        out.append("the ranks are in different layers or functions")
    if out:
        return out
    if len(set(table[:, COL_TRAIN].tolist())) > 1:
        out.append(
            "the ranks disagree on the mode ("
            + _group(table, COL_TRAIN, lambda t: "training" if t else "evaluation")
            + ")"
        )
    if len(set(table[:, COL_UPDATE].tolist())) > 1:
        out.append(
            "the ranks disagree on update_stats ("
            + _group(table, COL_UPDATE, lambda u: f"update_stats={bool(u)}")
            + ")"
        )
    if len(set(table[:, COL_NFEAT].tolist())) > 1 or len(set(table[:, COL_FHASH].tolist())) > 1:
        out.append(
            "the ranks have different numbers of features ("
            + _group(table, COL_NFEAT, lambda n: f"{n} features")
            + ")"
        )
    if len(set(table[:, COL_DTYPE].tolist())) > 1:
        out.append("the ranks have different dtypes (" + _group(table, COL_DTYPE, dtype_name) + ")")
    if len(set(table[:, COL_EXTRA].tolist())) > 1:
        out.append(
            "the ranks call with different arguments (e.g. a layer's eps, momentum or "
            "convention differ between ranks)"
        )
    return out


def _fits(v: object) -> bool:
    """Whether a header field fits an int64 word."""
    try:
        return -(1 << 63) <= int(v) < (1 << 63)
    except (TypeError, ValueError, OverflowError):
        return False


def agree(red, call: Call, error: BaseException | None, **fields: int) -> np.ndarray:
    """Steps 2-3 of the protocol: exchange headers, raise on every rank if anything is wrong.

    Returns the header table (size, HEADER_WORDS) when every rank is fine and they agree.
    """
    seq = red.next_seq()
    h = np.zeros(HEADER_WORDS, np.int64)
    h[COL_MAGIC_I], h[COL_STATUS], h[COL_KIND], h[COL_SEQ] = (
        _MAGIC,
        int(error is not None),
        call.kind,
        seq,
    )
    h[COL_EXTRA] = call.args
    h[COL_TRAIN], h[COL_UPDATE], h[COL_LABEL] = (
        int(call.training),
        int(call.update),
        text_hash(call.label.partition(" ")[0]),
    )
    names = {
        "count": COL_COUNT,
        "nfeat": COL_NFEAT,
        "fhash": COL_FHASH,
        "dtype": COL_DTYPE,
        "finite": COL_FINITE,
        "extra": COL_EXTRA,
    }
    bad = [(k, v) for k, v in fields.items() if not _fits(v)]
    if bad and error is None:  # reported on every rank, never raised here alone
        k, v = bad[0]
        error = ValueError(f"{call.label}: {k}={v!r} does not fit in a 64-bit integer")
    if error is not None:
        h[COL_STATUS] = 1
    for k, v in fields.items():
        h[names[k]] = v if _fits(v) else 0
    table = _exchange_headers(red, h, call, seq)
    # the same words on every rank: the full label only when every rank is in the same call
    label = (
        call.label if len(set(table[:, COL_KIND].tolist())) == 1 else (call.label.partition(" ")[0])
    )
    failed = np.flatnonzero(table[:, COL_STATUS] != 0).tolist()
    if failed:
        text = np.zeros(_MESSAGE_BYTES, np.uint8)
        if error is not None:
            raw = _error_text(error).encode("utf-8", "replace")[:_MESSAGE_BYTES]
            text[: len(raw)] = np.frombuffer(raw, np.uint8)
        texts = allgather(red, text, call, seq)
        parts = [
            f"rank {r}: " + bytes(texts[r]).rstrip(b"\0").decode("utf-8", "replace") for r in failed
        ]
        msg = (
            f"{label} failed on {_ranks(failed)} ({_calls(table)}; raised on "
            f"every rank, nothing changed): " + "; ".join(parts)
        )
        raise DistributedError(msg) from error
    problems = _problems(table)
    if problems:
        raise DistributedError(
            f"{label}: {'; '.join(problems)} ({_calls(table)}; raised on every "
            "rank, nothing changed)"
        )
    return table


def _calls(table: np.ndarray) -> str:
    """The call number for messages, the same words on every rank (the ranks' numbers
    when they are out of step)."""
    if len(set(table[:, COL_SEQ].tolist())) == 1:
        return f"synchronized call {int(table[0, COL_SEQ])}"
    return f"synchronized calls {table[:, COL_SEQ].tolist()} on ranks 0 to {len(table) - 1}"
