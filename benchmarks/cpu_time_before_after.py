"""This checkout against an earlier one in process CPU time, for a shared, loaded machine.

Wall-clock minima (``before_after.py``) do not resolve 10 % on a machine whose load average
is several times its core count: other processes take the cores mid-repeat. This script
times with ``time.process_time`` (CPU seconds of this process only) and is meant to run
with ``NUMBA_NUM_THREADS=1``, so the compiled kernels run in the calling thread and the CPU
time is the work itself. It compares the work, not the parallel speed: the copy floor of
big arrays needs a quiet machine and ``batchnorm bench``.

Old and new alternate within each repeat (several repeats, the minimum kept), in one
process; the earlier checkout is loaded as ``batchnorm._old`` (see ``before_after.py``).

Usage: ``NUMBA_NUM_THREADS=1 python benchmarks/cpu_time_before_after.py OLD_CHECKOUT``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from before_after import kernel_fns, layer_fn, load_old

import batchnorm as new


def cpu_seconds(f: Callable[[], object], n: int, repeats: int) -> float:
    """Minimum over ``repeats`` of the CPU seconds per call of ``n`` calls of ``f``."""
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(n):
            f()
        best = min(best, (time.process_time() - t0) / n)
    return best


def compare(fo: Callable, fn: Callable, n: int, rounds: int = 3, repeats: int = 10):
    """(old, new) seconds per call, alternating old and new ``rounds`` times."""
    old_t, new_t = [], []
    for _ in range(rounds):
        old_t.append(cpu_seconds(fo, n, repeats))
        new_t.append(cpu_seconds(fn, n, repeats))
    return min(old_t), min(new_t)


def numpy_train(mod, x: np.ndarray, axis: int) -> Callable[[], object]:
    """A training forward of ``mod`` on ``x`` with the NumPy backend."""
    g, b = np.ones(x.shape[axis]), np.zeros(x.shape[axis])
    return lambda: mod.batch_norm_train(x, g, b, axis=axis, backend="numpy")


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table of old and new CPU times and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old", type=Path)
    a = p.parse_args(argv)
    old = load_old(a.old)
    rng = np.random.default_rng(0)
    print("| array | call | old us | new us | new / old |\n|---|---|---|---|---|")
    cases = [
        ("NCHW f32", (32, 64, 56, 56), 1, np.float32),
        ("NHWC f32", (32, 56, 56, 64), -1, np.float32),
        ("(N, D) f32", (1024, 4096), 1, np.float32),
        ("(N, C) small C f32", (4096, 64), 1, np.float32),
        ("NCHW cache-sized f32", (16, 64, 16, 16), 1, np.float32),
        ("(60, 100) f64", (60, 100), 1, np.float64),
        ("(256, 512) f64", (256, 512), 1, np.float64),
    ]
    for name, shape, axis, dt in cases:
        x = rng.standard_normal(shape).astype(dt)
        dy = rng.standard_normal(shape).astype(dt)
        fo, fn = kernel_fns(old, x, dy, axis), kernel_fns(new, x, dy, axis)
        fo["train, backend numpy"] = numpy_train(old, x, axis)
        fn["train, backend numpy"] = numpy_train(new, x, axis)
        if axis == 1:
            fo["layer step"], fn["layer step"] = layer_fn(old, x, dy), layer_fn(new, x, dy)
        n = max(3, int(3e6 / x.size))
        for call in fo:
            t_old, t_new = compare(fo[call], fn[call], n)
            print(
                f"| {name} | {call} | {t_old * 1e6:.1f} | {t_new * 1e6:.1f} | "
                f"{t_new / t_old:.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
