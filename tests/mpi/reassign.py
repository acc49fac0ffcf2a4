"""MPI scenario: layers that get their reducer by assignment (``layer.reducer = ...``) or
by ``reducer=`` are named like layers built with ``comm=``, so ranks that reach different
layers are refused on every rank (never merged into a split brain), and the ranks stay in
step afterwards.

Run as ``mpiexec -n R python reassign.py OUT``; each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from _record import attempt
from mpi4py import MPI

import batchnorm as bn
from batchnorm.distributed import MpiReducer

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
x = np.random.default_rng(rank).normal(size=(6, 3))
out = {}


def crossed(a, b):
    """Rank 0 calls ``a`` then ``b``, the other ranks ``b`` then ``a``."""
    first, second = (a, b) if rank == 0 else (b, a)
    first.forward(x + 100 * rank)
    second.forward(x)


# layers that ran locally, then got an MPI reducer by assignment
a, b = bn.BatchNorm(3), bn.BatchNorm(3)
a.forward(x)
b.forward(x)
a.reducer = MpiReducer(comm, 30)
b.reducer = MpiReducer(comm, 30)
out["positions_assigned"] = [a.sync_position, b.sync_position]
attempt(out, "assigned", lambda: crossed(a, b), a, b)
# layers built with reducer=
c = bn.BatchNorm(3, reducer=MpiReducer(comm, 30))
d = bn.BatchNorm(3, reducer=MpiReducer(comm, 30))
out["positions_constructed"] = [c.sync_position, d.sync_position]
attempt(out, "constructed", lambda: crossed(c, d), c, d)
# a layer that already ran synchronized gets a new reducer on rank 0 only, then runs
e = bn.BatchNorm(3, reducer=MpiReducer(comm, 30))
e.forward(x)
if rank == 0:
    e.reducer = MpiReducer(comm, 30)
attempt(out, "reassigned_on_one_rank", lambda: e.forward(x), e)
# a layer keeps its position when it gets another reducer: the ranks still number their
# layers alike, and a layer built alike everywhere agrees (the ranks are in step)
out["positions_reassigned"] = e.sync_position
f = bn.BatchNorm(3)
f.reducer = MpiReducer(comm, 30)
out["position_last"] = f.sync_position
attempt(out, "agreeing", lambda: f.forward(x), f)
out["running_mean"] = np.asarray(f.running_mean).tolist()
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as fh:
    json.dump(out, fh)
