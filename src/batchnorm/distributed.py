r"""Synchronized batch norm over MPI, and what data-parallel training needs around it.

With ``comm`` (an :mod:`mpi4py` communicator) the batch statistics of a training forward are
those of the union of every rank's slice of the batch. Each rank computes its local
``(count, mean, var)`` with the usual kernels; the ranks exchange them, and every rank merges
all of them in rank order with the one exact merge of the library
(:meth:`batchnorm.BatchStats.combine`, Chan et al.'s pairwise update of count, mean and M2).
Every rank runs the same float64 operations on the same numbers, so the merged statistics,
the running statistics and ``dgamma``/``dbeta`` are bit-identical on every rank; no result
depends on the order in which an MPI reduction happens to add.

How: a synchronized layer holds an MPI reducer (:class:`batchnorm._sync.reducer.MpiReducer`,
installed by ``comm=`` or :func:`convert_sync`); the layer's one forward template computes
local statistics and hands them to ``reducer.merge``. Every synchronized call follows the
header protocol of :mod:`batchnorm._sync.protocol`: each rank does its local work, the ranks
agree (any failure or disagreement raises the same :class:`DistributedError` on every rank
before any state changes), and only then does the O(C) payload move. A rank that never
arrives is reported on stderr every :data:`STALL_WARNING_SECONDS` (60 s); with ``timeout=T``
the waiting ranks abort the job with that message once the call has taken T seconds (a
deadline for the whole call: headers and payload together). A partner compiling the numba
kernels on its first call counts against it: compile them first (``batchnorm warmup``) or
give the first calls a timeout above the compile time.

Only the uppercase (buffer) methods of mpi4py are used, on NumPy arrays: nothing is pickled.
Only :mod:`batchnorm._sync` imports :mod:`mpi4py`, and only when a communicator is used.

Data-parallel helpers: :func:`shard` (rank r gets its contiguous slice of a global batch),
:func:`broadcast_parameters`, :func:`local_weight` and :func:`allreduce_gradients` (ranks'
gradients add up to the single-process gradient of the mean loss over the global batch),
:func:`gather_metrics`, and :func:`convert_sync` (set ``comm`` on every norm layer).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ._sync import protocol as P
from ._sync.protocol import DistributedError
from ._sync.reducer import LAYER_POSITIONS, MpiReducer
from ._validation import check_count
from .core.reduce import KIND_BCAST, KIND_GRADS, KIND_METRICS, Call, SyncBatchStats, attempt
from .walk import modules, norm_layers

__all__ = [
    "STALL_WARNING_SECONDS",
    "HEADER_BYTES",
    "DistributedError",
    "MpiReducer",
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
#: (and again every time as long after). Assigning it here sets it for every reducer.
STALL_WARNING_SECONDS = P.STALL_WARNING_SECONDS
#: Bytes of the header every synchronized call exchanges with each other rank.
HEADER_BYTES = P.HEADER_WORDS * 8
#: Bytes this process has sent and received through every MPI reducer (headers and
#: payloads), and the number of synchronized calls; each reducer also counts its own.
traffic = P.TOTAL_TRAFFIC


def _reducer(comm: object, timeout: float | None = None) -> MpiReducer:
    """A reducer for one helper call over ``comm`` (refused clearly when not a usable
    communicator, before any exchange)."""
    if comm is None:
        raise TypeError("comm must be an mpi4py communicator; got None")
    return MpiReducer(comm, timeout)


def _partial_gradients(model) -> list[tuple[str, np.ndarray | None]]:
    """Gradients that are per-rank partial sums (a synchronized norm layer's are global)."""
    out = []
    for i, m in enumerate(modules(model)):
        if getattr(m, "gradients_reduced", False):  # already sums over every rank
            continue
        out.extend((f"{i}.{k}", g) for k, g in m.gradients().items())
    return out


def convert_sync(model: object, comm: object, *, timeout: float | None = None) -> object:
    """Set ``comm`` (and ``timeout``) on every norm layer of ``model`` that uses batch statistics.

    The layers get a block of fresh positions of the process (``sync_position``) in model
    order: ranks running the same program name them alike, and no other layer of the
    process (numbered by ``comm=``, ``reducer=`` or another ``convert_sync``) shares a name
    with them.

    Parameters
    ----------
    model : NormLayer or container with ``.modules`` (e.g. :class:`batchnorm.nn.Sequential`)
    comm : mpi4py communicator or None
        None makes the layers local again (they keep their positions).
    timeout : float, optional
        Seconds after which a rank waiting for missing ranks aborts the job.

    Returns
    -------
    model
    """
    layers = norm_layers(model)
    reducer = None if comm is None else MpiReducer(comm, timeout)  # checks comm and timeout
    bad = [layer for layer in layers if reducer is not None and not layer.synchronizable]
    if bad:
        raise ValueError(
            f"convert_sync: {type(bad[0]).__name__} cannot synchronize its statistics; "
            "nothing was changed"
        )
    # a block of fresh positions of the process, in model order: the same on every rank
    # running the same program, and never a position another layer of the process holds
    # (numbering a model 0..k collided with layers numbered by comm= or reducer=)
    first = None if reducer is None else LAYER_POSITIONS.reserve(len(layers))
    for i, layer in enumerate(layers):  # one reducer per model: calls numbered together
        if first is not None:  # made local, a layer keeps its position
            layer.sync_position = first + i
        layer.reducer = reducer
        layer.timeout = None if reducer is None else reducer.timeout
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
    layers = norm_layers(model)
    saved = [layer.reducer for layer in layers]
    for layer in layers:
        layer.reducer = None
    try:
        yield model
    finally:
        for layer, r in zip(layers, saved, strict=True):
            layer.reducer = r


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
    n = check_count(n, "n", minimum=0)
    size = check_count(size, "size", minimum=1)
    rank = check_count(rank, "rank", minimum=0)
    if rank >= size:
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
    red = _reducer(comm)  # a clear error for anything that is not a communicator
    lo, hi = shard_bounds(len(x), red.size, red.rank)
    return x[lo:hi]


def local_weight(local_count: int, comm: object, *, timeout: float | None = None) -> float:
    """``n_r / N``: this rank's share of the global batch (one small exchange).

    Multiply the gradient of the *local* mean loss by it before the backward pass; then the
    ranks' gradients are the terms of the gradient of the mean loss over the global batch,
    which :func:`allreduce_gradients` adds up.

    Parameters
    ----------
    local_count : int
        Samples in this rank's slice (an integer >= 0; checked on every rank together).
    comm : mpi4py communicator
    timeout : float, optional
        Seconds after which a rank waiting for missing ranks aborts the job.

    Returns
    -------
    float
    """
    red = _reducer(comm, timeout)
    count, error = attempt(red, check_count, local_count, "local_count", minimum=0)
    table = red.agree(Call("local_weight", KIND_METRICS), error, count=count or 0)
    total = sum(int(n) for n in table[:, P.COL_COUNT])  # Python ints: no int64 overflow
    if total == 0:
        raise DistributedError("local_weight: no rank holds any sample (raised on every rank)")
    return count / total


def _check_root(root: object, size: int) -> int:
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
        raise TypeError(f"root must be an integer rank; got {root!r}")
    if not 0 <= int(root) < size:
        raise ValueError(f"root={root!r} is not a rank of this communicator (size {size})")
    return int(root)


def allreduce_gradients(model: object, comm: object, *, timeout: float | None = None) -> None:
    """Sum every rank's partial parameter gradients, in rank order, in place on every rank.

    Each rank must have run its backward pass from its share of the global mean loss (the
    gradient of its local mean loss times :func:`local_weight`); then the sums are the
    single-process gradients of the mean loss over the global batch, bit-identical on every
    rank. Gradients of synchronized norm layers are already global sums and are left alone.

    Parameters
    ----------
    model : module or container with ``.modules``
    comm : mpi4py communicator
    timeout : float, optional
        Seconds after which a rank waiting for missing ranks aborts the job.
    """
    red = _reducer(comm, timeout)
    grads, error = attempt(red, _all_gradients, model)
    grads = grads or []
    sums = red.sum(Call("allreduce_gradients", KIND_GRADS), [g for _, g in grads], error)
    for (_, g), total in zip(grads, sums, strict=True):
        g[...] = total


def broadcast_parameters(
    model: object, comm: object, root: int = 0, *, timeout: float | None = None
) -> None:
    """Copy rank ``root``'s parameters (and norm layers' running statistics) to every rank.

    Every rank checks its model and ``root`` first; any problem raises on every rank before
    data moves.

    Parameters
    ----------
    model : module or container with ``.modules``
    comm : mpi4py communicator
    root : int
    timeout : float, optional
        Seconds after which a rank waiting for missing ranks aborts the job.
    """
    red = _reducer(comm, timeout)
    call = Call("broadcast_parameters", KIND_BCAST)
    (root, arrays, fields), error = _or_empty(
        attempt(red, _broadcast_arrays, model, root, red.size), (root, [], {})
    )
    flat = (
        np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])
        if arrays
        else (np.zeros(0))
    )
    with P.exchange():  # one call: no other thread's exchange in between, one deadline
        table = red.agree(call, error, **fields)
        red.bcast(call, flat, root, int(table[0, P.COL_SEQ]))
    pos = 0
    for a in arrays:
        a[...] = flat[pos : pos + a.size].reshape(a.shape)
        pos += a.size


def gather_metrics(
    metrics: dict[str, float], comm: object, root: int = 0, *, timeout: float | None = None
) -> list[dict[str, float]] | None:
    """Every rank's metrics on rank ``root`` (a list in rank order); None on the other ranks.

    Every rank checks its metrics (a dict of str to real numbers, the same keys everywhere)
    and ``root`` first; any problem raises on every rank before data moves.

    Parameters
    ----------
    metrics : dict of str to float
        The same keys on every rank.
    comm : mpi4py communicator
    root : int
    timeout : float, optional
        Seconds after which a rank waiting for missing ranks aborts the job.

    Returns
    -------
    list of dict or None
        On ``root``: one dict per rank, in rank order; elsewhere None.
    """
    red = _reducer(comm, timeout)
    (root, keys, vals, fields), error = _or_empty(
        attempt(red, _metric_row, metrics, root, red.size), (root, [], None, {})
    )
    _, recv = red.gather(Call("gather_metrics", KIND_METRICS), vals, error, **fields)
    if red.rank != root:
        return None
    return [dict(zip(keys, map(float, row), strict=True)) for row in recv]


def check_real_or_nonfinite(value: object, name: str) -> float:
    """A metric value: a real number (NaN and inf allowed: a diverged run reports them)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        if not (isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "fi"):
            raise TypeError(f"metric {name!r} must be a real number; got {value!r}")
    return float(value)


class _Facade(types.ModuleType):
    """Assigning ``STALL_WARNING_SECONDS`` on this module sets the protocol's."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "STALL_WARNING_SECONDS":  # checked: NaN never warned, -1 at every poll
            value = MpiReducer.check_seconds(value, name)
            P.STALL_WARNING_SECONDS = value
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Facade


def _or_empty(result: tuple, empty: tuple) -> tuple:
    """``attempt``'s ``(value, error)`` with a failed participant's value replaced by
    ``empty``, so it still takes part in the exchange that raises the error everywhere."""
    value, error = result
    return (value if value is not None else empty), error


def _all_gradients(model) -> list:
    """``[(name, gradient)]`` of every layer; refuses a layer without its gradients."""
    grads = _partial_gradients(model)
    missing = [k for k, g in grads if g is None]
    if missing:
        raise ValueError(f"no gradient for {missing[:4]}: run backward() first")
    return grads


def _broadcast_arrays(model, root: object, size: int) -> tuple:
    """``(root, arrays, fields)``: the NumPy arrays :func:`broadcast_parameters` moves and the
    fields every rank must agree on."""
    root = _check_root(root, size)
    arrays: list = []
    for m in modules(model):
        if not callable(getattr(m, "parameters", None)):
            raise TypeError(f"{type(m).__name__} has no parameters() to broadcast")
        arrays += list(m.parameters().values())
    for layer in norm_layers(model):
        if layer.track_running_stats:
            arrays += [getattr(layer, k) for k in layer.running_stat_names]
    bad = [type(a).__name__ for a in arrays if not isinstance(a, np.ndarray)]
    if bad:
        raise TypeError(f"broadcast_parameters moves NumPy arrays; got {bad[:3]}")
    names = repr([(a.shape, a.dtype.str) for a in arrays])
    fields = {"nfeat": int(sum(a.size for a in arrays)), "fhash": P.text_hash(names), "extra": root}
    return root, arrays, fields


def _metric_row(metrics: object, root: object, size: int) -> tuple:
    """``(root, keys, values, fields)`` of one rank's metrics for :func:`gather_metrics`."""
    root = _check_root(root, size)
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of str to float; got {type(metrics).__name__}")
    if not all(isinstance(k, str) for k in metrics):
        raise TypeError(f"metrics keys must be strings; got {sorted(map(repr, metrics))[:4]}")
    keys = sorted(metrics)
    vals = np.array([check_real_or_nonfinite(metrics[k], k) for k in keys], np.float64)
    return root, keys, vals, {"nfeat": len(keys), "fhash": P.text_hash(repr(keys)), "extra": root}
