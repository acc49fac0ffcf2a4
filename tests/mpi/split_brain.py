"""MPI scenario: ranks that reach different layers, or whose layers were built with
different arguments, are refused on every rank (never merged into a split brain).

Run as ``mpiexec -n R python split_brain.py OUT``; each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from mpi4py import MPI

import batchnorm as bn
from batchnorm import distributed
from batchnorm.nn import Sequential

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
x = np.random.default_rng(rank).normal(size=(6, 3))
out = {}


def attempt(name, fn, layers):
    before = [layer.state_dict() for layer in layers]
    try:
        fn()
        out[name] = {"error": None}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        out[name] = {"error": type(exc).__name__, "message": str(exc)}
    after = [layer.state_dict() for layer in layers]
    out[name]["unchanged"] = all(
        all(np.array_equal(np.asarray(b[k]), np.asarray(a[k])) for k in b)
        for b, a in zip(before, after, strict=True)
    )


a, b = bn.BatchNorm(3), bn.BatchNorm(3)
distributed.convert_sync(Sequential(a, b), comm, timeout=30)
first, second = (a, b) if rank == 0 else (b, a)
attempt("order", lambda: (first.forward(x + 100), second.forward(x)), [a, b])
c = bn.BatchNorm(3, momentum=0.9 if rank == 0 else 0.5, comm=comm, timeout=30)
attempt("momentum", lambda: c.forward(x), [c])
d = bn.BatchNorm(3, eps=1e-5 if rank == 0 else 1e-3, comm=comm, timeout=30)
attempt("eps", lambda: d.forward(x), [d])
e = bn.BatchNorm(3, comm=comm, timeout=30)
attempt("agreeing", lambda: e.forward(x), [])
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
