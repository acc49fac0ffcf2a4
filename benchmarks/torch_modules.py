"""batchnorm.torch.BatchNorm2d against torch.nn.BatchNorm2d on CPU: forward + backward.

For each shape and memory format (NCHW, channels_last) both modules, in training mode with
the same weights, run ``y = bn(x); y.backward(dy)``; the two alternate inside every repeat
and the minimum over the repeats is reported, with the ratio torch / ours (> 1: ours is
faster) and the accuracy of both outputs against a float64 reference of the same input.
The load average of the machine is printed before and after (the numbers are only as good
as the machine is quiet), and so is ``OMP_WAIT_POLICY``: torch and numba each run an OpenMP
thread pool, and on few cores the threads one pool leaves spinning slow the other down
(run it with ``OMP_WAIT_POLICY=PASSIVE`` as well).

Usage: ``python benchmarks/torch_modules.py [--repeats 15] [--threads N] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import batchnorm.torch as bt

SHAPES = [(32, 64, 56, 56), (128, 64, 56, 56)]


def step(module, x, dy):
    """One training forward + backward."""
    xr = x.detach().requires_grad_()
    module(xr).backward(dy)
    return xr.grad


def interleaved(fns: dict, repeats: int) -> dict:
    """Minimum seconds per call of each function, alternating within every repeat."""
    for f in fns.values():  # warm up (compilation, allocator)
        f()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def error(module, x) -> float:
    """Max |y - reference| of a training forward, the reference in float64."""
    with torch.no_grad():
        y = module(x).double()
        xd = x.double()
        ref = (xd - xd.mean((0, 2, 3), keepdim=True)) / (
            xd.var((0, 2, 3), unbiased=False, keepdim=True) + module.eps
        ).sqrt()
    return float((y - ref).abs().max())


def main(argv=None) -> None:
    """Run the comparison and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="the small shape only, 3 repeats")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    print(
        f"load average before: {os.getloadavg()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| shape | format | torch.nn (ms) | ours (ms) | torch / ours | err torch | err ours |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        for fmt_name, fmt in (
            ("NCHW", torch.contiguous_format),
            ("channels_last", torch.channels_last),
        ):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
            dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
            theirs, ours = torch.nn.BatchNorm2d(shape[1]), bt.BatchNorm2d(shape[1])
            t = interleaved(
                {
                    "torch": lambda m=theirs, x=x, dy=dy: step(m, x, dy),
                    "ours": lambda m=ours, x=x, dy=dy: step(m, x, dy),
                },
                repeats,
            )
            xo = (x * 1 + 1e6).contiguous(memory_format=fmt)  # far from zero: mean 1e6, std 1
            print(
                f"| {shape} | {fmt_name} | {t['torch'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | "
                f"{t['torch'] / t['ours']:.2f}x | {error(theirs, xo):.2g} | {error(ours, xo):.2g} |"
            )
    print(f"load average after: {os.getloadavg()}")
    print("err: max |y - float64 reference| of a training forward on x + 1e6 (std 1), float32")


if __name__ == "__main__":
    main()
