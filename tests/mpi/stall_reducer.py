"""MPI scenario: like ``stall.py``, with the layer given its reducer by ``reducer=``
(whose own ``timeout=2`` the constructor used to reset to None: the job then hung).

Run as ``mpiexec -n R python stall_reducer.py``; the waiting ranks abort the job.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

import batchnorm as bn
from batchnorm.distributed import MpiReducer

bn.distributed.STALL_WARNING_SECONDS = 0.5
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
layer = bn.BatchNorm(3, reducer=MpiReducer(comm, timeout=2.0))
x = np.random.default_rng(rank).normal(size=(4, 3))
layer.forward(x)
if rank == size - 1:
    time.sleep(30)  # skips the second call; the others abort the job long before
else:
    layer.forward(x)
print(f"rank {rank} was not stopped", flush=True)
