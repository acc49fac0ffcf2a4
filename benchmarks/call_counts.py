"""Library calls of one training step, counted with cProfile (issue 22, item 2).

Counts the Python function calls (and the modules they live in) of one forward + backward
of ``batchnorm.BatchNorm(8)`` on a (64, 8, 16, 16) float32 NumPy array, and of
``batchnorm.torch.BatchNorm1d(256)`` on a (64, 256) float32 tensor (skipped when torch is
not installed). Each step runs twice first (compilation, caches), then once under the
profiler. Only calls of functions defined in ``batchnorm`` count as library calls; the
total (NumPy, numba dispatch, torch included) is printed beside them.

Usage: ``python benchmarks/call_counts.py [--list]`` (``--list``: every library function
with its call count).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from collections.abc import Callable

import numpy as np

import batchnorm as bn


def _numpy_step() -> Callable[[], None]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8, 16, 16)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = bn.BatchNorm(8)

    def step():
        layer.forward(x)
        layer.backward(dy)

    return step


def _torch_step() -> Callable[[], None] | None:
    try:
        import torch

        import batchnorm.torch as bt
    except ImportError:
        return None
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    dy = torch.randn(64, 256)
    layer = bt.BatchNorm1d(256)

    def step():
        y = layer(x)
        y.backward(dy)

    return step


def count(step: Callable[[], None]) -> tuple[int, int, dict[str, int], list[str]]:
    """(library calls, all calls, library calls per module, module of each library call
    in order of first call) of one call of ``step``."""
    step()
    step()
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    st = pstats.Stats(prof)
    lib = total = 0
    per_module: dict[str, int] = {}
    rows = []
    for (path, line, name), (_cc, nc, *_rest) in st.stats.items():
        total += nc
        if "/batchnorm/" not in path:
            continue
        lib += nc
        mod = path.split("/batchnorm/", 1)[1]
        per_module[mod] = per_module.get(mod, 0) + nc
        rows.append(f"{nc:4d}  {mod}:{line}({name})")
    return lib, total, per_module, sorted(rows, reverse=True)


def main(argv: list[str] | None = None) -> int:
    """Print the counts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="list every library function")
    a = p.parse_args(argv)
    print(f"batchnorm from {bn.__file__}")
    for name, make in (
        ("BatchNorm(8), (64, 8, 16, 16) float32", _numpy_step),
        ("batchnorm.torch.BatchNorm1d(256), (64, 256) float32", _torch_step),
    ):
        step = make()
        if step is None:
            print(f"{name}: skipped (torch not installed)")
            continue
        lib, total, per_module, rows = count(step)
        print(
            f"{name}: {lib} library calls in {len(per_module)} modules "
            f"({total} calls in all), forward + backward"
        )
        if a.list:
            print("\n".join("    " + r for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
