"""MPI scenario: odd dtypes and huge values across ranks are refused (or accepted) on
every rank alike, never by one rank alone while the others wait.

Run as ``mpiexec -n R python odd_inputs.py OUT``; each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from _record import attempt
from mpi4py import MPI

import batchnorm as bn

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
x = np.random.default_rng(rank).normal(size=(6, 3))
out = {}


a = bn.BatchNorm(3, comm=comm, timeout=30)
attempt(out, "dtypes", lambda: a.forward(x.astype(np.float32) if rank == 0 else x), a)
b = bn.BatchNorm(3, comm=comm, timeout=30, nonfinite="skip")
huge = np.full((4, 3), 1e308 if rank == 0 else -1e308)  # each rank's variance is 0
attempt(out, "overflow_across_ranks", lambda: b.forward(huge), b)
try:
    import torch
except ImportError:
    torch = None
if torch is not None:
    t = torch.tensor(x, dtype=torch.float32)
    c = bn.BatchNorm(3, comm=comm, timeout=30)
    attempt(out, "bfloat16_on_rank_0", lambda: c.forward(t.bfloat16() if rank == 0 else t), c)
    d = bn.BatchNorm(3, comm=comm, timeout=30)
    attempt(out, "bfloat16_everywhere", lambda: d.forward(t.bfloat16()), d)
e = bn.BatchNorm(3, comm=comm, timeout=30)
# counts that do not fit the int64 header (rank 0 alone), and whose sum overflows int64
big = 2**63 if rank == 0 else 1
attempt(out, "count_too_big", lambda: bn.distributed.local_weight(big, comm, timeout=30), e)
out["weight_of_huge_counts"] = bn.distributed.local_weight(2**62, comm, timeout=30)
attempt(out, "agreeing", lambda: e.forward(x), e)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as fh:
    json.dump(out, fh)
