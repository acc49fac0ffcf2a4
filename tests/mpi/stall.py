"""MPI scenario: the last rank skips a synchronized call; the others must not hang.

Run as ``mpiexec -n R python stall.py``. The layers have ``timeout=2``; the stall warning is
lowered to 0.5 s. The waiting ranks print which rank is missing, then abort the job
(``comm.Abort(1)``), so mpiexec ends non-zero within seconds.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

import batchnorm as bn

bn.distributed.STALL_WARNING_SECONDS = 0.5
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
layer = bn.BatchNorm(3, comm=comm, timeout=2.0)
x = np.random.default_rng(rank).normal(size=(4, 3))
layer.forward(x)  # everybody: fine
layer.forward(x)
if rank == size - 1:
    time.sleep(30)  # skips the third call; the others abort the job long before
else:
    layer.forward(x)
print(f"rank {rank} was not stopped", flush=True)
