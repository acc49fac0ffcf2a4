"""MPI scenario: a problem on one rank raises the same error on every rank, nothing changes.

Run as ``mpiexec -n R python errors.py OUT``; every rank writes ``OUT/rank<r>.json``: per
case, the exception type and message it saw and whether its layer state was unchanged.
The last rank is the one with the problem ("bad"); the ranks must still be in step after
every case (the final case is a normal step whose statistics are compared).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from mpi4py import MPI

import batchnorm as bn
import batchnorm.nn

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
bad = size - 1
me_bad = rank == bad
c = 4
rng = np.random.default_rng(7 + rank)


def state(layer):
    keys = ("gamma", "beta", "running_mean", "running_var")
    return [getattr(layer, k).tobytes() for k in keys] + [
        layer.num_batches_tracked,
        layer.skipped_updates,
        id(layer._cache),
    ]


def warm(**kw):
    layer = bn.BatchNorm(c, comm=comm, **kw)
    layer.forward(rng.normal(size=(3, c)))
    layer.backward(rng.normal(size=(3, c)))
    return layer


def wrong_features(layer):
    layer.forward(rng.normal(size=(3, c + 1 if me_bad else c)))


def integer_dtype(layer):
    layer.forward(np.ones((3, c), np.int64) if me_bad else rng.normal(size=(3, c)))


def nan_statistics(layer):
    x = rng.normal(size=(3, c))
    if me_bad:
        x[1, 2] = np.nan
    layer.forward(x)


def eval_mode(layer):
    layer.forward(rng.normal(size=(3, c)), training=not me_bad)


def update_mismatch(layer):
    layer.forward(rng.normal(size=(3, c)), update_stats=not me_bad)


def global_count_one(layer):
    layer.forward(rng.normal(size=(1 if rank == 0 else 0, c)))


def global_count_zero(layer):
    layer.forward(np.zeros((0, c)))


def backward_shape(layer):
    layer.backward(rng.normal(size=(2 if me_bad else 3, c)))


def renorm_bad_limits(layer):
    # the schedule gives an invalid rmax on one rank only, from step 1 on (reassigning
    # layer.rmax itself is validated at once, locally)
    layer.forward(rng.normal(size=(3, c)))


def _renorm_schedule(step):
    return (0.5 if me_bad and step >= 1 else 2.0), 1.0


def functional_features(layer):
    bn.moments(rng.normal(size=(3, c + 2 if me_bad else c)), comm=comm)


def gradients_missing(layer):
    lin = bn.nn.Linear(c, 2, rng=np.random.default_rng(0))
    model = bn.nn.Sequential(lin, layer)
    if not me_bad:
        lin.forward(rng.normal(size=(3, c)))
        lin.backward(rng.normal(size=(3, 2)))
    else:
        lin.dW = None
    bn.distributed.allreduce_gradients(model, comm)


def recalibrate_bad_batch(layer):
    good = [rng.normal(size=(4, c)) for _ in range(2)]
    batches = good + [rng.normal(size=(4, c + 1))] if me_bad else good
    bn.recalibrate(layer, batches, comm=comm)


CASES = [
    ("wrong_features", wrong_features, {}),
    ("integer_dtype", integer_dtype, {}),
    ("nan_statistics", nan_statistics, {}),
    ("nan_statistics_skip", nan_statistics, {"nonfinite": "skip"}),
    ("eval_mode", eval_mode, {}),
    ("update_mismatch", update_mismatch, {}),
    ("global_count_one", global_count_one, {}),
    ("global_count_zero", global_count_zero, {}),
    ("global_count_zero_skip", global_count_zero, {"nonfinite": "skip"}),
    ("backward_shape", backward_shape, {}),
    ("renorm_bad_limits", renorm_bad_limits, {"renorm": True}),
    ("functional_features", functional_features, {}),
    ("gradients_missing", gradients_missing, {}),
    ("recalibrate_bad_batch", recalibrate_bad_batch, {}),
]

results = {}
for name, case, kw in CASES:
    if kw.pop("renorm", False):
        layer = bn.BatchRenorm(c, comm=comm, schedule=_renorm_schedule)
        layer.forward(rng.normal(size=(3, c)))
    else:
        layer = warm(**kw)
    before = state(layer)
    try:
        case(layer)
        outcome = {"raised": None, "message": ""}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        outcome = {
            "raised": type(exc).__name__,
            "is_value_error": isinstance(exc, ValueError),
            "message": str(exc),
        }
    after = state(layer)
    if outcome["raised"] is None and name.endswith("_skip"):
        outcome["skipped_updates"] = layer.skipped_updates
        after[5] = before[5]  # the skip is the expected change
        after[6] = before[6]
    outcome["state_unchanged"] = before == after
    results[name] = outcome

# still in step: a normal synchronized forward after all of that
layer = bn.BatchNorm(c, comm=comm)
layer.forward(np.arange(3 * c, dtype=float).reshape(3, c) * (rank + 1))
results["after"] = {
    "mean": layer.last_batch_stats.mean.tolist(),
    "count": layer.last_batch_stats.count,
}
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(results, f, indent=1)
