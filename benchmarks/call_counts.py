"""Library calls of one training step, counted with cProfile (issue 22, item 2).

Counts the Python function calls (and the modules they live in) of one forward + backward
of ``batchnorm.BatchNorm(8)`` on a (64, 8, 16, 16) float32 NumPy array, and of
``batchnorm.torch.BatchNorm1d(256)`` on a (64, 256) float32 tensor (skipped when torch is
not installed). Each step runs twice first (compilation, caches), then once under the
profiler. Only calls of functions defined in ``batchnorm`` count as library calls; the
total (NumPy, numba dispatch, torch included) is printed beside them.

For the forward and the backward it also prints how many library calls lead from the
public call to the first compiled kernel (the library functions on the stack when the kernel
is entered, the public call included, the kernel itself not).

Usage: ``python benchmarks/call_counts.py [--list]`` (``--list``: those paths, and every
library function with its call count).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
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

    step.parts = (lambda: layer.forward(x), lambda: layer.backward(dy))
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
    held = []

    def step():
        y = layer(x)
        y.backward(dy)

    def forward():
        held[:] = [layer(x)]

    step.parts = (forward, lambda: held.pop().backward(dy))
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


def _kernel_codes() -> set:
    """The code objects of the library's compiled kernels (numba dispatchers' functions)."""
    codes = set()
    for name, mod in list(sys.modules.items()):
        if name.startswith("batchnorm."):
            for obj in vars(mod).values():
                if type(obj).__module__.startswith("numba") and hasattr(obj, "py_func"):
                    codes.add(obj.py_func.__code__)
    return codes


def chain(part: Callable[[], None]) -> list[str]:
    """The library functions on the stack when ``part`` first enters a compiled kernel,
    from the public call to the kernel (``module:function``)."""
    stack: list = []
    found: list[list] = []
    kernels = _kernel_codes()

    def prof(frame, event, arg):
        if event == "call":
            stack.append(frame.f_code)
            if not found and frame.f_code in kernels:
                found.append([c for c in stack if "/batchnorm/" in c.co_filename])
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(prof)
    try:
        part()
    finally:
        sys.setprofile(None)
    codes = found[0] if found else []
    return [f"{c.co_filename.split('/batchnorm/', 1)[1]}:{c.co_name}" for c in codes]


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
        for what, part in zip(("forward", "backward"), step.parts, strict=True):
            path = chain(part)
            print(f"  {what}: {len(path) - 1} calls from the public call to the kernel")
            if a.list:
                print("      " + " > ".join(path))
        if a.list:
            print("\n".join("    " + r for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
