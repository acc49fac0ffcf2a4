"""Our kernels on a GPU (torch CUDA tensors, and CuPy arrays) against a copy and cuDNN.

Usage: python benchmarks/gpu.py [--device cuda] [--repeats 20] [--quick] [--json OUT]

For float32 (32, 64, 56, 56) NCHW (feature axis 1), (256, 1024) (axis 1), (32, 56, 56, 64)
channels-last (axis -1), and float16 NCHW, times our training forward
(``batch_norm_train``), evaluation forward (``batch_norm_eval`` with the batch's
statistics) and backward (``batch_norm_backward``) against

* a device-to-device copy of the same bytes (``y.copy_(x)`` into a preallocated ``y``; for
  the backward, which reads ``x`` and ``dy``, the copies of both), and
* ``torch.nn.functional.batch_norm`` (cuDNN on CUDA, torch's own kernel on the CPU) in
  training mode, in evaluation mode, and its autograd backward (only the backward timed).

The compared functions run one after the other within each repeat, with
``torch.cuda.synchronize()`` before and after every timed call; after warm-up repeats each
is reported as its minimum over the repeats, as absolute times and as ratios. With CuPy
importable (and a CUDA device) our three passes on CuPy arrays are timed against a CuPy
copy the same way.

It also checks large-offset numerics on the device: float32 data of mean 1e6 and std 1,
shape (4096, 64), normalized by us and by ``torch.nn.functional.batch_norm``, against a
float64 CPU reference computed from the same float32 numbers. The script exits non-zero if
our error reaches 1e-5 or any measurement fails.

``--device cpu`` runs everything on torch CPU tensors (a smoke test, not a GPU result).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from batchnorm.functional import batch_norm_backward, batch_norm_eval, batch_norm_train

EPS = 1e-5
NUMERICS_TOL = 1e-5
PASSES = ("train", "eval", "backward")

#: (case name, shape, feature axis, dtype name)
CASES = (
    ("NCHW", (32, 64, 56, 56), 1, "float32"),
    ("(N, D)", (256, 1024), 1, "float32"),
    ("NHWC", (32, 56, 56, 64), -1, "float32"),
    ("NCHW", (32, 64, 56, 56), 1, "float16"),
)

# A timed entry: (setup, fn). ``setup()`` runs untimed just before ``fn(setup())`` is timed;
# with no setup, ``fn()`` is timed.
Entry = tuple[Callable[[], object] | None, Callable[..., object]]


# ------------------------------------------------------------------------------- timing
def interleaved_min(
    entries: dict[str, Entry], sync: Callable[[], None], repeats: int, warmup: int
) -> dict[str, float]:
    """Minimum seconds per call of each entry, the entries interleaved within each repeat.

    Parameters
    ----------
    entries : dict of str to (setup or None, fn)
        ``fn`` is timed; ``setup`` (when given) runs untimed before it and its result is
        passed to ``fn``.
    sync : callable
        Waits for the device (``torch.cuda.synchronize``); called before and after each
        timed call.
    repeats, warmup : int
        Timed repeats, and untimed ones run first.

    Returns
    -------
    dict of str to float
    """
    best = dict.fromkeys(entries, float("inf"))
    for r in range(warmup + repeats):
        for name, (setup, fn) in entries.items():
            arg = setup() if setup is not None else None
            sync()
            t0 = time.perf_counter()
            if setup is None:
                fn()
            else:
                fn(arg)
            sync()
            if r >= warmup:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def torch_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# ------------------------------------------------------------------------------- torch
def _torch_inputs(shape, axis, dtype, device):
    """Input, upstream gradient, float32 parameters and their NCHW views for torch."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2.0 + 3.0).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    c = shape[axis]
    w = (torch.rand(c, generator=gen) + 0.5).to(device)
    b = torch.randn(c, generator=gen).to(device)
    # torch wants the channels at dim 1: a channels-last tensor is a permuted view
    to_nchw = (lambda t: t.permute(0, 3, 1, 2)) if axis == -1 else (lambda t: t)
    return x, dy, w, b, to_nchw


def torch_entries(shape, axis, dtype, device) -> tuple[dict[str, Entry], str]:
    """The nine timed entries of one case (ours, copy, torch for each pass).

    Returns
    -------
    entries : dict of str to Entry
        Keys ``"<pass> <who>"`` with who in ours / copy / ref.
    stats_dtype : str
        ``cache.mean.dtype`` of our training forward.
    """
    fnb = torch.nn.functional.batch_norm
    x, dy, w, b, to_nchw = _torch_inputs(shape, axis, dtype, device)
    _, cache = batch_norm_train(x, w, b, axis=axis, eps=EPS)
    rm, rv = cache.mean.to(torch.float32), cache.var.to(torch.float32)
    xt, dyt = to_nchw(x), to_nchw(dy)
    y, y2 = torch.empty_like(x), torch.empty_like(x)

    def ref_graph():
        xg = xt.detach().requires_grad_(True)
        wg, bg = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
        return fnb(xg, None, None, wg, bg, training=True, eps=EPS), (xg, wg, bg)

    def copy2():
        y.copy_(x)
        y2.copy_(dy)

    entries: dict[str, Entry] = {
        "train ours": (None, lambda: batch_norm_train(x, w, b, axis=axis, eps=EPS)),
        "train copy": (None, lambda: y.copy_(x)),
        "train ref": (None, lambda: fnb(xt, None, None, w, b, training=True, eps=EPS)),
        "eval ours": (
            None,
            lambda: batch_norm_eval(x, w, b, cache.mean, cache.var, axis=axis, eps=EPS),
        ),
        "eval copy": (None, lambda: y.copy_(x)),
        "eval ref": (None, lambda: fnb(xt, rm, rv, w, b, training=False, eps=EPS)),
        "backward ours": (None, lambda: batch_norm_backward(dy, cache)),
        "backward copy": (None, copy2),
        "backward ref": (ref_graph, lambda g: torch.autograd.grad(g[0], g[1], dyt)),
    }
    return entries, str(cache.mean.dtype)


def run_torch(device: torch.device, repeats: int, warmup: int) -> list[dict]:
    """Time every case of :data:`CASES` on ``device``; one row per (case, pass)."""
    rows = []
    for name, shape, axis, dt in CASES:
        base = {"case": name, "shape": list(shape), "axis": axis, "dtype": dt}
        try:
            entries, stats = torch_entries(shape, axis, getattr(torch, dt), device)
            best = interleaved_min(entries, torch_sync(device), repeats, warmup)
        except Exception as exc:  # noqa: BLE001 - report the failure, time the other cases
            rows.append({**base, "pass": "-", "error": f"{type(exc).__name__}: {exc}"})
            continue
        for p in PASSES:
            times = {who: best[f"{p} {who}"] for who in ("ours", "copy", "ref")}
            rows.append({**base, "pass": p, "stats_dtype": stats, **times})
    return rows


# -------------------------------------------------------------------------------- CuPy
def cupy_entries(cp, shape, axis, dtype) -> dict[str, Entry]:
    """Our three passes on CuPy arrays and a CuPy copy of the same bytes."""
    rng = np.random.default_rng(0)
    x = cp.asarray((rng.standard_normal(shape) * 2.0 + 3.0).astype(dtype))
    dy = cp.asarray(rng.standard_normal(shape).astype(dtype))
    c = shape[axis]
    w = cp.asarray((rng.random(c) + 0.5).astype(np.float32))
    b = cp.asarray(rng.standard_normal(c).astype(np.float32))
    _, cache = batch_norm_train(x, w, b, axis=axis, eps=EPS)
    y, y2 = cp.empty_like(x), cp.empty_like(x)

    def copy2():
        cp.copyto(y, x)
        cp.copyto(y2, dy)

    return {
        "train ours": (None, lambda: batch_norm_train(x, w, b, axis=axis, eps=EPS)),
        "train copy": (None, lambda: cp.copyto(y, x)),
        "eval ours": (
            None,
            lambda: batch_norm_eval(x, w, b, cache.mean, cache.var, axis=axis, eps=EPS),
        ),
        "eval copy": (None, lambda: cp.copyto(y, x)),
        "backward ours": (None, lambda: batch_norm_backward(dy, cache)),
        "backward copy": (None, copy2),
    }


def run_cupy(cp, device: torch.device, repeats: int, warmup: int) -> list[dict]:
    """Time our passes on CuPy arrays on the CUDA device of ``device``."""
    rows = []
    with cp.cuda.Device(device.index or 0) as dev:
        for name, shape, axis, dt in CASES:
            base = {"case": name, "shape": list(shape), "axis": axis, "dtype": dt}
            try:
                best = interleaved_min(
                    cupy_entries(cp, shape, axis, dt), dev.synchronize, repeats, warmup
                )
            except Exception as exc:  # noqa: BLE001 - report the failure, go on
                rows.append({**base, "pass": "-", "error": f"{type(exc).__name__}: {exc}"})
                continue
            for p in PASSES:
                times = {who: best[f"{p} {who}"] for who in ("ours", "copy")}
                rows.append({**base, "pass": p, **times, "ref": None})
    return rows


# ---------------------------------------------------------------------------- numerics
def large_offset_errors(device: torch.device) -> dict[str, float | str]:
    """Max ``|y - y_ref|`` at mean 1e6, std 1, float32 (4096, 64), for us and for torch.

    ``y_ref`` is computed in float64 on the CPU from the same float32 numbers.

    Returns
    -------
    dict
        ``ours`` and ``ref`` (the errors) and ``stats_dtype`` (our ``cache.mean.dtype``).
    """
    gen = torch.Generator().manual_seed(1)
    x32 = (torch.randn(4096, 64, generator=gen, dtype=torch.float64) + 1e6).to(torch.float32)
    x64 = x32.to(torch.float64)
    mean, var = x64.mean(0), x64.var(0, unbiased=False)
    y_ref = (x64 - mean) / torch.sqrt(var + EPS)
    xd = x32.to(device)
    y, cache = batch_norm_train(xd, None, None, axis=1, eps=EPS)
    y_t = torch.nn.functional.batch_norm(xd, None, None, training=True, eps=EPS)

    def err(t):
        return float((t.cpu().to(torch.float64) - y_ref).abs().max())

    return {"ours": err(y), "ref": err(y_t), "stats_dtype": str(cache.mean.dtype)}


# ------------------------------------------------------------------------------ output
def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict], ref_name: str | None) -> str:
    """A Markdown table of times (ms, minimum of repeats) and ratios.

    Parameters
    ----------
    rows : list of dict
        From :func:`run_torch` or :func:`run_cupy`.
    ref_name : str or None
        Name of the reference column (``"cuDNN"``, ``"torch CPU"``); None: no such column.
    """
    head = ["case", "dtype", "pass", "ours ms", "copy ms", "ours / copy"]
    if ref_name is not None:
        head[5:5] = [f"{ref_name} ms"]
        head += [f"ours / {ref_name}", f"{ref_name} / copy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lead = [r["case"], r["dtype"], r["pass"]]
        if "error" in r:
            lines.append("| " + " | ".join(lead + [f"FAILED: {r['error']}"]) + " |")
            continue
        o, c, f = r["ours"], r["copy"], r.get("ref")
        cells = lead + [_fmt(o * 1e3, ".3f"), _fmt(c * 1e3, ".3f"), _fmt(o / c, ".2f")]
        if ref_name is not None:
            cells[5:5] = [_fmt(f * 1e3, ".3f")]
            cells += [_fmt(o / f, ".2f"), _fmt(f / c, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_device(device: torch.device) -> dict[str, object]:
    """Device name and library versions."""
    info: dict[str, object] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_enabled"] = torch.backends.cudnn.enabled
    else:
        info["name"] = f"{platform.processor() or platform.machine()} CPU"
        info["threads"] = torch.get_num_threads()
    return info


# -------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
    parser.add_argument(
        "--quick", action="store_true", help="3 repeats and 1 warm-up (a smoke test)"
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    parser.add_argument("--no-cupy", action="store_true", help="skip the CuPy table")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    return args


def _import_cupy(device: torch.device, skip: bool):
    if skip or device.type != "cuda":
        return None, "skipped" if skip else "needs a CUDA device"
    try:
        import cupy
    except ImportError:
        return None, "not importable"
    return cupy, f"cupy {cupy.__version__}"


def _print_info(info: dict, numerics: dict) -> None:
    print(", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"statistics dtype (cache.mean.dtype): {numerics['stats_dtype']}")
    if "error" in numerics:
        print(f"numerics check FAILED to run: {numerics['error']}")
    verdict = "ok" if numerics["ours"] < NUMERICS_TOL else "FAILED"
    print(
        f"numerics at mean 1e6, std 1, float32 (4096, 64): max |y - y_ref| "
        f"ours {numerics['ours']:.3e} ({verdict}, < {NUMERICS_TOL:g}), "
        f"torch.nn.functional.batch_norm {numerics['ref']:.3e}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the checks and benchmarks; return the exit status."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = describe_device(device)
    try:
        numerics = large_offset_errors(device)
    except Exception as exc:  # noqa: BLE001 - report it, still time the cases
        nan = float("nan")
        error = f"{type(exc).__name__}: {exc}"
        numerics = {"ours": nan, "ref": nan, "stats_dtype": "unknown", "error": error}
    _print_info(info, numerics)
    ref_name = "cuDNN" if device.type == "cuda" else f"torch {device.type.upper()}"
    print(f"\n{ref_name} = torch.nn.functional.batch_norm; ms = minimum of {args.repeats}")
    rows = run_torch(device, args.repeats, args.warmup)
    print(format_table(rows, ref_name))
    cp, cp_note = _import_cupy(device, args.no_cupy)
    cp_rows = run_cupy(cp, device, args.repeats, args.warmup) if cp is not None else []
    print(f"\nCuPy ({cp_note}):")
    if cp_rows:
        print(format_table(cp_rows, None))
    if args.json:
        result = {"info": info, "numerics": numerics, "torch": rows, "cupy": cp_rows}
        with open(args.json, "w") as f:
            json.dump({**result, "repeats": args.repeats, "ref": ref_name}, f, indent=1)
    failed = [r for r in rows + cp_rows if "error" in r]
    ok = numerics["ours"] < NUMERICS_TOL and not failed
    if not ok:
        print(f"\nFAILED: numerics {numerics['ours']:.3e}; {len(failed)} case(s) failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
