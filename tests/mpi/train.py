"""MPI scenario: data-parallel training with SyncBN follows one process step for step.

Run as ``mpiexec -n R python train.py OUT STEPS``. A small version of the sync-demo's MLP
(float64) is trained on R ranks with synchronized BN, gradients summed with
:func:`batchnorm.distributed.allreduce_gradients`; every rank writes its final parameters and
running statistics to ``OUT/rank<r>.npz``; the test trains the single-process model on the
same global batches and compares. The global batch (26) does not split evenly over 3 or 4
ranks, so the loss scaling by the ranks' shares is exercised.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

from batchnorm import distributed
from batchnorm.nn import SGD
from batchnorm_demo.experiments.sync import SyncConfig, build_model, train_step

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
out, steps = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(5)
x, y = rng.normal(size=(400, 12)), rng.integers(0, 3, 400)
config = SyncConfig(global_batch=26, hidden=(16, 8), init_std=0.5, lr=0.3, per_rank_batches=(2,))
model = build_model(12, 3, config, seed=rank, comm=comm)  # different on purpose: broadcast
distributed.broadcast_parameters(model, comm)
opt = SGD(model, config.lr, momentum=0.5)
order = np.random.default_rng(6)
for _ in range(steps):
    idx = order.choice(400, 26, replace=False)
    train_step(model, opt, x[idx], y[idx], comm)
metrics = distributed.gather_metrics(
    {"rank": float(rank), "rows": float(len(distributed.shard(np.arange(26), comm)))}, comm
)
np.savez(
    f"{out}/rank{rank}.npz",
    **{k.replace(".", "_"): v for k, v in model.parameters().items()},
    running=np.concatenate(
        [
            np.concatenate([m.running_mean, m.running_var])
            for m in model.modules
            if hasattr(m, "running_mean")
        ]
    ),
    metrics=np.array([[m["rank"], m["rows"]] for m in metrics]) if rank == 0 else 0,
)
