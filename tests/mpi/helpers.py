"""MPI scenario: the data-parallel helpers validate locally, agree, then move data, so a bad
argument on one rank raises on every rank (never a hang, never another call's data).

Run as ``mpiexec -n R python helpers.py OUT``; each rank writes ``OUT/rank<r>.json``: per
case the exception type and message; the last case is a normal call (ranks still in step).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from mpi4py import MPI

import batchnorm as bn
from batchnorm import distributed
from batchnorm.nn import Linear, Sequential

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
bad = rank == size - 1
out = {}


def attempt(name, fn):
    try:
        fn()
        out[name] = {"error": None}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        out[name] = {"error": type(exc).__name__, "message": str(exc)}


model = Sequential(Linear(3, 3, rng=np.random.default_rng(0)), bn.BatchNorm(3))
attempt("metric_none", lambda: distributed.gather_metrics({"loss": None if bad else 1.0}, comm))
attempt("metrics_not_dict", lambda: distributed.gather_metrics(None if bad else {"a": 1.0}, comm))
attempt("metrics_root", lambda: distributed.gather_metrics({"a": 1.0}, comm, root=5))
attempt("weight_negative", lambda: distributed.local_weight(-5 if bad else 3, comm))
attempt("weight_none", lambda: distributed.local_weight(None if bad else 3, comm))
attempt("bcast_root", lambda: distributed.broadcast_parameters(model, comm, root=size + 2))
attempt("bcast_object", lambda: distributed.broadcast_parameters(object() if bad else model, comm))
attempt(
    "recal_method",
    lambda: bn.recalibrate(
        model, [np.ones((4, 3))], method="x" if bad else "population", comm=comm
    ),
)
layer = bn.BatchNorm(3, comm=comm, reuse_buffers=True, timeout=30)
layer.forward(np.random.default_rng(rank).normal(size=(4, 3)))
dy = np.ones((4, 3), np.int64) if bad else np.ones((4, 3))
attempt("reuse_int_dy", lambda: layer.backward(dy))
attempt("in_step", lambda: distributed.gather_metrics({"a": float(rank)}, comm))
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
