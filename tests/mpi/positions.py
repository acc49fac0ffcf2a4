"""MPI scenario: a layer numbered by ``comm=`` and a model numbered by ``convert_sync`` in
the same process get different names, so ranks that reach different ones are refused on
every rank (``convert_sync`` once numbered a model 0..k, the positions ``comm=`` had drawn
first: the two layers were merged with each other across ranks, a split brain).

Run as ``mpiexec -n R python positions.py OUT``; each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from mpi4py import MPI

import batchnorm as bn
from batchnorm.distributed import convert_sync
from batchnorm.nn import Sequential

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
x = np.random.default_rng(rank).normal(size=(6, 3))
out: dict = {}

alone = bn.BatchNorm(3, comm=comm, timeout=30)  # the first position the process draws
model = Sequential(bn.BatchNorm(3), bn.BatchNorm(3))
convert_sync(model, comm, timeout=30)
first = model.modules[0]
out["positions"] = [alone.sync_position] + [m.sync_position for m in model.modules]
# the control: every rank in the same layer merges
alone.forward(x)
first.forward(x)
out["control_counts"] = [alone.last_batch_stats.count, first.last_batch_stats.count]
before = [np.array(alone.running_mean), np.array(first.running_mean)]
# rank 0 reaches the lone layer, the other ranks the model's first layer
try:
    (alone if rank == 0 else first).forward(x + 100.0 * rank)
    out["crossed"] = {"error": None}
except Exception as exc:  # noqa: BLE001 - recorded for the test
    out["crossed"] = {"error": type(exc).__name__, "message": str(exc)}
after = [np.array(alone.running_mean), np.array(first.running_mean)]
out["unchanged"] = all(np.array_equal(b, a) for b, a in zip(before, after, strict=True))
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as fh:
    json.dump(out, fh)
