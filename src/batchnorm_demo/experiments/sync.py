"""``batchnorm sync-demo``: synchronized batch norm over MPI on the Ioffe MLP.

Three parts, on the network of the main demo (3 x 100 sigmoid units with BN, 10-way softmax,
small Gaussian initial weights, SGD at lr 0.5) and the same default data:

* **equivalence.** (a) SyncBN data-parallel over the R ranks of the job against one process
  that trains the same initial network on the same global batches: the maximum parameter
  difference after every step. (b) Local (unsynchronized) BN over R ranks against
  :class:`batchnorm.GhostBatchNorm` in one process with virtual batch = the per-rank batch:
  the same computation, so the parameters agree step for step too, and the ghost layer's
  running statistics are the average of the ranks' running statistics.
* **small batches.** Test accuracy against the per-rank batch size (2, 4, 8, 15, 30, 60) at a
  fixed global batch of 60, local BN against SyncBN, over several seeds. Justified by (b),
  local BN over 60/b ranks is emulated by ghost batch norm with virtual batch b in one
  process, and SyncBN over any split is plain BN on the global batch (a); the runs are shared
  out over the ranks of the job.
* **cost.** Time per training step and bytes communicated per step and rank, local BN against
  SyncBN, measured in this job (the gradient sum that both need is counted separately).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from batchnorm import BatchNorm, distributed
from batchnorm.nn import SGD, Linear, Sequential, Sigmoid, accuracy, softmax_cross_entropy
from batchnorm.variants import GhostBatchNorm

from ..data import Dataset

__all__ = ["SyncConfig", "build_model", "run", "train_step"]


@dataclass(frozen=True)
class SyncConfig:
    """Settings of the sync demo; the defaults take about 2 minutes at R = 2 on 2 busy cores."""

    global_batch: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.1
    lr: float = 0.5
    bn_momentum: float = 0.9
    equivalence_steps: int = 200
    per_rank_batches: tuple[int, ...] = (2, 4, 8, 15, 30, 60)
    small_batch_steps: int = 1000
    seeds: int = 3
    cost_steps: int = 60

    def __post_init__(self):
        if self.global_batch < 2 or self.equivalence_steps < 1 or self.small_batch_steps < 1:
            raise ValueError(f"invalid SyncConfig: {self}")
        if any(not 2 <= b <= self.global_batch for b in self.per_rank_batches):
            raise ValueError(
                f"per_rank_batches {self.per_rank_batches} must lie in [2, global batch "
                f"{self.global_batch}]"
            )


def build_model(
    n_in: int,
    n_classes: int,
    config: SyncConfig,
    *,
    seed: int,
    norm: str = "bn",
    virtual_batch: int | None = None,
    comm: object = None,
) -> Sequential:
    """The Ioffe MLP: (Linear without bias -> norm -> Sigmoid) x 3 -> Linear.

    Parameters
    ----------
    n_in, n_classes : int
    config : SyncConfig
    seed : int
        Initial weights (the same seed gives the same network on every rank).
    norm : {"bn", "ghost"}
        :class:`batchnorm.BatchNorm` (synchronized when ``comm`` is given) or
        :class:`batchnorm.GhostBatchNorm` with ``virtual_batch``.
    comm : mpi4py communicator, optional
    """
    rng = np.random.default_rng(seed)
    mods, fan_in = [], n_in
    for width in config.hidden:
        mods.append(Linear(fan_in, width, rng=rng, std=config.init_std, bias=False))
        if norm == "ghost":
            mods.append(
                GhostBatchNorm(width, virtual_batch_size=virtual_batch, momentum=config.bn_momentum)
            )
        else:
            mods.append(BatchNorm(width, momentum=config.bn_momentum, comm=comm))
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


def _batches(n: int, batch: int, steps: int, seed: int):
    """Index arrays of the global batches (the same on every rank)."""
    rng = np.random.default_rng(seed)
    perm, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = rng.permutation(n), 0
        yield perm[pos : pos + batch]
        pos += batch


def _params(model) -> np.ndarray:
    return np.concatenate([np.ravel(p) for p in model.parameters().values()])


def _running(model) -> np.ndarray:
    return np.concatenate(
        [
            np.concatenate([m.running_mean, m.running_var])
            for m in model.modules
            if hasattr(m, "running_mean")
        ]
    )


def _equivalence(config: SyncConfig, data: Dataset, comm, tick) -> dict:
    size, rank = comm.Get_size(), comm.Get_rank()
    n_in, k = data.n_features, data.n_classes
    batch = size * max(1, config.global_batch // size)  # the ranks split it evenly
    out: dict = {
        "global_batch": batch,
        "per_rank_batch": batch // size,
        "steps": config.equivalence_steps,
    }
    for arm in ("sync", "local"):
        dist = build_model(n_in, k, config, seed=1, comm=comm if arm == "sync" else None)
        distributed.broadcast_parameters(dist, comm)
        if rank == 0:
            ref = (
                build_model(n_in, k, config, seed=1)
                if arm == "sync"
                else build_model(n_in, k, config, seed=1, norm="ghost", virtual_batch=batch // size)
            )
            opt_ref = SGD(ref, config.lr)
        opt = SGD(dist, config.lr)
        diffs = []
        for idx in _batches(len(data.x_train), batch, config.equivalence_steps, seed=2):
            xg, yg = data.x_train[idx], data.y_train[idx]
            train_step(dist, opt, xg, yg, comm)
            if rank == 0:
                train_step(ref, opt_ref, xg, yg, None)
                diffs.append(float(np.max(np.abs(_params(dist) - _params(ref)))))
            tick(1)
        # the model is the same on every rank (bit for bit): max over ranks of the difference
        # to rank 0's parameters
        p = _params(dist)
        first = p.copy()
        distributed.broadcast_parameters(_Holder(first), comm)  # rank 0's parameters
        spread = distributed.gather_metrics({"d": float(np.max(np.abs(p - first)))}, comm)
        run_all = distributed.gather_metrics(
            {f"r{i}": v for i, v in enumerate(_running(dist))}, comm
        )
        if rank == 0:
            result = {
                "max_param_diff_per_step": diffs,
                "final_max_param_diff": diffs[-1],
                "max_param_diff_between_ranks": max(s["d"] for s in spread),
            }
            runs = np.array([[r[f"r{i}"] for i in range(len(r))] for r in run_all])
            ref_running = _running(ref)
            if arm == "sync":  # every rank holds the single-process running statistics
                result["max_running_diff"] = float(np.max(np.abs(runs - ref_running)))
            else:  # ghost's running statistics are the average of the ranks' (linear EMA)
                result["max_running_diff_mean_over_ranks"] = float(
                    np.max(np.abs(runs.mean(axis=0) - ref_running))
                )
                result["max_running_spread_between_ranks"] = float(
                    np.max(runs.max(axis=0) - runs.min(axis=0))
                )
            out[arm] = result
    return out


class _Holder:
    """A parameter vector posing as a module (for broadcast_parameters)."""

    def __init__(self, v):
        self.v = v

    def parameters(self):
        return {"v": self.v}


def _small_batch_task(config: SyncConfig, data: Dataset, b: int | None, seed: int, tick) -> dict:
    """One run: plain BN on the global batch (SyncBN, b=None) or ghost BN with batch b."""
    model = build_model(
        data.n_features,
        data.n_classes,
        config,
        seed=100 + seed,
        norm="bn" if b is None else "ghost",
        virtual_batch=b,
    )
    opt = SGD(model, config.lr)
    losses = []
    for i, idx in enumerate(
        _batches(len(data.x_train), config.global_batch, config.small_batch_steps, seed=200 + seed)
    ):
        losses.append(train_step(model, opt, data.x_train[idx], data.y_train[idx], None))
        if (i + 1) % 50 == 0:
            tick(50)
    tick(config.small_batch_steps % 50)
    return {
        "test_accuracy": accuracy(model.forward(data.x_test, training=False), data.y_test),
        "train_loss_last100": float(np.mean(losses[-100:])),
    }


def _small_batches(config: SyncConfig, data: Dataset, comm, tick) -> dict:
    size, rank = comm.Get_size(), comm.Get_rank()
    per = [b for b in config.per_rank_batches if b < config.global_batch]
    tasks = [(None, s) for s in range(config.seeds)] + [
        (b, s) for b in per for s in range(config.seeds)
    ]
    mine = {}
    for i, (b, s) in enumerate(tasks):
        if i % size == rank:
            mine[i] = _small_batch_task(config, data, b, s, tick)
    flat = {f"{i}.{k}": v for i, r in mine.items() for k, v in r.items()}
    # every rank sends the same keys: fill the others' tasks with NaN
    keys = {f"{i}.{k}" for i in range(len(tasks)) for k in ("test_accuracy", "train_loss_last100")}
    gathered = distributed.gather_metrics({k: flat.get(k, math.nan) for k in keys}, comm)
    if rank != 0:
        return {}
    merged = {k: next(g[k] for g in gathered if not math.isnan(g[k])) for k in keys}
    sync = [merged[f"{i}.test_accuracy"] for i, (b, _) in enumerate(tasks) if b is None]
    rows = []
    for b in config.per_rank_batches:
        local = (
            sync
            if b == config.global_batch
            else [merged[f"{i}.test_accuracy"] for i, (bb, _) in enumerate(tasks) if bb == b]
        )
        rows.append(
            {
                "per_rank_batch": b,
                "ranks_emulated": config.global_batch / b,
                "local_bn_test_accuracy": local,
                "sync_bn_test_accuracy": sync,
            }
        )
    return {
        "global_batch": config.global_batch,
        "steps": config.small_batch_steps,
        "seeds": config.seeds,
        "rows": rows,
    }


def _cost(config: SyncConfig, data: Dataset, comm, tick) -> dict:
    size, rank = comm.Get_size(), comm.Get_rank()
    batch = size * max(1, config.global_batch // size)
    out = {"global_batch": batch, "per_rank_batch": batch // size, "steps": config.cost_steps}
    for arm in ("local", "sync"):
        model = build_model(
            data.n_features, data.n_classes, config, seed=3, comm=comm if arm == "sync" else None
        )
        opt = SGD(model, config.lr)
        times, nbytes = [], []
        for idx in _batches(len(data.x_train), batch, config.cost_steps, seed=4):
            before = dict(distributed.traffic)
            comm.Barrier()
            t0 = time.perf_counter()
            train_step(model, opt, data.x_train[idx], data.y_train[idx], comm)
            times.append(time.perf_counter() - t0)
            nbytes.append(
                distributed.traffic["sent"]
                + distributed.traffic["received"]
                - before["sent"]
                - before["received"]
            )
            tick(1)
        stats = distributed.gather_metrics(
            {
                "median_step_s": float(np.median(times)),
                "bytes_per_step": float(np.mean(nbytes)),
                "sent_per_step": 0.0,
            },
            comm,
        )
        if rank == 0:
            out[arm] = {
                "median_step_ms_per_rank": [1e3 * s["median_step_s"] for s in stats],
                "bytes_per_step_per_rank": [s["bytes_per_step"] for s in stats],
            }
    if rank == 0:
        c = sum(config.hidden)
        layers = len(config.hidden)
        header = distributed.HEADER_BYTES
        # per BN layer and step: forward header + 2C doubles, backward header + 2C doubles
        out["model_bn_bytes_per_rank"] = {
            "sent": 2 * layers * header * (size - 1) + 2 * 16 * c,
            "received": 2 * layers * header * (size - 1) + 2 * 16 * c * (size - 1),
        }
        out["bn_features_total"] = c
    return out


def _world():
    """MPI.COMM_WORLD, or a one-rank stand-in when mpi4py is missing."""
    try:
        from mpi4py import MPI
    except ImportError:  # pragma: no cover - the mpi extra installs it
        raise ModuleNotFoundError(
            "batchnorm sync-demo needs mpi4py: pip install 'batchnorm[mpi]'"
        ) from None
    return MPI.COMM_WORLD


def total_work(config: SyncConfig, size: int) -> int:
    """Progress units (training steps) rank 0 goes through."""
    n_tasks = (
        config.seeds * len([b for b in config.per_rank_batches if b < config.global_batch])
        + config.seeds
    )
    mine = len(range(0, n_tasks, size))
    return 2 * config.equivalence_steps + mine * config.small_batch_steps + 2 * config.cost_steps


def run(
    config: SyncConfig,
    data: Dataset,
    *,
    comm=None,
    progress: Callable[[int, int], None] | None = None,
) -> dict | None:
    """Run the three parts on every rank of ``comm``; the results dict on rank 0, else None."""
    comm = comm if comm is not None else _world()
    try:  # one BLAS thread per rank: the ranks already use the cores
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover
        pass
    total, done = total_work(config, comm.Get_size()), 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None and comm.Get_rank() == 0:
            progress(min(done, total), total)

    t0 = time.perf_counter()
    equivalence = _equivalence(config, data, comm, tick)
    small = _small_batches(config, data, comm, tick)
    cost = _cost(config, data, comm, tick)
    wall = time.perf_counter() - t0
    if progress is not None and comm.Get_rank() == 0:
        progress(total, total)
    if comm.Get_rank() != 0:
        return None
    cfg = asdict(config)
    return {
        "config": cfg,
        "dataset": data.summary(),
        "ranks": comm.Get_size(),
        "wall_seconds": wall,
        "equivalence": equivalence,
        "small_batches": small,
        "cost": cost,
    }
