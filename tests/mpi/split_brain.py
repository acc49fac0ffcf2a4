"""MPI scenario: ranks that reach different layers, or whose layers were built with
different arguments, are refused on every rank (never merged into a split brain).

Run as ``mpiexec -n R python split_brain.py OUT``; each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from _record import attempt
from mpi4py import MPI

import batchnorm as bn
from batchnorm import distributed
from batchnorm.nn import Sequential

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
x = np.random.default_rng(rank).normal(size=(6, 3))
out = {}


a, b = bn.BatchNorm(3), bn.BatchNorm(3)
distributed.convert_sync(Sequential(a, b), comm, timeout=30)
first, second = (a, b) if rank == 0 else (b, a)
attempt(out, "order", lambda: (first.forward(x + 100), second.forward(x)), a, b)
c = bn.BatchNorm(3, momentum=0.9 if rank == 0 else 0.5, comm=comm, timeout=30)
attempt(out, "momentum", lambda: c.forward(x), c)
d = bn.BatchNorm(3, eps=1e-5 if rank == 0 else 1e-3, comm=comm, timeout=30)
attempt(out, "eps", lambda: d.forward(x), d)
e = bn.BatchNorm(3, comm=comm, timeout=30)
attempt(out, "agreeing", lambda: e.forward(x))
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
