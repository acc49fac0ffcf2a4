"""Speed of this checkout against an earlier release, in one interleaved run.

Loads the earlier release's ``src/batchnorm`` (a git worktree, e.g. made with
``git worktree add --detach ../old 08ed06c``) under the module name ``batchnorm._old`` beside
the current ``batchnorm``, then times the same calls of both, alternating old and new
inside every repeat, and reports the minimum of the repeats and the ratio new / old:

* the public kernels on NumPy arrays (train, eval, backward; backend "auto");
* a ``BatchNorm`` layer's forward + backward on small float64 batches (the demo's
  (60, 100)), beside the article's plain NumPy code for the same maths.

Usage: ``python benchmarks/before_after.py OLD_CHECKOUT [--repeats 30] [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

import batchnorm as new


def load_old(checkout: Path):
    """The earlier release's package, imported as ``batchnorm._old`` (inside the name
    ``batchnorm.``, which the layers' registration of library classes requires)."""
    init = checkout / "src" / "batchnorm" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "batchnorm._old", init, submodule_search_locations=[str(init.parent)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["batchnorm._old"] = mod
    spec.loader.exec_module(mod)
    return mod


def interleaved(fns: dict, repeats: int, inner: int) -> dict:
    """Minimum seconds per call of each function, the functions alternating per repeat."""
    for f in fns.values():  # warm up (compilation, caches)
        f()
        f()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / inner)
    return best


def kernel_fns(mod, x, dy, axis):
    """train / eval / backward of one package on one array."""
    c = x.shape[axis]
    g, b = np.ones(c), np.zeros(c)
    _, cache = mod.batch_norm_train(x, g, b, axis=axis)
    rm, rv = cache.mean.copy(), cache.var.copy()
    return {
        "train": lambda: mod.batch_norm_train(x, g, b, axis=axis),
        "eval": lambda: mod.batch_norm_eval(x, g, b, rm, rv, axis=axis),
        "backward": lambda: mod.batch_norm_backward(dy, cache),
    }


def naive(x, gamma, beta, dy, eps=1e-5):
    """The article's NumPy code for one forward + backward (batch statistics)."""
    mu = x.mean(0)
    xc = x - mu
    var = (xc**2).mean(0)
    inv = 1.0 / np.sqrt(var + eps)
    xh = xc * inv
    _ = gamma * xh + beta
    m = x.shape[0]
    dxh = dy * gamma
    return inv / m * (m * dxh - dxh.sum(0) - xh * (dxh * xh).sum(0))


def layer_fn(mod, x, dy):
    """A fresh layer's forward + backward on ``x`` (one training step)."""
    layer = mod.BatchNorm(x.shape[1])

    def step():
        layer.forward(x)
        layer.backward(dy)

    return step


def main(argv=None) -> int:
    """Run the comparison and print Markdown tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    old = load_old(a.old)
    rng = np.random.default_rng(0)
    cases = [
        ("NCHW f32", (32, 64, 56, 56), 1, "float32"),
        ("NHWC f32", (32, 56, 56, 64), -1, "float32"),
        ("(N, D) f32", (1024, 4096), 1, "float32"),
        ("NCHW cache-sized f32", (16, 64, 16, 16), 1, "float32"),
    ]
    if not a.quick:
        cases += [
            ("NCHW f64", (32, 64, 56, 56), 1, "float64"),
            ("NCHW f16", (32, 64, 56, 56), 1, "float16"),
        ]
    print("| array | pass | old ms | new ms | new / old |\n|---|---|---|---|---|")
    for name, shape, axis, dt in cases:
        x = rng.normal(size=shape).astype(dt)
        dy = rng.normal(size=shape).astype(dt)
        fo, fn = kernel_fns(old, x, dy, axis), kernel_fns(new, x, dy, axis)
        inner = 1 if x.nbytes > 4e6 else 20
        for pass_ in fo:
            t = interleaved({"old": fo[pass_], "new": fn[pass_]}, a.repeats, inner)
            print(
                f"| {name} | {pass_} | {t['old'] * 1e3:.3f} | {t['new'] * 1e3:.3f} | "
                f"{t['new'] / t['old']:.3f} |"
            )
    print(
        "\n| small float64 batch | old layer us | new layer us | article code us | new / old |"
        " new / article |\n|---|---|---|---|---|---|"
    )
    for shape in [(60, 100), (256, 512)]:
        x = rng.normal(size=shape)
        dy = rng.normal(size=shape)
        g, b = np.ones(shape[1]), np.zeros(shape[1])
        fns = {
            "old": layer_fn(old, x, dy),
            "new": layer_fn(new, x, dy),
            "article": lambda x=x, g=g, b=b, dy=dy: naive(x, g, b, dy),
        }
        t = interleaved(fns, a.repeats, 200)
        print(
            f"| {shape} | {t['old'] * 1e6:.1f} | {t['new'] * 1e6:.1f} | {t['article'] * 1e6:.1f} |"
            f" {t['new'] / t['old']:.3f} | {t['new'] / t['article']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
