"""The Array API path on torch CPU against PyTorch's own batch-norm kernel.

Usage: python benchmarks/xp_torch.py [--repeats N] [--shape N C H W]

Times ``batchnorm.core.passes.train`` and ``passes.backward`` on a float32 NCHW tensor
(feature axis 1) against ``torch.nn.functional.batch_norm(training=True)`` and torch's
autograd backward of it (gradients of x, weight and bias). The four calls are interleaved
within each repeat (these machines are shared and noisy) and each is reported as its
minimum over the repeats; ratios are ours / torch's.
"""

from __future__ import annotations

import argparse
import time

import array_api_compat
import torch

from batchnorm.core import passes


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Minimum seconds per call of each of the four functions over ``repeats``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2.0 + 3.0
    dy = torch.randn(shape, generator=gen)
    c = shape[1]
    w, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    xp = array_api_compat.array_namespace(x)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))

    def ours_fwd():
        return passes.train(xp, x, 1, w, b, 1e-5)

    def torch_fwd():
        return torch.nn.functional.batch_norm(xg, None, None, wg, bg, training=True, eps=1e-5)

    best = {"ours_fwd": 1e9, "torch_fwd": 1e9, "ours_bwd": 1e9, "torch_bwd": 1e9}
    for _ in range(repeats):
        t, (_, mean, var, inv) = _timed(ours_fwd)
        best["ours_fwd"] = min(best["ours_fwd"], t)
        t, y = _timed(torch_fwd)
        best["torch_fwd"] = min(best["torch_fwd"], t)
        t, _ = _timed(lambda: passes.backward(xp, x, dy, 1, mean, var, inv, w, True))  # noqa: B023
        best["ours_bwd"] = min(best["ours_bwd"], t)
        t, _ = _timed(lambda: torch.autograd.grad(y, (xg, wg, bg), dy))  # noqa: B023
        best["torch_bwd"] = min(best["torch_bwd"], t)
    return best


def main() -> None:
    """Run the comparison and print the times and ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 64, 56, 56])
    args = parser.parse_args()
    best = run(tuple(args.shape), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {args.shape}")
    for k in ("fwd", "bwd"):
        o, t = best[f"ours_{k}"], best[f"torch_{k}"]
        print(f"{k}: ours {o * 1e3:7.2f} ms  torch {t * 1e3:7.2f} ms  ratio {o / t:5.2f}")
    o = best["ours_fwd"] + best["ours_bwd"]
    t = best["torch_fwd"] + best["torch_bwd"]
    print(f"fwd+bwd: ours {o * 1e3:7.2f} ms  torch {t * 1e3:7.2f} ms  ratio {o / t:5.2f}")


if __name__ == "__main__":
    main()
