"""batchnorm.torch's training step and evaluation with the native extension against the
Python route and torch.nn on CPU, float32: the three interleaved, minimum of repeats.

Run ``python benchmarks/torch_native.py`` (``--help`` for options). Each repeat times the
three back to back (order reversed every other repeat) on the same input and gradient; the
native route is switched on and off between them (:func:`batchnorm.torch.native.build` /
``disable``), so the two routes run the same module. Evaluation (``--mode eval``): the
modules in eval mode, one forward under ``torch.no_grad``. Also printed: the time of
``native.build()`` in this process (a cold build compiles; a warm one loads the cache).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import batchnorm.torch as bt

CL = torch.channels_last
ROWS = [
    ("BatchNorm1d (64, 256)", (64, 256), None),
    ("BatchNorm1d (256, 1024)", (256, 1024), None),
    ("BatchNorm2d (8, 32, 16, 16)", (8, 32, 16, 16), None),
    ("BatchNorm2d (32, 256, 14, 14) channels_last", (32, 256, 14, 14), CL),
    ("BatchNorm2d (16, 64, 8, 8) channels_last", (16, 64, 8, 8), CL),
]


def _layer(ns, shape):
    return (ns.BatchNorm1d if len(shape) == 2 else ns.BatchNorm2d)(shape[1])


def _timer(module, x, dy, route):
    """Seconds per training step (``dy`` given) or evaluation (``dy`` None, no gradients)
    of ``module`` over ``n`` calls, the route set first."""

    def run(n: int) -> float:
        if route is not None:
            (bt.native.build() if route else bt.native.disable())
        t0 = time.perf_counter()
        if dy is None:
            with torch.no_grad():
                for _ in range(n):
                    module(x)
        else:
            for _ in range(n):
                module(x).backward(dy)
        return (time.perf_counter() - t0) / n

    return run


def measure(shape, fmt, repeat: int, evaluate: bool = False) -> dict:
    """``{name: seconds}``: the minimum over ``repeat`` interleaved repeats."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_(not evaluate)
    dy = None if evaluate else torch.randn_like(x)
    ours, theirs = _layer(bt, shape), _layer(torch.nn, shape)
    if evaluate:
        ours.eval(), theirs.eval()
    fns = {
        "native": _timer(ours, x, dy, True),
        "python": _timer(ours, x, dy, False),
        "torch": _timer(theirs, x, dy, None),
    }
    one = max(min(f(1) for _ in range(3)) for f in fns.values())
    n = max(1, min(200, int(0.002 / max(one, 1e-7))))  # about 2 ms per timing
    times: dict = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeat):
        for k in names if r % 2 == 0 else names[::-1]:
            times[k].append(fns[k](n))
    bt.native.disable()
    return {k: min(v) for k, v in times.items()}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=60, help="interleaved repeats (default 60)")
    p.add_argument("--mode", choices=("train", "eval", "both"), default="both")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    bt.native.build()
    built = time.perf_counter() - t0
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; "
        f"native.build() {built:.2f} s in this process"
    )
    rows = []
    for mode in ("train", "eval") if args.mode == "both" else (args.mode,):
        what = "training step" if mode == "train" else "evaluation"
        print(f"| input ({what}) | native / Python route / torch.nn (us) | native / torch "
              "| Python / torch |")  # fmt: skip
        print("|---|---|---|---|")
        for name, shape, fmt in ROWS:
            t = measure(shape, fmt, args.repeat, mode == "eval")
            a, b, c = (t[k] * 1e6 for k in ("native", "python", "torch"))
            print(f"| {name} | {a:.1f} / {b:.1f} / {c:.1f} | {a / c:.3f} | {b / c:.3f} |")
            rows.append({"input": name, "mode": mode, **t})
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return rows


if __name__ == "__main__":
    main()
