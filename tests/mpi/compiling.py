"""MPI scenario: the last rank compiles the numba kernels on its first synchronized call
(an empty numba cache of its own: the kernels of the output and of the backward) while
the others, warmed, wait with a short timeout: the
waiting ranks abort the job, and the message names the likely cause.

Run as ``mpiexec -n R python compiling.py CACHE_DIR``.
"""

from __future__ import annotations

import os
import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
if rank == size - 1:  # before numba is imported: an empty cache, so it really compiles
    os.environ["NUMBA_CACHE_DIR"] = sys.argv[1]

import numpy as np  # noqa: E402

import batchnorm as bn  # noqa: E402

x = np.random.default_rng(rank).normal(size=(6, 3))
layer = bn.BatchNorm(3, backend="numba", reducer=bn.distributed.MpiReducer(comm, timeout=0.5))
if rank != size - 1:
    with bn.distributed.unsynchronized(layer):  # compiled (or loaded) before the others start
        layer.forward(x)
        layer.backward(x)
comm.Barrier()
layer.forward(x)  # small: local statistics by NumPy; the output kernel compiles after the merge
layer.backward(x)  # so the others wait here while the last rank compiles
print(f"rank {rank} was not stopped", flush=True)
