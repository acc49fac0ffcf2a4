"""The network, the training step and the emulated local BatchRenorm of ``sync-demo``.

The Ioffe MLP of the main demo: (Linear without bias -> norm -> Sigmoid) x 3 -> Linear, SGD.
The norm is :class:`batchnorm.BatchNorm` (synchronized when a communicator is given),
:class:`batchnorm.GhostBatchNorm` (local BN over many ranks, emulated in one process),
:class:`batchnorm.renorm.BatchRenorm` (each rank its own, no communication) or
:class:`LocalRenorm` (local BatchRenorm over many ranks, emulated in one process).

Batch renormalization's schedule (Ioffe 2017 trains with ``rmax = 1, dmax = 0`` for 5k steps,
then relaxes them linearly to ``dmax = 5`` at 25k and ``rmax = 3`` at 40k steps) is kept in
shape and scaled to the length of a run: plain BN for the first 5 % of the steps, ``dmax``
reaches 5 at 25 % and ``rmax`` reaches 3 at 40 % (:func:`renorm_schedule`); the moving
averages use momentum 0.99 (the paper's update rate 0.01).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from batchnorm import BatchNorm, distributed
from batchnorm.module import Module, NoForwardError
from batchnorm.nn import SGD, Linear, Sequential, Sigmoid, softmax_cross_entropy
from batchnorm.renorm import BatchRenorm, RenormSchedule, batch_renorm_eval
from batchnorm.variants import GhostBatchNorm, ghost_slices

__all__ = [
    "NORMS",
    "LocalRenorm",
    "SyncConfig",
    "batches",
    "build_model",
    "renorm_schedule",
    "train_step",
]

#: The norm layers :func:`build_model` can place.
NORMS = ("bn", "ghost", "renorm", "local-renorm")


@dataclass(frozen=True)
class SyncConfig:
    """Settings of the sync demo (defaults: about 2 minutes at R = 2 on 2 busy cores).

    ``renorm_batches`` are the per-rank batches of the local-BatchRenorm arm; the
    ``renorm_*`` fractions place the schedule's milestones at that share of a run's steps.
    """

    global_batch: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.1
    lr: float = 0.5
    bn_momentum: float = 0.9
    equivalence_steps: int = 200
    per_rank_batches: tuple[int, ...] = (2, 4, 8, 15, 30, 60)
    renorm_batches: tuple[int, ...] = (2, 4, 8)
    small_batch_steps: int = 1000
    seeds: int = 3
    cost_steps: int = 60
    renorm_rmax: float = 3.0
    renorm_dmax: float = 5.0
    renorm_warmup: float = 0.05
    renorm_dmax_at: float = 0.25
    renorm_rmax_at: float = 0.40
    renorm_momentum: float = 0.99

    def __post_init__(self):
        if self.global_batch < 2 or self.equivalence_steps < 1 or self.small_batch_steps < 1:
            raise ValueError(f"invalid SyncConfig: {self}")
        for name in ("per_rank_batches", "renorm_batches"):
            value = getattr(self, name)
            if any(not 2 <= b <= self.global_batch for b in value):
                raise ValueError(
                    f"{name} {value} must lie in [2, global batch {self.global_batch}]"
                )
        if not 0 <= self.renorm_warmup <= min(self.renorm_dmax_at, self.renorm_rmax_at) <= 1:
            raise ValueError(
                f"renorm schedule fractions must satisfy 0 <= warmup ({self.renorm_warmup}) <= "
                f"dmax_at ({self.renorm_dmax_at}), rmax_at ({self.renorm_rmax_at}) <= 1"
            )


def renorm_schedule(config: SyncConfig, steps: int) -> RenormSchedule:
    """The renorm schedule of a run of ``steps`` steps (see the module docstring).

    Parameters
    ----------
    config : SyncConfig
    steps : int
        Length of the run.

    Returns
    -------
    RenormSchedule
    """
    return RenormSchedule(
        warmup_steps=round(config.renorm_warmup * steps),
        rmax=config.renorm_rmax,
        rmax_steps=round(config.renorm_rmax_at * steps),
        dmax=config.renorm_dmax,
        dmax_steps=round(config.renorm_dmax_at * steps),
    )


class LocalRenorm(Module):
    """Local BatchRenorm over several ranks, emulated in one process.

    The global batch of ``global_batch`` rows is split into the contiguous per-rank slices
    of :func:`batchnorm.variants.ghost_slices` (``per_rank_batch`` rows each, the last rank
    possibly fewer). Each rank has its own :class:`batchnorm.renorm.BatchRenorm` statistics
    (batch and running mean / std, the same schedule); gamma and beta are shared, and their
    gradient is the sum of the ranks' (what ``allreduce_gradients`` gives). Ranks with equal
    slices are one BatchRenorm on the batch reshaped to (ranks, rows, features) with feature
    axes (0, 2), so one library call serves them all. Evaluation normalizes with the ranks'
    average running mean and running std.

    Parameters
    ----------
    num_features : int
    per_rank_batch, global_batch : int
    schedule : RenormSchedule
    momentum : float
        Weight of the old value in the moving averages.
    """

    forward_state = ("_cache",)

    def __init__(self, num_features, *, per_rank_batch, global_batch, schedule, momentum):
        sizes = [s.stop - s.start for s in ghost_slices(global_batch, per_rank_batch)]
        self.rank_batches = tuple(sizes)
        self.global_batch = global_batch
        self.groups = []  # (first row, ranks, rows per rank)
        start = 0
        for size, run in itertools.groupby(sizes):
            n = len(list(run))
            self.groups.append((start, n, size))
            start += n * size
        self.layers = [
            BatchRenorm((n, num_features), axis=(0, 2), schedule=schedule, momentum=momentum)
            for _, n, _ in self.groups
        ]
        self.gamma, self.beta = np.ones(num_features), np.zeros(num_features)
        self.dgamma = self.dbeta = None
        self._cache = None

    def running(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-rank running mean and running variance, each of shape (ranks, features)."""
        return (
            np.concatenate([m.running_mean for m in self.layers]),
            np.concatenate([m.running_var for m in self.layers]),
        )

    def forward(self, x, *, training=None, update_stats=True):
        """Training: per-rank batch renorm of the global batch ``x`` (global_batch, C);
        evaluation: ``gamma (x - mean) / std + beta`` with the ranks' average statistics."""
        x = np.asarray(x)
        if not self._mode(training):
            mean = np.concatenate([m.running_mean for m in self.layers]).mean(axis=0)
            std = np.concatenate([m.running_std for m in self.layers]).mean(axis=0)
            self._cache = ("eval", x, mean, std)
            return batch_renorm_eval(x, self.gamma, self.beta, mean, std)
        if x.ndim != 2 or x.shape[0] != self.global_batch:
            raise ValueError(
                f"LocalRenorm emulates a global batch of {self.global_batch} rows split as "
                f"{list(self.rank_batches)}; got x of shape {x.shape}"
            )
        outs = []
        for (start, n, b), layer in zip(self.groups, self.layers, strict=True):
            layer.gamma[...] = self.gamma
            layer.beta[...] = self.beta
            xs = x[start : start + n * b].reshape(n, b, x.shape[1])
            y = layer.forward(xs, training=True, update_stats=update_stats)
            outs.append(y.reshape(n * b, x.shape[1]))
        self._cache = ("train",)
        return np.concatenate(outs)

    def backward(self, dy):
        """Input gradient; ``dgamma``, ``dbeta`` summed over the ranks in rank order."""
        cache = self._need_cache(self._cache)
        dy = np.asarray(dy)
        if cache[0] == "eval":
            _, x, mean, std = cache
            if dy.shape != x.shape:
                raise ValueError(f"dy has shape {dy.shape}; the last forward's input {x.shape}")
            self.dgamma = np.sum(dy * (x - mean) / std, axis=0)
            self.dbeta = np.sum(dy, axis=0)
            return dy * (self.gamma / std)
        if dy.shape != (self.global_batch, self.gamma.shape[0]):
            raise ValueError(
                f"dy has shape {dy.shape}; the last forward's output had shape "
                f"{(self.global_batch, self.gamma.shape[0])}"
            )
        dxs, dgs, dbs = [], [], []
        for (start, n, b), layer in zip(self.groups, self.layers, strict=True):
            dxs.append(
                layer.backward(dy[start : start + n * b].reshape(n, b, -1)).reshape(n * b, -1)
            )
            dgs.append(layer.dgamma)
            dbs.append(layer.dbeta)
        dgamma, dbeta = np.concatenate(dgs), np.concatenate(dbs)
        self.dgamma, self.dbeta = dgamma[0].copy(), dbeta[0].copy()
        for r in range(1, len(dgamma)):  # rank order, as allreduce_gradients adds
            self.dgamma += dgamma[r]
            self.dbeta += dbeta[r]
        return np.concatenate(dxs)

    def parameters(self):
        """``gamma`` and ``beta`` (shared by every rank)."""
        return {"gamma": self.gamma, "beta": self.beta}

    def gradients(self):
        """``dgamma`` and ``dbeta`` of the last backward pass."""
        if self.dgamma is None:
            raise NoForwardError("LocalRenorm.gradients() before any backward pass")
        return {"gamma": self.dgamma, "beta": self.dbeta}


def _norm(width: int, config: SyncConfig, norm: str, virtual_batch, comm, steps) -> Module:
    if norm == "ghost":
        return GhostBatchNorm(width, virtual_batch_size=virtual_batch, momentum=config.bn_momentum)
    if norm == "renorm":
        return BatchRenorm(
            width, schedule=renorm_schedule(config, steps), momentum=config.renorm_momentum
        )
    if norm == "local-renorm":
        return LocalRenorm(
            width,
            per_rank_batch=virtual_batch,
            global_batch=config.global_batch,
            schedule=renorm_schedule(config, steps),
            momentum=config.renorm_momentum,
        )
    return BatchNorm(width, momentum=config.bn_momentum, comm=comm)


def build_model(
    n_in: int,
    n_classes: int,
    config: SyncConfig,
    *,
    seed: int,
    norm: str = "bn",
    virtual_batch: int | None = None,
    comm: object = None,
    steps: int | None = None,
) -> Sequential:
    """The Ioffe MLP: (Linear without bias -> norm -> Sigmoid) x 3 -> Linear.

    Parameters
    ----------
    n_in, n_classes : int
    config : SyncConfig
    seed : int
        Initial weights (the same seed gives the same network on every rank).
    norm : {"bn", "ghost", "renorm", "local-renorm"}
        :class:`batchnorm.BatchNorm` (synchronized when ``comm`` is given),
        :class:`batchnorm.GhostBatchNorm` with ``virtual_batch``, this rank's own
        :class:`batchnorm.renorm.BatchRenorm`, or :class:`LocalRenorm` (per-rank batch
        ``virtual_batch`` of the global batch ``config.global_batch``).
    comm : mpi4py communicator, optional
    steps : int, optional
        Length of the run, for the renorm schedule (default ``config.small_batch_steps``).

    Returns
    -------
    Sequential
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    steps = config.small_batch_steps if steps is None else steps
    rng = np.random.default_rng(seed)
    mods, fan_in = [], n_in
    for width in config.hidden:
        mods.append(Linear(fan_in, width, rng=rng, std=config.init_std, bias=False))
        mods.append(_norm(width, config, norm, virtual_batch, comm, steps))
        mods.append(Sigmoid())
        fan_in = width
    mods.append(Linear(fan_in, n_classes, rng=rng, std=config.init_std))
    return Sequential(*mods)


def train_step(model: Sequential, opt: SGD, xg: np.ndarray, yg: np.ndarray, comm) -> float:
    """One data-parallel SGD step on the global batch ``(xg, yg)``; returns the local loss.

    Rank r trains on its contiguous slice; its loss gradient is scaled by ``n_r / N`` (its
    share of the mean loss over the global batch) and the ranks' parameter gradients are
    summed (:func:`batchnorm.distributed.allreduce_gradients`), so every rank takes the step
    one process would take on the whole batch. ``comm=None``: one process.
    """
    xl, yl = (
        (xg, yg) if comm is None else (distributed.shard(xg, comm), distributed.shard(yg, comm))
    )
    logits = model.forward(xl, training=True)
    if len(xl):
        loss, dlogits = softmax_cross_entropy(logits, yl)
        dlogits *= len(xl) / len(xg)
    else:
        loss, dlogits = math.nan, np.zeros_like(logits)
    model.backward(dlogits)
    if comm is not None:
        distributed.allreduce_gradients(model, comm)
    opt.step()
    return loss


def batches(n: int, batch: int, steps: int, seed: int):
    """Index arrays of the global batches (the same on every rank)."""
    rng = np.random.default_rng(seed)
    perm, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = rng.permutation(n), 0
        yield perm[pos : pos + batch]
        pos += batch
