"""MPI scenario: synchronized batch norm on torch tensors (statistics staged through host).

Run as ``mpiexec -n R python torch_sync.py OUT``; every rank holds its slice of one global
batch (as torch float64 tensors), runs the functional kernels and a synchronized layer, and
writes ``OUT/rank<r>.npz``; the test compares with one process on the whole batch.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from mpi4py import MPI

import batchnorm as bn
from batchnorm import distributed

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
rng = np.random.default_rng(0)
x = rng.normal(2.0, 3.0, (11, 4, 3))
dy = rng.normal(size=x.shape)
lo, hi = distributed.shard_bounds(len(x), size, rank)
xt, dyt = torch.from_numpy(x[lo:hi].copy()), torch.from_numpy(dy[lo:hi].copy())

res = {}
y, cache = bn.batch_norm_train(xt, None, None, comm=comm)
dx, _, _ = bn.batch_norm_backward(dyt, cache, comm=comm)
assert isinstance(y, torch.Tensor) and isinstance(dx, torch.Tensor)
res["y"], res["dx"] = y.numpy(), dx.numpy()
layer = bn.BatchNorm(4, comm=comm)
for _ in range(2):
    yl = layer.forward(xt)
    dxl = layer.backward(dyt)
assert isinstance(layer.running_mean, torch.Tensor)
res["layer_y"], res["layer_dx"] = yl.numpy(), dxl.numpy()
res["running_mean"] = layer.running_mean.numpy()
res["running_var"] = layer.running_var.numpy()
res["dgamma"] = layer.dgamma.numpy()
np.savez(f"{sys.argv[1]}/rank{rank}.npz", lo=lo, hi=hi, **res)
