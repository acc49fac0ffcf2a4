"""The benchmark's timings: interleaved repeats of every implementation, on large arrays
(ratios to a plain copy) and small batches (microseconds); see :mod:`batchnorm_demo.bench.suite`
for the method."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from batchnorm import BatchNorm
from batchnorm.functional import (
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    numba_available,
)

from .cases import PASSES, Case, goal

__all__ = ["PAUSE_S", "large_rows", "small_row", "thread_count", "twin_ratios"]


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


def thread_count() -> int:
    """Threads numba runs on (the CPU count without numba); torch is given as many."""
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
    # the same memory, as a tensor with its features on axis 1 (NCHW logical order): an NHWC
    # array becomes a channels_last tensor, an NHWC view of NCHW memory a contiguous one
    if ax == x.ndim - 1 and x.ndim == 4:
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


def large_rows(case: Case, repeats: int, threads: int) -> list[dict]:
    """One row per pass of a large-array case: min and median seconds and their ratios to
    ``np.copyto`` (and to PyTorch), every implementation interleaved within each repeat."""
    rng = np.random.default_rng(0)
    x = case.arrange((rng.standard_normal(case.shape, dtype=np.float32) * 2 + 3).astype(case.dtype))
    dy = case.arrange(rng.standard_normal(case.shape, dtype=np.float32).astype(case.dtype))
    copy_out, out = np.empty_like(x), np.empty_like(x)  # laid out like x
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
            "memory": None if case.memory is None else list(case.memory),
            "twin": case.twin,
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


def twin_ratios(rows: list[dict]) -> None:
    """Add ``numba_vs_twin`` (min and median) to each row of a case with a ``twin``: its
    numba time over the twin case's (the same bytes in NCHW order), same pass."""
    by = {(r["case"], r["pass"]): r for r in rows}
    for r in rows:
        t = by.get((r.get("twin"), r["pass"]))
        if t is not None and "numba_s" in r and "numba_s" in t:
            r["numba_vs_twin"] = r["numba_s"] / t["numba_s"]
            r["numba_vs_twin_median"] = r["numba_median_s"] / t["numba_median_s"]


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


def small_row(name: str, shape: tuple[int, ...], repeats: int, threads: int) -> dict:
    """Microseconds of forward + backward on one small float64 batch: the layer, the pure
    kernels, the article's naive code and PyTorch's module with autograd."""
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
