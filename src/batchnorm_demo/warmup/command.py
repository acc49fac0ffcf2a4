"""``batchnorm warmup``: its arguments (:func:`add_parser`) and its body (:func:`run_warmup`)."""

from __future__ import annotations

import argparse

from .._cli_types import HelpFormatter
from .._common import notice_once
from .._progress import Progress

__all__ = ["add_parser", "run_warmup"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``warmup`` subcommand to ``sub`` (the parser's subparsers); return it."""
    warm = sub.add_parser(
        "warmup",
        formatter_class=HelpFormatter,
        help="compile the numba kernels once (they are cached on disk afterwards)",
        description="Compile every numba kernel for float16, float32 and float64 in the "
        "NCHW, (N, D), (N, C, L) and channels-last layouts, for small arrays (serial kernels) "
        "and large ones (parallel kernels), and say how long it took. Later runs load the "
        "kernels from numba's on-disk cache in well under a second.",
    )
    warm.add_argument("--quiet", action="store_true", help="no progress output")
    warm.add_argument(
        "--torch",
        action="store_true",
        help="also build the torch modules' native autograd node now, in the foreground (a "
        "C++ compiler and torch's headers; 30-60 s once per torch version, into the user's "
        "cache; later processes load it from there). Without it, the first eligible call "
        "builds it in the background; this shows a failed build's error and retries it",
    )
    warm.set_defaults(func=run_warmup)
    return warm


def run_warmup(args: argparse.Namespace) -> int:
    """``batchnorm warmup``: compile every numba kernel once, say how long it took.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments (``quiet``, ``torch``).

    Returns
    -------
    int
        The exit status: 0, or 1 when ``--torch`` could not build the native node.
    """
    from batchnorm.backends import AUTO_NUMBA_MIN_SIZE

    from . import DTYPES, notices_through, warmup, warmup_cases

    cases = warmup_cases()
    what = (
        f"{', '.join(DTYPES)} x {', '.join(dict.fromkeys(c.layout for c in cases))}; below "
        f"and above {AUTO_NUMBA_MIN_SIZE:,} elements"
    )
    with notices_through(notice_once()):
        result = warmup(
            DTYPES, cases, progress=None if args.quiet else Progress("warmup", unit="case")
        )
    if result["compiled"]:
        print(
            f"warmup: compiled the numba kernels in {result['seconds']:.1f} s "
            f"({result['compiled']} compilations, {result['calls']} kernel calls: {what}); "
            "cached on disk, later runs load them from there"
        )
    else:
        print(
            f"warmup: every kernel was already cached ({result['calls']} kernel calls: {what}"
            f"; {result['seconds']:.1f} s)"
        )
    return _build_torch_node() if getattr(args, "torch", False) else 0


def _build_torch_node() -> int:
    """``--torch``: build (or load) :mod:`batchnorm.adapters.torch.native`; 1 on failure."""
    import time

    try:
        from batchnorm.adapters.torch import native
    except ImportError as err:
        print(f"warmup --torch: torch cannot be imported ({err})")
        return 1
    start = time.perf_counter()
    try:
        native.build()
        native.prepare_eval()  # the common evaluation entry points, compiled ahead
    except Exception as err:  # noqa: BLE001 - a compiler's or loader's error, reported
        print(f"warmup --torch: the native node could not be built: {err!s:.2000}")
        return 1
    print(
        f"warmup --torch: the native torch node is ready in {native.cache_dir()} "
        f"({time.perf_counter() - start:.1f} s); torch's BatchNorm drop-ins use it from now on"
    )
    return 0
