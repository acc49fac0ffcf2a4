"""Benchmark of the kernels: ratios to a plain copy and to PyTorch's CPU kernel, side by side.

Measuring honestly on a shared, noisy machine: within every repeat the measured functions
run one after the other (copy, NumPy backend, numba backend, PyTorch, copy, ...), so a noisy
neighbour slows all of them alike, with a short untimed busy pause (:data:`PAUSE_S`) after
parallel calls so that no library's spinning idle threads slow the next one; the minimum
and the median over
the repeats are reported, each as a ratio to ``np.copyto`` of the same array into a
preallocated one.

* Large-array table: every case (shape, layout, dtype) and pass (train forward, eval
  forward, backward) for the NumPy backend, the numba backend (writing into a preallocated
  ``out=``, as a layer with ``reuse_buffers=True`` does; the ratio with a fresh output array
  is reported too) and PyTorch's CPU batch-norm kernel (``torch.ops.aten.native_batch_norm``
  / ``native_batch_norm_backward``, same number of threads) when torch is installed.
* Small-array table: forward + backward of the :class:`~batchnorm.BatchNorm` layer (training
  mode, running update included), of the pure kernels and of the article's naive NumPy
  code, interleaved, and of PyTorch's ``BatchNorm1d``/``BatchNorm2d`` with autograd in its
  own loop right after (interleaved, it slowed whichever function ran next), in
  microseconds.
* First-call compile time of each compiled pass in a fresh process with an empty cache.

Ratios outside the goals of issue 11 are marked ``MISSED``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from batchnorm import BatchNorm
from batchnorm.functional import (
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    numba_available,
)

__all__ = ["CASES", "SMALL_CASES", "Case", "format_bench", "run_bench"]

PASSES = ("train", "eval", "backward")


@dataclass(frozen=True)
class Case:
    """One benchmarked array: a name, shape, feature axis and dtype."""

    name: str
    shape: tuple[int, ...]
    axis: int
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        """Size of the array in bytes."""
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
        Case("NHWC float16", (32, 56, 56, 64), -1, "float16"),
    ],
}

#: Small float64 batches: (name, shape); axis 1.
SMALL_CASES = {
    "quick": [("(60, 100)", (60, 100))],
    "full": [
        ("(60, 100)", (60, 100)),
        ("(256, 512)", (256, 512)),
        ("(32, 64, 8, 8)", (32, 64, 8, 8)),
    ],
}


def goal(case: Case, pass_: str) -> float | None:
    """The issue's goal for ``numba / copy`` (None where it sets none)."""
    if case.dtype == "float16":
        return 3.0 if pass_ == "train" else None
    if case.dtype != "float32":
        return None
    if case.nbytes >= 50e6:
        return {"train": 1.2, "eval": 1.05, "backward": 1.6}[pass_]
    if case.nbytes <= 2e6 and pass_ == "train":
        return 1.5
    return None


#: Untimed busy pause before each timed call: OpenMP thread pools (PyTorch's, numba's) spin
#: for a while after a parallel region and would otherwise steal the CPU from whichever
#: function runs next (measured: +30 us on a 60 us call right after PyTorch on 2 cores).
#: A busy wait, not a sleep: after sleeping, this VM runs the next small call ~2.5x slower.
PAUSE_S = 2e-3


def _pause() -> None:
    end = time.perf_counter() + PAUSE_S
    while time.perf_counter() < end:
        pass


def _interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, pause_after: tuple[str, ...] | None = ()
) -> dict[str, list[float]]:
    """Times of every function, run one after the other within each repeat.

    A busy pause (:data:`PAUSE_S`) follows the calls named in ``pause_after`` (every call
    when None: the large-array table, whose parallel calls leave spinning thread pools).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            if pause_after is None or name in pause_after:
                _pause()
    return times


def _threads() -> int:
    if numba_available():
        import numba

        return int(numba.get_num_threads())
    return os.cpu_count() or 1


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_fns(case: Case, x: np.ndarray, dy: np.ndarray, threads: int):
    torch = _torch()
    if torch is None or case.dtype == "float16":  # no CPU half kernel for every pass
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


def _our_fns(case: Case, x: np.ndarray, dy: np.ndarray, backend: str, out):
    c = x.shape[case.axis]
    g, b, rm, rv = np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)
    _, cache = batch_norm_train(x, g, b, axis=case.axis, backend=backend)
    ax = case.axis
    return {
        "train": lambda: batch_norm_train(x, g, b, axis=ax, backend=backend, out=out),
        "eval": lambda: batch_norm_eval(x, g, b, rm, rv, axis=ax, backend=backend, out=out),
        "backward": lambda: batch_norm_backward(dy, cache, backend=backend, out=out),
    }


def _stats(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


def _large_rows(case: Case, repeats: int, threads: int) -> list[dict]:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 3).astype(case.dtype)
    dy = rng.standard_normal(case.shape, dtype=np.float32).astype(case.dtype)
    copy_out, out = np.empty_like(x), np.empty_like(x)
    reps = max(3, repeats if case.nbytes < 50e6 else repeats // 2)
    impls = {"numpy": _our_fns(case, x, dy, "numpy", None)}
    if numba_available():
        impls["numba"] = _our_fns(case, x, dy, "numba", out)
        impls["numba_new"] = _our_fns(case, x, dy, "numba", None)
    torch_fns = _torch_fns(case, x, dy, threads)
    if torch_fns is not None:
        impls["torch"] = torch_fns
    for fns in impls.values():  # warm up (compile, allocate) before timing
        for p in PASSES:
            fns[p]()
    rows = []
    for p in PASSES:
        fns = {"copy": lambda: np.copyto(copy_out, x)}
        fns.update({name: f[p] for name, f in impls.items()})
        times = _interleaved(fns, reps, pause_after=None)
        copy_min, copy_med = _stats(times["copy"])
        row = {
            "case": case.name,
            "shape": list(case.shape),
            "axis": case.axis,
            "dtype": case.dtype,
            "pass": p,
            "repeats": reps,
            "copy_s": copy_min,
            "copy_median_s": copy_med,
            "goal": goal(case, p),
        }
        for name in impls:
            t_min, t_med = _stats(times[name])
            row[f"{name}_s"] = t_min
            row[f"{name}_median_s"] = t_med
            row[f"{name}_vs_copy"] = t_min / copy_min
            row[f"{name}_vs_copy_median"] = t_med / copy_med
        if "torch" in impls:
            for name in impls:
                if name != "torch":
                    row[f"{name}_vs_torch"] = row[f"{name}_s"] / row["torch_s"]
                    row[f"{name}_vs_torch_median"] = row[f"{name}_median_s"] / row["torch_median_s"]
        rows.append(row)
    return rows


def _naive(x, gamma, beta, dy, eps=1e-5):
    """The article's NumPy code: forward (mean, var, normalize, scale and shift) and the
    three-line backward."""
    mu = x.mean(axis=0)
    var = x.var(axis=0)
    x_hat = (x - mu) / np.sqrt(var + eps)
    y = gamma * x_hat + beta
    n = x.shape[0]
    dx_hat = dy * gamma
    dx = (n * dx_hat - dx_hat.sum(0) - x_hat * (dx_hat * x_hat).sum(0)) / (n * np.sqrt(var + eps))
    return y, dx, (dy * x_hat).sum(0), dy.sum(0)


def _small_row(name: str, shape: tuple[int, ...], repeats: int, threads: int) -> dict:
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    c = shape[1]
    g, b = np.ones(c), np.zeros(c)
    layer, reuse = BatchNorm(c), BatchNorm(c, reuse_buffers=True)
    fns: dict[str, Callable[[], object]] = {
        "layer": lambda: layer.backward(layer(x)),
        "layer_reuse": lambda: reuse.backward(reuse(x)),
        "pure": lambda: batch_norm_backward(dy, batch_norm_train(x, g, b)[1]),
    }
    # the layer's backward above gets y as dy: same cost as any dy of that shape
    if len(shape) == 2:
        fns["naive"] = lambda: _naive(x, g, b, dy)
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
        mod = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(
            c, dtype=torch.float64
        )
        xt = torch.from_numpy(x).requires_grad_(True)
        dyt = torch.from_numpy(dy)

        def torch_fwd_bwd():
            xt.grad = None
            mod(xt).backward(dyt)

    else:
        torch_fwd_bwd = None
    for fn in fns.values():
        fn()
    times = _interleaved(fns, repeats)
    if torch_fwd_bwd is not None:
        # PyTorch runs in its own loop: interleaved, whichever function ran right after it
        # measured ~30 us slower at (60, 100) (also with one torch thread: its autograd and
        # allocator state, not only spinning threads, evict ours)
        torch_fwd_bwd()
        times.update(_interleaved({"torch": torch_fwd_bwd}, repeats))
    row: dict = {"case": name, "shape": list(shape), "dtype": "float64", "repeats": repeats}
    for k, t in times.items():
        row[f"{k}_us"], row[f"{k}_median_us"] = (v * 1e6 for v in _stats(t))
    for ref in ("naive", "torch"):
        if ref in times:
            row[f"layer_vs_{ref}"] = row["layer_us"] / row[f"{ref}_us"]
            row[f"layer_vs_{ref}_median"] = row["layer_median_us"] / row[f"{ref}_median_us"]
    return row


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
layer = bn.BatchNorm(100); s = np.random.default_rng(0).standard_normal((60, 100))
t = time.perf_counter(); layer.backward(layer(s))
out["small layer (60, 100)"] = time.perf_counter() - t
print(json.dumps(out))
"""


def compile_times(cache_dir: str | None = None) -> dict | None:
    """First-call seconds per pass in a fresh process; an empty numba cache unless
    ``cache_dir`` (a warm one) is given."""
    if not numba_available():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir or tmp}
        res = subprocess.run(
            [sys.executable, "-c", _COMPILE_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_bench(suite: str = "quick", repeats: int = 10, progress=None) -> dict:
    """Run the benchmark suite; return a JSON-ready dict of timings and ratios.

    Parameters
    ----------
    suite : {"quick", "full"}
    repeats : int
        Interleaved repeats per large-array timing (halved for arrays over 50 MB); the
        small-array table uses 30 times as many.
    progress : callable(done, total), optional
    """
    threads = _threads()
    cases = CASES[suite]
    small = SMALL_CASES[suite]
    total = len(cases) + len(small) + 1
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    compile_s = compile_times()  # first: it also compiles what the timings below need
    tick()
    rows = []
    for case in cases:
        rows.extend(_large_rows(case, repeats, threads))
        tick()
    small_rows = []
    for name, shape in small:
        small_rows.append(_small_row(name, shape, 30 * repeats, threads))
        tick()
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "numpy": np.__version__,
        },
        "suite": suite,
        "repeats": repeats,
        "compile_s": compile_s,
        "rows": rows,
        "small": small_rows,
    }


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_bench(result: dict) -> str:
    """Markdown tables of the ratios (lower is faster), min and median of the repeats."""
    head = [
        "case",
        "dtype",
        "pass",
        "copy ms (min)",
        "numpy / copy",
        "numba / copy min",
        "numba / copy median",
        "numba fresh out / copy",
        "torch / copy",
        "numba / torch min",
        "numba / torch median",
        "goal",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        g = r.get("goal")
        mark = "-"
        if g is not None and r.get("numba_vs_copy") is not None:
            mark = f"<= {g:g}: " + ("met" if r["numba_vs_copy"] <= g else "MISSED")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["case"],
                    r["dtype"],
                    r["pass"],
                    f"{1e3 * r['copy_s']:.2f}",
                    _f(r.get("numpy_vs_copy")),
                    _f(r.get("numba_vs_copy")),
                    _f(r.get("numba_vs_copy_median")),
                    _f(r.get("numba_new_vs_copy")),
                    _f(r.get("torch_vs_copy")),
                    _f(r.get("numba_vs_torch")),
                    _f(r.get("numba_vs_torch_median")),
                    mark,
                ]
            )
            + " |"
        )
    out = [
        "Large arrays (ratios to np.copyto into a preallocated array; numba writes into out=):",
        "",
        *lines,
    ]
    if result.get("small"):
        head = [
            "shape (float64)",
            "layer us min / median",
            "layer reuse_buffers us",
            "pure kernels us",
            "naive NumPy us",
            "torch autograd us",
            "layer / naive",
            "layer / torch",
            "goal",
        ]
        out += [
            "",
            "Small arrays (forward + backward, training mode, microseconds):",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for r in result["small"]:
            marks = []
            if r.get("layer_vs_naive") is not None and r["case"] == "(60, 100)":
                marks.append("<= naive: " + ("met" if r["layer_vs_naive"] <= 1.0 else "MISSED"))
            if r.get("layer_vs_torch") is not None:
                marks.append("<= torch: " + ("met" if r["layer_vs_torch"] <= 1.0 else "MISSED"))
            out.append(
                "| "
                + " | ".join(
                    [
                        r["case"],
                        f"{r['layer_us']:.0f} / {r['layer_median_us']:.0f}",
                        f"{r['layer_reuse_us']:.0f}",
                        f"{r['pure_us']:.0f}",
                        _f(r.get("naive_us"), 0),
                        _f(r.get("torch_us"), 0),
                        _f(r.get("layer_vs_naive")),
                        _f(r.get("layer_vs_torch")),
                        "; ".join(marks) or "-",
                    ]
                )
                + " |"
            )
    m = result["machine"]
    foot = (
        f"\n{m['cpus']} CPUs, {m['threads']} threads for numba and torch; "
        f"{m['platform']}; functions interleaved within each repeat, minimum and median "
        f"of {result['repeats']} repeats (half that for arrays over 50 MB, 30x that for "
        "small arrays)."
    )
    comp = result.get("compile_s")
    if comp and "error" not in comp:
        foot += (
            " First-call compile time (empty numba cache): "
            + ", ".join(f"{k} {v:.1f}s" for k, v in comp.items())
            + "."
        )
    return "\n".join(out) + "\n" + foot
