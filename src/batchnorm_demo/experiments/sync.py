"""``batchnorm sync-demo``: synchronized batch norm over MPI on the Ioffe MLP.

Three parts, on the network of the main demo (3 x 100 sigmoid units with BN, 10-way softmax,
small Gaussian initial weights, SGD at lr 0.5) and the same default data:

* **equivalence.** (a) SyncBN data-parallel over the R ranks of the job against one process
  that trains the same initial network on the same global batches: the maximum parameter
  difference after every step. (b) Local (unsynchronized) BN over R ranks against
  :class:`batchnorm.GhostBatchNorm` in one process with virtual batch = the per-rank batch:
  the same computation, so the parameters agree step for step too, and the ghost layer's
  running statistics are the average of the ranks' running statistics. (c) Local
  :class:`batchnorm.renorm.BatchRenorm` over R ranks (each rank its own running statistics,
  no communication) against its one-process emulation
  :class:`~batchnorm_demo.experiments.sync_model.LocalRenorm`: parameters step for step, and
  every rank's running statistics.
* **small batches** (:mod:`.sync_small`). Test accuracy against the per-rank batch size (2,
  4, 8, 15, 30, 60) at a fixed global batch of 60, local BN against SyncBN, and local
  BatchRenorm at 2, 4 and 8 per rank, over the same seeds. Justified by (b) and (c), local
  BN over 60/b ranks is emulated by ghost batch norm with virtual batch b in one process,
  local renorm by ``LocalRenorm``, and SyncBN over any split is plain BN on the global batch
  (a); the runs are shared out over the ranks of the job.
* **cost.** Time per training step and bytes communicated per step and rank, local BN against
  SyncBN, measured in this job (the gradient sum that both need is counted separately).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace

import numpy as np

from batchnorm import distributed
from batchnorm.nn import SGD

from ..data import Dataset
from .sync_model import LocalRenorm, SyncConfig, batches, build_model, train_step
from .sync_small import assignment, small_batches

__all__ = ["ARMS", "SyncConfig", "build_model", "run", "total_work", "train_step", "world"]

#: The arms of the equivalence part: SyncBN vs one process, local BN vs GhostBatchNorm,
#: local BatchRenorm vs its one-process emulation.
ARMS = ("sync", "local", "renorm")


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


def _rank_running(model, r: int) -> np.ndarray:
    """Rank ``r``'s running statistics in an emulated local-renorm model (as :func:`_running`
    orders them on that rank)."""
    parts = [m.running() for m in model.modules if isinstance(m, LocalRenorm)]
    return np.concatenate([np.concatenate([mean[r], var[r]]) for mean, var in parts])


def _reference(arm: str, config: SyncConfig, data: Dataset, batch: int, size: int):
    """The one-process model that arm ``arm`` over ``size`` ranks should equal."""
    n_in, k, steps = data.n_features, data.n_classes, config.equivalence_steps
    if arm == "sync":
        return build_model(n_in, k, config, seed=1)
    if arm == "local":
        return build_model(n_in, k, config, seed=1, norm="ghost", virtual_batch=batch // size)
    cfg = replace(config, global_batch=batch)
    return build_model(
        n_in, k, cfg, seed=1, norm="local-renorm", virtual_batch=batch // size, steps=steps
    )


def _distributed(arm: str, config: SyncConfig, data: Dataset, comm):
    """This rank's model of arm ``arm``: SyncBN, local BN or this rank's own BatchRenorm."""
    norm, c = {"sync": ("bn", comm), "local": ("bn", None), "renorm": ("renorm", None)}[arm]
    steps = config.equivalence_steps
    return build_model(
        data.n_features, data.n_classes, config, seed=1, norm=norm, comm=c, steps=steps
    )


def _equivalence_arm(arm: str, config: SyncConfig, data: Dataset, comm, batch: int, tick):
    size, rank = comm.Get_size(), comm.Get_rank()
    dist = _distributed(arm, config, data, comm)
    distributed.broadcast_parameters(dist, comm)
    if rank == 0:
        ref = _reference(arm, config, data, batch, size)
        opt_ref = SGD(ref, config.lr)
    opt, diffs = SGD(dist, config.lr), []
    for idx in batches(len(data.x_train), batch, config.equivalence_steps, seed=2):
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
    run_all = distributed.gather_metrics({f"r{i}": v for i, v in enumerate(_running(dist))}, comm)
    if rank != 0:
        return None
    result = {
        "max_param_diff_per_step": diffs,
        "final_max_param_diff": diffs[-1],
        "max_param_diff_between_ranks": max(s["d"] for s in spread),
    }
    runs = np.array([[r[f"r{i}"] for i in range(len(r))] for r in run_all])
    if arm == "sync":  # every rank holds the single-process running statistics
        result["max_running_diff"] = float(np.max(np.abs(runs - _running(ref))))
    elif arm == "local":  # ghost's running statistics are the average of the ranks' (linear EMA)
        result["max_running_diff_mean_over_ranks"] = float(
            np.max(np.abs(runs.mean(axis=0) - _running(ref)))
        )
    else:  # the emulation keeps every rank's running statistics
        result["max_running_diff_per_rank"] = float(
            max(np.max(np.abs(runs[r] - _rank_running(ref, r))) for r in range(size))
        )
    if arm != "sync":
        result["max_running_spread_between_ranks"] = float(
            np.max(runs.max(axis=0) - runs.min(axis=0))
        )
    return result


def _equivalence(config: SyncConfig, data: Dataset, comm, tick) -> dict:
    size = comm.Get_size()
    batch = size * max(1, config.global_batch // size)  # the ranks split it evenly
    out: dict = {
        "global_batch": batch,
        "per_rank_batch": batch // size,
        "steps": config.equivalence_steps,
    }
    for arm in ARMS:
        result = _equivalence_arm(arm, config, data, comm, batch, tick)
        if result is not None:
            out[arm] = result
    return out


class _Holder:
    """A parameter vector posing as a module (for broadcast_parameters)."""

    def __init__(self, v):
        self.v = v

    def parameters(self):
        return {"v": self.v}


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
        for idx in batches(len(data.x_train), batch, config.cost_steps, seed=4):
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


def world():
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
    mine = assignment(config, size).count(0)
    return (
        len(ARMS) * config.equivalence_steps
        + mine * config.small_batch_steps
        + 2 * config.cost_steps
    )


def run(
    config: SyncConfig,
    data: Dataset,
    *,
    comm=None,
    progress: Callable[[int, int], None] | None = None,
) -> dict | None:
    """Run the three parts on every rank of ``comm``; the results dict on rank 0, else None."""
    comm = comm if comm is not None else world()
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
    small = small_batches(config, data, comm, tick)
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
