"""One rank of the torch.distributed (gloo) scenarios of tests/test_torch_sync.py.

Usage: python torch_dist_worker.py SCENARIO RANK WORLD INIT_FILE OUT_DIR. Writes
OUT_DIR/rank{RANK}.json (plain JSON) and leaves with os._exit so that no teardown of a
broken group can hang.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import batchnorm.torch as bt

SIZES = (5, 0, 3)  # per-rank batch sizes: uneven, one rank empty


def _global_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    x = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64)
    return x, dy


def _mine(t, rank):
    start = sum(SIZES[:rank])
    return t[start : start + SIZES[rank]]


def _err(a, b):
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def exact(rank, world):
    """One forward/backward against torch's BatchNorm2d on the concatenated batch."""
    x, dy = _global_batch()
    ref = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    ours = bt.SyncBatchNorm(4, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(dy)
    xo = _mine(x, rank).clone().contiguous(memory_format=torch.channels_last)
    xo.requires_grad_()
    yo = ours(xo)
    yo.backward(_mine(dy, rank))
    # torch's SyncBatchNorm gives each rank its own dweight / dbias: they add up to the whole
    dw = torch.zeros(4, dtype=torch.float64)
    dist.all_reduce(dw.add_(ours.weight.grad))
    return {
        "y": _err(yo, _mine(yr, rank)),
        "dx": _err(xo.grad, _mine(xr.grad, rank)),
        "dw": _err(dw, ref.weight.grad),
        "running_mean": ours.running_mean.tolist(),
        "rm": _err(ours.running_mean, ref.running_mean),
        "rv": _err(ours.running_var, ref.running_var),
    }


class _Net(torch.nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1, dtype=torch.float64)
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x))


def ddp(rank, world):
    """Three SGD steps under DistributedDataParallel against one process on every batch."""
    torch.manual_seed(0)
    ref = _Net(torch.nn.BatchNorm2d(4, dtype=torch.float64))
    model = bt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    net = torch.nn.parallel.DistributedDataParallel(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, net)]
    for step in range(3):
        x, dy = _global_batch(step)
        opts[0].zero_grad()
        (ref(x) * dy).sum().backward()
        opts[0].step()
        opts[1].zero_grad()
        # DDP averages over ranks: scaled by the world size the average is the sum
        (net(_mine(x, rank)) * _mine(dy, rank)).sum().mul(world).backward()
        opts[1].step()
    sd = model.state_dict()
    return {"max_err": max(_err(sd[k].double(), v.double()) for k, v in ref.state_dict().items())}


def error(rank, world):
    """Rank 1 passes an input with the wrong number of channels."""
    m = bt.SyncBatchNorm(4)
    before = m.running_mean.clone()
    x = torch.randn(3, 5 if rank == 1 else 4, 2, 2)
    try:
        m(x)
    except Exception as exc:  # noqa: BLE001
        return {
            "raised": type(exc).__name__,
            "message": str(exc),
            "unchanged": bool(torch.equal(before, m.running_mean)),
        }
    return {"raised": None}


def timeout(rank, world):
    """The last rank stays alive but never calls; the others give up after 2 s."""
    m = bt.SyncBatchNorm(4, timeout=2.0)
    if rank == world - 1:
        time.sleep(8)
        return {"skipped": True}
    try:
        m(torch.randn(3, 4, 2, 2))
    except Exception as exc:  # noqa: BLE001
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def eval_local(rank, world):
    """Evaluation is local: rank 0 evaluates alone (the others never call), with and without
    running statistics, and gets torch's single-process result."""
    out = {}
    if rank == 0:
        x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 3 + 1
        for track in (False, True):
            ours = bt.SyncBatchNorm(4, track_running_stats=track, dtype=torch.float64).eval()
            ref = torch.nn.BatchNorm2d(4, track_running_stats=track, dtype=torch.float64).eval()
            y = ours(x)
            out[f"err_{track}"] = _err(y, ref(x))
    return out


def main() -> None:
    scenario, rank, world, init, out = sys.argv[1:]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = globals()[scenario](rank, world)
    except Exception:  # noqa: BLE001
        result = {"crashed": traceback.format_exc()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    if scenario != "timeout":
        dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
