"""``batchnorm demo``: its body (:func:`run_demo`); the arguments are in :mod:`.arguments`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

from .._common import check_out, notice_once
from .._progress import Progress
from . import arguments

__all__ = ["add_parser", "run_demo"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``sub`` (the parser's subparsers); return it."""
    return arguments.add_parser(sub, run_demo)


def _machine() -> dict:
    """Where the demo ran (the report's reproducibility note): CPU, cores, library builds."""
    import platform

    import numba
    import numpy as np

    import batchnorm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "batchnorm": batchnorm.__version__,
    }


def _config(args: argparse.Namespace):
    """The :class:`~batchnorm_demo.experiments.ioffe.IoffeConfig` the flags ask for."""
    from ..experiments.ioffe import IoffeConfig

    config = IoffeConfig.full() if args.full else IoffeConfig()
    if args.steps is not None:
        config = config.scaled(args.steps)
    arguments.check_schedule(args, config.steps)
    if args.eval_every is not None:
        config = replace(config, eval_every=args.eval_every)
    if args.seeds is not None:
        config = replace(config, seeds=args.seeds)
    if args.workers is not None:
        config = replace(config, workers=args.workers)
    return config


def _train(config, data, args: argparse.Namespace) -> dict:
    """Run the experiments with a progress bar and the compile notice; return the results."""
    import numpy as np

    from ..experiments.runner import run
    from ..warmup import notices_through

    notice = notice_once()
    print(
        f"3 arms x {len(config.lrs)} learning rates x {config.seeds} seeds x {config.steps} "
        f"steps, then the small init, the deep network, {config.reg_dataset} and the "
        f"ghost-batch sweep, on {config.workers} worker(s)",
        file=sys.stderr,
    )
    progress = None if args.quiet else Progress("demo", unit="work")
    try:
        # the kernels compile here with one worker, in the workers (which report it) else
        with notices_through(notice):
            return run(
                config,
                np.random.default_rng(args.seed),
                data=data,
                progress=progress,
                on_compile=notice,
            )
    finally:
        if progress is not None:
            progress.close()  # an interrupted bar ends its line before the message


def run_demo(args: argparse.Namespace) -> int:
    """``batchnorm demo``: run the experiments, write the report.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments (see :func:`.arguments.add_parser`).

    Returns
    -------
    int
        The exit status, 0 (a refused input raises ``ValueError`` before any work).
    """
    from ..data import load_dataset
    from ..report import format_table, write_report
    from ..report.summary import summary_text

    arguments.check_dataset_flags(args)
    config = _config(args)
    out = check_out(args.out)
    data = load_dataset(args.dataset, path=args.data, download=args.download, seed=args.seed)
    print(f"dataset: {data.description}", file=sys.stderr)
    start = time.monotonic()
    results = _train(config, data, args)
    results["wall_seconds"] = round(time.monotonic() - start, 1)
    results["seed"] = args.seed
    results["machine"] = _machine()
    summary = write_report(results, out)
    print(format_table(results, summary))
    print()
    print(summary_text(summary["claims"]))  # the report's opening table, for a terminal
    print(
        f"\nwrote {out}/results.json, report.md, report.html and figures "
        f"(training took {results['wall_seconds']:.0f} s)"
    )
    return 0
