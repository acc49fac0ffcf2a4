r"""Recalibration of population statistics ("precise BN", Wu & Johnson 2021).

The running averages a layer keeps during training are an exponential average over batches
computed with *changing* weights, so they can lag behind the final network. Recalibration
freezes the weights, runs batches through the network in training mode without updating
anything, collects every BN layer's batch statistics, and then sets the running statistics
to a population estimate.

Two estimates, both streaming over data of any length:

* ``"population"`` (default): the per-batch statistics are merged as (count, mean, M2)
  triples with Chan et al.'s parallel formula, giving the mean and the (biased) variance of
  all values seen, exactly as if they had been one batch; with equal batch sizes the mean is
  the equal-weight mean of batch means.
* ``"ioffe"``: Ioffe & Szegedy (2015) Algorithm 2, ``E[mu_B]`` and
  ``m/(m-1) * E[sigma^2_B]`` (equal weight per batch, batch size m).

Nothing is changed unless every batch ran and every estimate is finite; the report says
how far the previous running estimates were from the recalibrated ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np

from ._compose import reducer_of
from ._validation import check_count
from .core.reduce import KIND_RECAL, Call, attempt
from .core.stats import merge
from .layers import NormLayer
from .walk import modules, norm_layers

__all__ = ["Moments", "find_batchnorms", "recalibrate"]


@dataclass
class Moments:
    """Mergeable per-feature statistics: count, mean and M2 (sum of squared deviations).

    ``Moments.from_batch(count, mean, var)`` wraps one batch's (biased) statistics;
    ``a.merge(b)`` combines two sets exactly (Chan, Golub & LeVeque), so statistics can be
    streamed over batches in any grouping.
    """

    count: float = 0.0
    mean: np.ndarray | float = 0.0
    m2: np.ndarray | float = 0.0
    # Algorithm 2 bookkeeping: equal-weight sums of batch means and variances
    batches: int = 0
    sum_batch_mean: np.ndarray | float = 0.0
    sum_batch_var: np.ndarray | float = 0.0
    batch_sizes: set = field(default_factory=set)

    @classmethod
    def from_batch(cls, count: int, mean: np.ndarray, var: np.ndarray) -> Moments:
        """Wrap one batch's count, mean and biased variance."""
        mean = np.asarray(mean, np.float64)
        var = np.asarray(var, np.float64)
        return cls(float(count), mean.copy(), var * count, 1, mean.copy(), var.copy(), {int(count)})

    def merge(self, other: Moments) -> Moments:
        """The statistics of both sets of values together (neither input is changed)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n, mean, m2 = merge(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        return Moments(
            n,
            mean,
            m2,
            self.batches + other.batches,
            self.sum_batch_mean + other.sum_batch_mean,
            self.sum_batch_var + other.sum_batch_var,
            self.batch_sizes | other.batch_sizes,
        )

    @property
    def var(self) -> np.ndarray:
        """Biased variance of all values merged."""
        return self.m2 / self.count

    def estimate(self, method: str = "population") -> tuple[np.ndarray, np.ndarray]:
        """(mean, var) for the running statistics by the chosen method."""
        if self.count == 0:
            raise ValueError("no batches were seen")
        if method == "population":
            return np.asarray(self.mean), np.asarray(self.var)
        if method == "ioffe":
            m = min(self.batch_sizes)
            if m < 2:
                raise ValueError("Algorithm 2 needs batches with at least 2 values per feature")
            # with unequal batch sizes the smallest m gives the most conservative correction
            return (
                np.asarray(self.sum_batch_mean / self.batches),
                np.asarray(self.sum_batch_var / self.batches * (m / (m - 1))),
            )
        raise ValueError(f"method must be 'population' or 'ioffe'; got {method!r}")


def find_batchnorms(model) -> list[NormLayer]:
    """Every norm layer of ``model`` that normalizes with batch statistics in training
    (see :func:`batchnorm.walk.norm_layers`)."""
    return norm_layers(model)


def _checked_layers(model, method: object) -> list[NormLayer]:
    """The model's norm layers, after checking they can be recalibrated with ``method``."""
    layers = find_batchnorms(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} contains no norm layer that uses batch statistics"
        )
    for layer in layers:
        if not layer.track_running_stats:
            raise ValueError(f"{layer!r} keeps no running statistics to recalibrate")
    if method not in ("population", "ioffe"):
        raise ValueError(f"method must be 'population' or 'ioffe'; got {method!r}")
    return layers


def _collect(layers, batches, run, max_batches) -> tuple[list[Moments], int]:
    """Stream ``batches`` through ``run``; every layer's merged batch moments, and the count."""
    acc = [Moments() for _ in layers]
    n_batches = 0
    with ExitStack() as stack:
        # inside recording() forwards leave each layer's cache and last_batch_stats alone
        records = [stack.enter_context(layer.recording()) for layer in layers]
        for x in batches:
            if max_batches is not None and n_batches >= max_batches:
                break
            run(x)
            for i, rec in enumerate(records):
                if not rec:
                    raise ValueError(
                        f"layer {i} ({type(layers[i]).__name__}) did not run with batch "
                        "statistics during the recalibration forward pass; nothing was changed"
                    )
                for stats in rec:
                    for part in getattr(stats, "parts", ()) or (stats,):
                        acc[i] = acc[i].merge(Moments.from_batch(part.count, part.mean, part.var))
                rec.clear()
            n_batches += 1
    return acc, n_batches


def recalibrate(
    model,
    batches: Iterable[np.ndarray],
    *,
    method: str = "population",
    forward: Callable[[np.ndarray], object] | None = None,
    max_batches: int | None = None,
    comm: object = None,
) -> list[dict]:
    """Set every norm layer's running statistics to a population estimate over ``batches``.

    Works on :class:`batchnorm.BatchNorm`, :class:`batchnorm.GhostBatchNorm` (statistics
    of each virtual batch) and :class:`batchnorm.BatchRenorm` (whose running std is then
    ``sqrt(var + eps)`` of the population). All-or-nothing: when a batch fails or an
    estimate is not finite in a layer's dtype, no layer changes in any way.

    Parameters
    ----------
    model
        A norm layer or a container with ``.modules`` (e.g. ``nn.Sequential``) whose
        ``forward(x, training=True, update_stats=False)`` runs with batch statistics and
        changes no running statistics.
    batches : iterable of ndarray
        Inputs to the model; streamed, any length.
    method : {"population", "ioffe"}
    forward : callable, optional
        Custom ``forward(x)``; by default
        ``model.forward(x, training=True, update_stats=False)``.
    max_batches : int, optional
        Stop after this many batches (per rank, with ``comm``).
    comm : mpi4py communicator, optional
        The data set is sharded across the ranks of ``comm``: each rank streams its own
        ``batches`` (any number, even none; the layers run locally), then the per-layer
        moments are merged across ranks in rank order, so every rank sets the same
        population statistics of the whole data set. An error on any rank raises on every
        rank, and nothing changes.

    Returns
    -------
    list of dict
        Per layer: the number of batches and values used, and how far the previous running
        statistics were from the new ones (max |Δmean| in units of the new std, and the
        max relative change of the variance).
    """
    # with comm, a refusal on any rank is raised on every rank (agreed in _gather)
    red = reducer_of(comm)
    checked, error = attempt(red, _checked_args, model, method, max_batches)
    layers, max_batches = checked if checked is not None else ([], max_batches)
    run = forward or (lambda x: model.forward(x, training=True, update_stats=False))
    mods = [m for m in modules(model) if callable(getattr(m, "save_forward_state", None))]
    saved = [m.save_forward_state() for m in mods]  # the caller's pending backward survives
    try:
        acc, n_batches = _gather(
            layers, batches, run, max_batches, None if comm is None else red, error
        )
    finally:
        for m, rec in zip(mods, saved, strict=True):
            m.restore_forward_state(rec)
    if n_batches == 0:
        raise ValueError("recalibrate() received no batches")
    return _apply(layers, acc, n_batches, method)


def _gather(layers, batches, run, max_batches, reducer, error):
    """Every layer's moments over the batches (merged by ``reducer``, the one over the
    caller's communicator, or None without one)."""
    if reducer is None:
        return _collect(layers, batches, run, max_batches)

    def local():
        if error is not None:
            raise error
        with _unsynchronized(layers):  # this rank's shard, merged below
            return _collect(layers, batches, run, max_batches)

    return merge_moments(reducer, local, [layer.feature_shape for layer in layers])


def _apply(layers, acc, n_batches, method):
    """Check every layer's new statistics, then set them all (all-or-nothing)."""
    new = [a.estimate(method) for a in acc]
    for i, ((mean, var), layer) in enumerate(zip(new, layers, strict=True)):
        with np.errstate(over="ignore", invalid="ignore"):
            cast = (mean.astype(layer.dtype), var.astype(layer.dtype))
        if not all(np.all(np.isfinite(v)) for v in (mean, var, *cast)):
            raise ValueError(
                f"layer {i}: recalibrated statistics are not finite in the layer's dtype "
                f"{layer.dtype} (max |mean| {np.max(np.abs(mean))!r}, max var {np.max(var)!r}); "
                "nothing was changed"
            )
    report = []
    for layer, a, (mean, var) in zip(layers, acc, new, strict=True):
        old_mean = layer.host("running_mean").astype(np.float64)
        old_var = layer.host("running_var").astype(np.float64)
        std = np.sqrt(var + layer.eps)
        report.append(
            {
                "batches": n_batches,
                "values_per_feature": int(a.count),
                "max_mean_shift_in_std": float(np.max(np.abs(old_mean - mean) / std)),
                "max_var_relative_change": float(np.max(np.abs(old_var - var) / (var + layer.eps))),
            }
        )
    states = []
    for layer, (mean, var) in zip(layers, new, strict=True):  # check every layer first...
        state = layer.state_dict()
        state["running_mean"], state["running_var"] = mean, var
        layer.check_state(state)
        states.append(state)
    for layer, state in zip(layers, states, strict=True):  # ...then change them
        layer.load_state_dict(state)
    return report


@contextmanager
def _unsynchronized(layers):
    """The layers' reducers set to local inside the block (restored after)."""
    saved = [layer.reducer for layer in layers]
    for layer in layers:
        layer.reducer = None
    try:
        yield
    finally:
        for layer, r in zip(layers, saved, strict=True):
            layer.reducer = r


def merge_moments(reducer, collect, shapes: list[tuple[int, ...]]):
    """Run a recalibration pass on every participant's shard and merge the per-layer moments.

    ``collect()`` returns ``(moments per layer, batches)`` for this participant's data;
    ``shapes`` are the layers' feature shapes. Returns the merged moments (identical on
    every participant, merged in order) and the total number of batches. An error in
    ``collect`` on any participant raises on every participant.
    """
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    local, error = attempt(reducer, _local_rows, collect, sizes)
    n_batches, vec = local if local is not None else (0, None)
    fhash = zlib.crc32(repr(shapes).encode()) & 0x7FFFFFFF
    counts, recv = reducer.gather(
        Call("recalibrate", KIND_RECAL),
        vec,
        error,
        count=n_batches,
        nfeat=int(sum(sizes)),
        fhash=fhash,
        extra=len(shapes),
    )
    merged, pos = [], 0
    for shape, c in zip(shapes, sizes, strict=True):
        total = Moments()
        for row in recv:
            v = row[pos : pos + 3 + 4 * c]
            if v[0] == 0:
                continue
            part = [v[3 + i * c : 3 + (i + 1) * c].reshape(shape) for i in range(4)]
            total = total.merge(
                Moments(float(v[0]), part[0], part[1], int(v[1]), part[2], part[3], {int(v[2])})
            )
        merged.append(total)
        pos += 3 + 4 * c
    return merged, int(sum(counts))


def _checked_args(model, method: str, max_batches: object) -> tuple:
    """``(layers, max_batches)`` after the checks of :func:`recalibrate`'s arguments."""
    layers = _checked_layers(model, method)
    if max_batches is not None:
        max_batches = check_count(max_batches, "max_batches", minimum=0)
    return layers, max_batches


def _local_rows(collect, sizes: list[int]) -> tuple:
    """``(batches, vector)``: this participant's moments of every layer as one float64 row
    each (count, batches, smallest batch, then mean, m2 and the sums of batch moments)."""
    acc, n_batches = collect()
    rows = []
    for a, c in zip(acc, sizes, strict=True):
        row = np.zeros(3 + 4 * c)
        if a.count:
            row[:3] = a.count, a.batches, min(a.batch_sizes)
            for i, v in enumerate((a.mean, a.m2, a.sum_batch_mean, a.sum_batch_var)):
                row[3 + i * c : 3 + (i + 1) * c] = np.ravel(v)
        rows.append(row)
    return n_batches, np.concatenate(rows)
