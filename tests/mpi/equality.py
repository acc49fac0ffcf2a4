"""MPI scenario: synchronized statistics, outputs and gradients against the global batch.

Run as ``mpiexec -n R python equality.py OUT SIZES`` (SIZES: comma-separated rows per rank,
zeros allowed). Rank 0 writes the global inputs to ``OUT/inputs.npz``; every rank writes its
results to ``OUT/rank<r>.npz``; tests/test_distributed.py computes the single-process
reference and compares.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

import batchnorm as bn

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
out = sys.argv[1]
sizes = [int(s) for s in sys.argv[2].split(",")]
assert len(sizes) == size, (sizes, size)
bounds = np.concatenate([[0], np.cumsum(sizes)])
lo, hi = int(bounds[rank]), int(bounds[rank + 1])
n, c, steps = int(bounds[-1]), 5, 40

rng = np.random.default_rng(2024)  # the same global data on every rank
x = rng.normal(3.0, 2.0, (n, c))
gamma, beta = rng.normal(1, 0.2, c), rng.normal(0, 0.2, c)
dy = rng.normal(size=(n, c))
x32 = (1e6 + rng.normal(0.0, 1.0, (n, c))).astype(np.float32)
xs = [rng.normal(rng.normal(0, 2, c), rng.uniform(0.5, 3, c), (n, c)) for _ in range(steps)]
dys = [rng.normal(size=(n, c)) for _ in range(steps)]
recal = [rng.normal(1.0, 2.0, (rng.integers(2, 7), c)) for _ in range(3 * size)]
if rank == 0:
    np.savez(
        f"{out}/inputs.npz",
        x=x,
        gamma=gamma,
        beta=beta,
        dy=dy,
        x32=x32,
        xs=np.stack(xs),
        dys=np.stack(dys),
        bounds=bounds,
        recal=np.concatenate(recal),
        recal_sizes=[len(r) for r in recal],
    )

res = {}
res["mean"], res["var"] = bn.moments(x[lo:hi], comm=comm)
res["mean32"], res["var32"] = bn.moments(x32[lo:hi], comm=comm)
y, cache = bn.batch_norm_train(x[lo:hi], gamma, beta, comm=comm)
res["y"], res["cache_count"] = y, cache.count
res["dx"], res["dgamma"], res["dbeta"] = bn.batch_norm_backward(dy[lo:hi], cache, comm=comm)

# layers over many steps: torch convention (unbiased running variance: uses the global count)
layer = bn.BatchNorm(c, convention="torch", comm=comm)
renorm = bn.BatchRenorm(c, rmax=1.5, dmax=0.5, momentum=0.9, comm=comm)
for step in range(steps):
    for i, lay in enumerate((layer, renorm)):
        yy = lay.forward(xs[step][lo:hi])
        dx = lay.backward(dys[step][lo:hi])
        if step == steps - 1:
            res[f"layer{i}_y"], res[f"layer{i}_dx"] = yy, dx
for i, lay in enumerate((layer, renorm)):
    res[f"layer{i}_running_mean"], res[f"layer{i}_running_var"] = lay.running_mean, lay.running_var
    res[f"layer{i}_dgamma"], res[f"layer{i}_dbeta"] = lay.dgamma, lay.dbeta
    res[f"layer{i}_tracked"] = lay.num_batches_tracked
    res[f"layer{i}_count"] = lay.last_batch_stats.count

# evaluation mode on every rank: running statistics, no merge (a header exchange only)
layer.eval()
res["eval_y"] = layer.forward(x[lo:hi])
with bn.distributed.unsynchronized(layer):  # one rank alone may evaluate outside the block
    res["eval_y_local"] = layer.forward(x[lo:hi])

# recalibration of a data set sharded across ranks: rank r streams batches r, r+R, ...
net = bn.BatchNorm(c, comm=comm)
bn.recalibrate(net, recal[rank::size], comm=comm)
res["recal_mean"], res["recal_var"] = net.running_mean, net.running_var

# every rank empty: nonfinite="skip" skips the update on every rank
skip = bn.BatchNorm(c, nonfinite="skip", comm=comm)
skip.forward(np.zeros((0, c)))
res["skip_skipped"], res["skip_tracked"] = skip.skipped_updates, skip.num_batches_tracked
res["traffic_sent"] = bn.distributed.traffic["sent"]
np.savez(f"{out}/rank{rank}.npz", **res)
