"""Benchmark of the kernels: ratios to a plain copy and to PyTorch's CPU kernel, side by side.

For every case (shape, layout, dtype) and pass (train forward, eval forward, backward) the
minimum wall time over repeats is reported for the NumPy and numba backends, as a ratio to
``np.copyto`` of the same array measured in the same run, and as a ratio to PyTorch's CPU
batch-norm kernel (``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward``)
with the same number of threads, when torch is installed. The first-call time of each
compiled pass is measured in a fresh process with an empty numba cache (the compile time).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .functional import (
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    numba_available,
)

__all__ = ["CASES", "Case", "run_bench"]

PASSES = ("train", "eval", "backward")


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    axis: int
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


CASES = {
    "quick": [
        Case("NCHW", (32, 64, 56, 56), 1),
        Case("NHWC", (32, 56, 56, 64), -1),
        Case("(N, D)", (1024, 4096), 1),
        Case("NCHW cache-sized", (16, 64, 16, 16), 1),
    ],
    "full": [
        Case("NCHW", (32, 64, 56, 56), 1),
        Case("NHWC", (32, 56, 56, 64), -1),
        Case("(N, D)", (1024, 4096), 1),
        Case("NCHW cache-sized", (16, 64, 16, 16), 1),
        Case("NHWC cache-sized", (16, 16, 16, 64), -1),
        Case("(N, D) cache-sized", (256, 1024), 1),
        Case("NCHW 100MB", (128, 64, 56, 56), 1),
        Case("NHWC 100MB", (128, 56, 56, 64), -1),
        Case("(N, D) 134MB", (8192, 4096), 1),
        Case("NCHW float64", (32, 64, 56, 56), 1, "float64"),
        Case("NCHW float16", (32, 64, 56, 56), 1, "float16"),
    ],
}


def _tmin(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _threads() -> int:
    if numba_available():
        import numba

        return int(numba.get_num_threads())
    return os.cpu_count() or 1


def _torch_fns(case: Case, x: np.ndarray, dy: np.ndarray, threads: int):
    try:
        import torch
    except ImportError:
        return None
    if case.dtype == "float16":  # PyTorch's CPU batch norm has no half kernel for all passes
        return None
    torch.set_num_threads(threads)
    ax = case.axis % x.ndim
    if ax == x.ndim - 1 and x.ndim == 4:  # channels-last: logical NCHW, NHWC memory
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        dyt = torch.from_numpy(dy).permute(0, 3, 1, 2)
    else:
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    c = xt.shape[1]
    dt = xt.dtype
    w, b = torch.ones(c, dtype=dt), torch.zeros(c, dtype=dt)
    rm, rv = torch.zeros(c, dtype=dt), torch.ones(c, dtype=dt)
    aten = torch.ops.aten
    _, save_mean, save_invstd = aten.native_batch_norm(xt, w, b, rm, rv, True, 0.1, 1e-5)
    return {
        "train": lambda: aten.native_batch_norm(xt, w, b, rm, rv, True, 0.1, 1e-5),
        "eval": lambda: aten.native_batch_norm(xt, w, b, rm, rv, False, 0.1, 1e-5),
        "backward": lambda: aten.native_batch_norm_backward(
            dyt, xt, w, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True]
        ),
    }


def _our_fns(case: Case, x: np.ndarray, dy: np.ndarray, backend: str):
    c = x.shape[case.axis]
    g, b, rm, rv = np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)
    _, cache = batch_norm_train(x, g, b, axis=case.axis, backend=backend)
    return {
        "train": lambda: batch_norm_train(x, g, b, axis=case.axis, backend=backend),
        "eval": lambda: batch_norm_eval(x, g, b, rm, rv, axis=case.axis, backend=backend),
        "backward": lambda: batch_norm_backward(dy, cache, backend=backend),
    }


_COMPILE_SCRIPT = """
import json, time, numpy as np, batchnorm as bn
x = np.random.default_rng(0).standard_normal((4, 8, 40, 40)).astype(np.float32)
g = np.ones(8); out = {}
t = time.perf_counter(); y, cache = bn.batch_norm_train(x, g, g, backend="numba")
out["train"] = time.perf_counter() - t
t = time.perf_counter(); bn.batch_norm_eval(x, g, g, g, g, backend="numba")
out["eval"] = time.perf_counter() - t
t = time.perf_counter(); bn.batch_norm_backward(x, cache, backend="numba")
out["backward"] = time.perf_counter() - t
print(json.dumps(out))
"""


def compile_times() -> dict | None:
    """First-call seconds per pass in a fresh process with an empty numba cache."""
    if not numba_available():
        return None
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
        res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env,
                             capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_bench(suite: str = "quick", repeats: int = 10, progress=None) -> dict:
    """Run the benchmark suite; return a JSON-ready dict of timings and ratios."""
    threads = _threads()
    rows = []
    cases = CASES[suite]
    for n, case in enumerate(cases):
        rng = np.random.default_rng(0)
        x = (rng.standard_normal(case.shape) * 2 + 3).astype(case.dtype)
        dy = rng.standard_normal(case.shape).astype(case.dtype)
        out = np.empty_like(x)
        reps = max(3, repeats if case.nbytes < 50e6 else repeats // 2)
        copy = _tmin(lambda: np.copyto(out, x), reps)  # noqa: B023
        impls = {"numpy": _our_fns(case, x, dy, "numpy")}
        if numba_available():
            impls["numba"] = _our_fns(case, x, dy, "numba")
        torch_fns = _torch_fns(case, x, dy, threads)
        if torch_fns is not None:
            impls["torch"] = torch_fns
        for fns in impls.values():  # warm up (compile, allocate) before timing
            for p in PASSES:
                fns[p]()
        for p in PASSES:
            times = {name: _tmin(fns[p], reps) for name, fns in impls.items()}
            rows.append({
                "case": case.name, "shape": list(case.shape), "axis": case.axis,
                "dtype": case.dtype, "pass": p, "copy_s": copy,
                **{f"{k}_s": v for k, v in times.items()},
                **{f"{k}_vs_copy": v / copy for k, v in times.items()},
                **({f"{k}_vs_torch": times[k] / times["torch"] for k in times if k != "torch"}
                   if "torch" in times else {}),
            })
        if progress:
            progress(n + 1, len(cases))
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "threads": threads,
                    "numpy": np.__version__},
        "suite": suite,
        "repeats": repeats,
        "compile_s": compile_times(),
        "rows": rows,
    }


def format_bench(result: dict) -> str:
    """A Markdown table of the ratios (lower is faster)."""
    head = ["case", "dtype", "pass", "copy (ms)", "numpy / copy", "numba / copy",
            "torch / copy", "numba / torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    for r in result["rows"]:
        lines.append("| " + " | ".join([
            r["case"], r["dtype"], r["pass"], f"{1e3 * r['copy_s']:.2f}",
            f(r.get("numpy_vs_copy")), f(r.get("numba_vs_copy")), f(r.get("torch_vs_copy")),
            f(r.get("numba_vs_torch")),
        ]) + " |")
    m = result["machine"]
    foot = (f"\n{m['cpus']} CPUs, {m['threads']} threads for numba and torch; "
            f"{m['platform']}; minimum of {result['repeats']} repeats.")
    comp = result.get("compile_s")
    if comp and "error" not in comp:
        foot += (" First-call compile time (empty cache): "
                 + ", ".join(f"{k} {v:.1f}s" for k, v in comp.items()) + ".")
    return "\n".join(lines) + foot
