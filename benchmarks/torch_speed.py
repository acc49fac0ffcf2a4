"""batchnorm.torch against torch.nn on CPU, float32: training (forward + backward) and
evaluation (forward under ``torch.no_grad``), interleaved, minimum of repeats.

Run ``python benchmarks/torch_speed.py`` (``--help`` for options); ``main(argv)`` returns
the rows it printed. Each repeat times ours and torch's back to back (order alternating),
so both see the same machine load; the table gives the minimum over repeats and the ratio
ours / torch (< 1: ours is faster). For the single layers the last column gives the
accuracy of both far from zero: the largest ``|y - reference|`` of a training forward on
the same input plus 1e6 (std 1), the reference computed in float64 ("torch / ours").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

import batchnorm.torch as bt

CL = torch.channels_last
LAYERS = [
    ("BatchNorm1d (64, 256)", "1d", (64, 256), None),
    ("BatchNorm1d (256, 1024)", "1d", (256, 1024), None),
    ("BatchNorm2d (8, 32, 16, 16)", "2d", (8, 32, 16, 16), None),
    ("BatchNorm2d (32, 256, 14, 14) channels_last", "2d", (32, 256, 14, 14), CL),
    ("BatchNorm2d (32, 64, 56, 56) NCHW", "2d", (32, 64, 56, 56), None),
    ("BatchNorm2d (32, 64, 56, 56) channels_last", "2d", (32, 64, 56, 56), CL),
    ("BatchNorm2d (128, 64, 56, 56) NCHW", "2d", (128, 64, 56, 56), None),
    ("BatchNorm2d (128, 64, 56, 56) channels_last", "2d", (128, 64, 56, 56), CL),
]


def _layer(ns, kind: str, c: int) -> torch.nn.Module:
    return (ns.BatchNorm1d if kind == "1d" else ns.BatchNorm2d)(c)


def _block(ns, cin: int, cout: int, stride: int) -> torch.nn.Module:
    conv = torch.nn.Conv2d
    body = torch.nn.Sequential(
        conv(cin, cout, 3, stride, 1, bias=False),
        ns.BatchNorm2d(cout),
        torch.nn.ReLU(),
        conv(cout, cout, 3, 1, 1, bias=False),
        ns.BatchNorm2d(cout),
    )
    short = None
    if stride != 1 or cin != cout:
        short = torch.nn.Sequential(conv(cin, cout, 1, stride, bias=False), ns.BatchNorm2d(cout))
    return _Residual(body, short)


class _Residual(torch.nn.Module):
    def __init__(self, body, short) -> None:
        super().__init__()
        self.body, self.short = body, short

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return torch.relu(self.body(x) + s)


def resnet18(ns) -> torch.nn.Module:
    """A ResNet-18-shaped network (for 64x64 inputs) with ``ns``'s BatchNorm2d."""
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), ns.BatchNorm2d(64), torch.nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_block(ns, cin, cout, stride), _block(ns, cout, cout, 1)]
        cin = cout
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, 10)]
    return torch.nn.Sequential(*layers)


def _steps(module: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The timed calls: a training step (forward, and the backward to the input and every
    parameter, returned by ``torch.autograd.grad`` as a layer inside a network hands its
    input gradient on: no ``.grad`` accumulation pass, which costs both sides the same) and
    an evaluation forward."""
    xt = x.clone().requires_grad_()
    dy = torch.randn_like(module.train()(x))
    wrt = [xt, *module.parameters()]

    def train() -> None:
        module.train()
        torch.autograd.grad(module(xt), wrt, dy)

    def evaluate() -> None:
        module.eval()
        with torch.no_grad():
            module(x)

    return {"train": train, "eval": evaluate}


def error(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest ``|y - reference|`` of a training forward of ``module`` on ``x + 1e6`` (the
    input's layout kept), the reference normalized in float64 with the batch statistics."""
    xo = (x + 1e6).contiguous(memory_format=_format(x))
    dims = [d for d in range(x.dim()) if d != 1]
    with torch.no_grad():
        y = module.train()(xo).double()
        xd = xo.double()
        ref = (xd - xd.mean(dims, keepdim=True)) / (
            xd.var(dims, unbiased=False, keepdim=True) + module.eps
        ).sqrt()
        if module.weight is not None:
            shape = [1, -1] + [1] * (x.dim() - 2)
            ref = ref * module.weight.double().view(shape) + module.bias.double().view(shape)
    return float((y - ref).abs().max())


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=CL):
        return CL
    return torch.contiguous_format


def _time(fn: Callable[[], None], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def _number(*fns: Callable[[], None]) -> int:
    """Calls per timing so that one timing of the slower function takes about 2 ms (short
    timings: on a loaded machine a quiet 2 ms comes far more often than a quiet 20 ms)."""
    t = 0.0
    for fn in fns:
        fn()
        t = max(t, min(_time(fn, 1) for _ in range(3)))
    return max(1, min(200, int(0.002 / max(t, 1e-7))))


def compare(
    ours: torch.nn.Module, theirs: torch.nn.Module, x, repeat: int, median: bool = False
) -> dict:
    """``{mode: (ours_s, torch_s)}``: minimum (``median``: median) seconds per call over
    ``repeat`` interleaved repeats."""
    a, b = _steps(ours, x), _steps(theirs, x)
    out = {}
    for mode in ("train", "eval"):
        n = _number(a[mode], b[mode])
        times: tuple[list, list] = ([], [])
        for r in range(repeat):
            order = ((0, a[mode]), (1, b[mode])) if r % 2 == 0 else ((1, b[mode]), (0, a[mode]))
            for i, fn in order:
                times[i].append(_time(fn, n))
        out[mode] = tuple(statistics.median(t) if median else min(t) for t in times)
    return out


def _cases(quick: bool, network: bool, layers: bool = True):
    for name, kind, shape, fmt in (LAYERS[:3] if quick else LAYERS) if layers else []:
        x = torch.randn(shape)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        yield name, _layer(bt, kind, shape[1]), _layer(torch.nn, kind, shape[1]), x
    if network:
        x = torch.randn(32, 3, 64, 64)
        yield "ResNet-18-shaped, batch 32, 64x64, NCHW", resnet18(bt), resnet18(torch.nn), x
        xc = x.contiguous(memory_format=CL)
        ours, theirs = resnet18(bt).to(memory_format=CL), resnet18(torch.nn).to(memory_format=CL)
        yield "ResNet-18-shaped, batch 32, 64x64, channels_last", ours, theirs, xc


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the comparison and print a Markdown table; returns its rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--repeat", "--repeats", type=int, default=60, help="interleaved repeats (default 60)"
    )
    p.add_argument("--quick", action="store_true", help="only the three small layers")
    p.add_argument("--no-network", action="store_true", help="skip the ResNet-18 rows")
    p.add_argument("--only-network", action="store_true", help="only the ResNet-18 rows")
    p.add_argument(
        "--median",
        action="store_true",
        help="the median over repeats instead of the minimum (on a loaded machine the "
        "minimum hides the wait of a parallel launch for a free core)",
    )
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
        f"{os.cpu_count()} cores, load average {load:.1f} at the start, "
        f"{'median' if args.median else 'minimum'} of repeats"
    )
    print(
        "| input | train ours / torch (ms) | ratio | eval ours / torch (ms) | ratio "
        "| err far from zero torch / ours |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    network = not (args.no_network or args.quick)
    for name, ours, theirs, x in _cases(args.quick, network, not args.only_network):
        rep = max(3, args.repeat // 12) if "ResNet" in name else args.repeat
        res = compare(ours, theirs, x, rep, args.median)
        row = {"case": name}
        cells = []
        for mode, (a, b) in res.items():
            row[mode] = {"ours_ms": a * 1e3, "torch_ms": b * 1e3, "ratio": a / b}
            cells += [f"{a * 1e3:.3f} / {b * 1e3:.3f}", f"{a / b:.2f}"]
        if "ResNet" in name:
            cells.append("")
        else:
            row["err"] = {"ours": error(ours, x), "torch": error(theirs, x)}
            cells.append(f"{row['err']['torch']:.2g} / {row['err']['ours']:.2g}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        rows.append(row)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
