"""``batchnorm bench``: its arguments (:func:`add_parser`) and its body (:func:`run_bench`)."""

from __future__ import annotations

import argparse
import json

from .._cli_types import HelpFormatter, positive_int
from .._common import notice_once
from .._progress import Progress

__all__ = ["add_parser", "run_bench"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``sub`` (the parser's subparsers); return it."""
    bench = sub.add_parser(
        "bench",
        formatter_class=HelpFormatter,
        help="time the kernels against a plain copy and PyTorch's CPU kernel",
        description="Minimum time over repeats of train forward, eval forward and backward "
        "for the NumPy and numba backends and PyTorch's CPU kernel, as ratios to np.copyto "
        "of the same array in the same run. With --torch or --jax, the layers against "
        "torch.nn or flax.linen instead (the scripts of the repository's benchmarks/).",
    )
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument(
        "--full", action="store_true", help="the full suite (100 MB arrays, float16/float64)"
    )
    bench.add_argument(
        "--repeats",
        type=positive_int("--repeats"),
        default=10,
        help="repeats per timing (min taken; passed on to the script with --torch/--jax)",
    )
    which = bench.add_mutually_exclusive_group()
    which.add_argument(
        "--torch",
        action="store_true",
        help="batchnorm.torch.BatchNorm2d against torch.nn.BatchNorm2d "
        "(benchmarks/torch_speed.py; needs a source checkout)",
    )
    which.add_argument(
        "--jax",
        action="store_true",
        help="batchnorm.jax against flax.linen.BatchNorm (benchmarks/jax_flax.py; needs a "
        "source checkout)",
    )
    bench.set_defaults(func=run_bench)
    return bench


def run_bench(args: argparse.Namespace) -> int:
    """``batchnorm bench``: time the kernels, print the table (or JSON); with ``--torch`` or
    ``--jax``, run that framework comparison instead.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments (``json``, ``full``, ``repeats``, ``torch``, ``jax``).

    Returns
    -------
    int
        The exit status, 0.
    """
    flag = "torch" if args.torch else "jax" if args.jax else None
    if flag is not None:
        return _run_framework(flag, args)
    from ..warmup import notices_through
    from . import format_bench
    from . import run_bench as time_kernels

    with notices_through(notice_once()):  # said only when something really compiles
        result = time_kernels(
            "full" if args.full else "quick",
            repeats=args.repeats,
            progress=None if args.json else Progress("bench", unit="case"),
        )
    print(json.dumps(result, indent=1) if args.json else format_bench(result))
    return 0


def _run_framework(flag: str, args: argparse.Namespace) -> int:
    """``bench --torch`` / ``--jax``: the script's ``main`` with ``--repeats``."""
    from .frameworks import run_script

    for given, name in ((args.json, "--json"), (args.full, "--full")):
        if given:
            raise ValueError(
                f"{name} applies to the kernel benchmark, not to --{flag} (its script prints "
                "its own table; run it as a script for its own options)"
            )
    run_script(flag, ["--repeats", str(args.repeats)])
    return 0
