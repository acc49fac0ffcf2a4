"""The small-batch part of ``sync-demo``: test accuracy against the per-rank batch.

At a fixed global batch, three arms over the same seeds (initial weights and global batches):

* **SyncBN**: statistics of the whole global batch, i.e. plain BN on it in one process
  (whatever the split, by the equivalence part);
* **local BN**: each rank's own statistics, emulated by :class:`batchnorm.GhostBatchNorm` with
  the per-rank batch as virtual batch;
* **local BatchRenorm** (Ioffe 2017, designed for small minibatches): each rank its own batch
  and running statistics, no communication (:class:`.sync_model.LocalRenorm`), at the tiny
  per-rank batches ``config.renorm_batches``.

A per-rank batch that does not divide the global batch leaves a last rank with fewer rows:
the rows record the real split (``rank_batches``). The runs are shared out over the ranks of
the job, the expensive ones first (deterministic, the same plan on every rank).

:func:`renorm_verdict` answers "does renorm fix tiny local batches without communication?"
with the demo's noise rule (:func:`.compare.compare_accuracy`: two accuracies differ when
their means are further apart than twice the combined uncertainty).
"""

from __future__ import annotations

import math

import numpy as np

from batchnorm import distributed
from batchnorm.nn import SGD, accuracy
from batchnorm.variants import ghost_slices

from ..data import Dataset
from .compare import compare_accuracy
from .sync_model import SyncConfig, batches, build_model, train_step

__all__ = ["plan", "renorm_verdict", "small_batches"]

_KEYS = ("test_accuracy", "train_loss_last100")


def plan(config: SyncConfig) -> list[tuple[str, int | None, int]]:
    """The runs ``(arm, per-rank batch or None, seed)``, arm in {"sync", "local", "renorm"}."""
    per = [b for b in config.per_rank_batches if b < config.global_batch]
    seeds = range(config.seeds)
    return (
        [("sync", None, s) for s in seeds]
        + [("local", b, s) for b in per for s in seeds]
        + [("renorm", b, s) for b in config.renorm_batches for s in seeds]
    )


def _cost(config: SyncConfig, task) -> float:
    """Rough relative cost per step (GhostBatchNorm pays per virtual batch; the renorm
    emulation serves all ranks in one or two library calls)."""
    arm, b, _ = task
    if arm == "sync":
        return 1.0
    k = len(ghost_slices(config.global_batch, b))
    return 1.0 + 0.19 * k if arm == "local" else 1.7 + 0.01 * k


def assignment(config: SyncConfig, size: int) -> list[int]:
    """The rank of every run of :func:`plan`: longest first to the least loaded rank."""
    tasks = plan(config)
    load, owner = [0.0] * size, [0] * len(tasks)
    for i in sorted(range(len(tasks)), key=lambda i: (-_cost(config, tasks[i]), i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += _cost(config, tasks[i])
    return owner


def _task(config: SyncConfig, data: Dataset, task, tick) -> dict:
    arm, b, seed = task
    norm = {"sync": "bn", "local": "ghost", "renorm": "local-renorm"}[arm]
    model = build_model(
        data.n_features, data.n_classes, config, seed=100 + seed, norm=norm, virtual_batch=b
    )
    opt = SGD(model, config.lr)
    losses = []
    steps = config.small_batch_steps
    for i, idx in enumerate(batches(len(data.x_train), config.global_batch, steps, 200 + seed)):
        losses.append(train_step(model, opt, data.x_train[idx], data.y_train[idx], None))
        if (i + 1) % 50 == 0:
            tick(50)
    tick(steps % 50)
    return {
        "test_accuracy": accuracy(model.forward(data.x_test, training=False), data.y_test),
        "train_loss_last100": float(np.mean(losses[-100:])),
    }


def small_batches(config: SyncConfig, data: Dataset, comm, tick) -> dict:
    """Run the plan over the ranks of ``comm``; the results on rank 0 (``{}`` elsewhere)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    tasks, owner = plan(config), assignment(config, size)
    mine = {i: _task(config, data, t, tick) for i, t in enumerate(tasks) if owner[i] == rank}
    flat = {f"{i}.{k}": v for i, r in mine.items() for k, v in r.items()}
    # every rank sends the same keys: the others' runs as NaN
    keys = [f"{i}.{k}" for i in range(len(tasks)) for k in _KEYS]
    gathered = distributed.gather_metrics({k: flat.get(k, math.nan) for k in keys}, comm)
    if rank != 0:
        return {}
    merged = {k: gathered[owner[int(k.split(".")[0])]][k] for k in keys}

    def acc(arm, b):
        return [merged[f"{i}.test_accuracy"] for i, t in enumerate(tasks) if t[:2] == (arm, b)]

    sync, rows = acc("sync", None), []
    for b in config.per_rank_batches:
        split = [s.stop - s.start for s in ghost_slices(config.global_batch, b)]
        row = {
            "per_rank_batch": b,
            "ranks_emulated": len(split),
            "rank_batches": split,
            "local_bn_test_accuracy": sync if b == config.global_batch else acc("local", b),
            "sync_bn_test_accuracy": sync,
        }
        if b in config.renorm_batches:
            row["renorm_test_accuracy"] = acc("renorm", b)
        rows.append(row)
    n_test = len(data.y_test)
    return {
        "global_batch": config.global_batch,
        "steps": config.small_batch_steps,
        "seeds": config.seeds,
        "n_test": n_test,
        "rows": rows,
        "renorm_verdict": renorm_verdict(rows, n_test),
    }


def _row_outcome(row: dict, n_test: int) -> dict:
    local, sync, ren = (
        row["local_bn_test_accuracy"],
        row["sync_bn_test_accuracy"],
        row["renorm_test_accuracy"],
    )
    damage = compare_accuracy(local, sync, n_test)  # local BN against SyncBN
    gain = compare_accuracy(ren, local, n_test)  # renorm against local BN
    gap = compare_accuracy(ren, sync, n_test)  # renorm against SyncBN
    if damage["outcome"] != "lower":
        status = "nothing to fix"
    elif gap["outcome"] == "lower":
        status = "partly fixed" if gain["outcome"] == "higher" else "not fixed"
    elif gain["outcome"] == "higher":
        status = "fixed"
    else:
        status = "inconclusive"
    return {
        "per_rank_batch": row["per_rank_batch"],
        "status": status,
        "local_vs_sync": damage,
        "renorm_vs_local": gain,
        "renorm_vs_sync": gap,
    }


def renorm_verdict(rows: list[dict], n_test: int) -> dict:
    """Does local BatchRenorm fix the tiny per-rank batches where local BN is hurt?

    Per batch (rows with ``renorm_test_accuracy``): "nothing to fix" when local BN is not
    below SyncBN beyond the noise; "fixed" when renorm is above local BN beyond the noise
    and not below SyncBN beyond it; "partly fixed" / "not fixed" when renorm stays below
    SyncBN beyond the noise (above local BN beyond it, or not); else "inconclusive".
    Overall: "supported" when every hurt batch is fixed, "not supported" when some hurt
    batch is (partly or) not fixed, "inconclusive" otherwise (also when no batch is hurt).

    Parameters
    ----------
    rows : list of dict
        The ``small_batches`` rows (accuracies per seed).
    n_test : int
        Test-set size.

    Returns
    -------
    dict
        ``verdict`` and ``per_batch`` (status and the three comparisons of each batch).
    """
    per = [_row_outcome(r, n_test) for r in rows if "renorm_test_accuracy" in r]
    hurt = [p for p in per if p["status"] != "nothing to fix"]
    if hurt and all(p["status"] == "fixed" for p in hurt):
        verdict = "supported"
    elif any(p["status"] in ("partly fixed", "not fixed") for p in hurt):
        verdict = "not supported"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, "per_batch": per}
