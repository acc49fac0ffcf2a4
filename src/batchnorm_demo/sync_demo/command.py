"""``batchnorm sync-demo``: its arguments (:func:`add_parser`) and its body
(:func:`run_sync_demo`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .._cli_types import path, positive_int
from .._common import check_out, notice_once
from .._progress import Progress

__all__ = ["add_parser", "run_sync_demo"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``sync-demo`` subcommand to ``sub`` (the parser's subparsers); return it."""
    sync = sub.add_parser(
        "sync-demo",
        help="synchronized BN over MPI: mpiexec -n R batchnorm sync-demo",
        description="SyncBN over the ranks of an MPI job against one process, local BN "
        "against ghost BN, the small-batch effect (local BN, SyncBN and local BatchRenorm at "
        "per-rank batches down to 2) and the cost; rank 0 writes the report.",
    )
    sync.add_argument(
        "--out",
        type=path("--out"),
        default="sync-demo",
        help="output folder (default: sync-demo)",
    )
    sync.add_argument(
        "--steps",
        type=positive_int("--steps"),
        default=None,
        help="steps per small-batch run (default 1000)",
    )
    sync.add_argument(
        "--seeds", type=positive_int("--seeds"), default=None, help="number of seeds (default 3)"
    )
    sync.add_argument("--quiet", action="store_true", help="no progress output")
    sync.set_defaults(func=run_sync_demo)
    return sync


def run_sync_demo(args: argparse.Namespace) -> int:
    """``batchnorm sync-demo``: the MPI experiments; rank 0 writes the report.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments (``out``, ``steps``, ``seeds``, ``quiet``).

    Returns
    -------
    int
        The exit status, 0 (an error raises, the same on every rank).
    """
    from .._ranks import collectively
    from ..data import load_dataset
    from ..experiments.sync import SyncConfig, run, world
    from ..report.sync import write_sync_report
    from ..warmup import notices_through

    comm = world()
    rank0 = comm.Get_rank() == 0
    # rank 0 checks --out before any work, every rank loads the data; a failure anywhere is
    # the same error on every rank (no rank is left waiting in a collective), printed once
    collectively(comm, lambda: check_out(args.out) if rank0 else None, "checking --out")
    config = SyncConfig()
    if args.steps is not None:
        config = replace(config, small_batch_steps=args.steps)
    if args.seeds is not None:
        config = replace(config, seeds=args.seeds)
    data = collectively(comm, lambda: load_dataset("mnist-subset"), "loading the data")
    if rank0:
        print(
            f"sync-demo on {comm.Get_size()} rank(s); dataset: {data.description}", file=sys.stderr
        )
    # rank 0 says it once; the other ranks compile the same kernels silently
    watch = notices_through(notice_once() if rank0 else lambda: None)
    progress = None if args.quiet or not rank0 else Progress("sync-demo", unit="step")
    try:
        with watch:
            results = run(config, data, comm=comm, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if rank0:
        _print_summary(write_sync_report(results, args.out), config, args.out)
    return 0


def _print_summary(s: dict, config, out: str) -> None:
    """The report's numbers, a few lines on stdout (rank 0)."""
    print(
        f"SyncBN vs one process: max parameter difference after "
        f"{config.equivalence_steps} steps {s['sync_vs_single_process_max_param_diff']:.3g}"
        f"; local BN vs GhostBatchNorm: {s['local_vs_ghost_max_param_diff']:.3g}"
    )
    for row in s["small_batches"]:
        renorm = f", BatchRenorm {100 * row['renorm_mean']:.1f}%" if "renorm_mean" in row else ""
        print(
            f"per-rank batch {row['per_rank_batch']:>3}: local BN "
            f"{100 * row['local_bn_mean']:.1f}%, SyncBN {100 * row['sync_bn_mean']:.1f}%" + renorm
        )
    if "renorm_fixes_tiny_local_batches" in s:
        print(
            f"BatchRenorm fixes tiny local batches: {s['renorm_fixes_tiny_local_batches']}"
            f"; {s['renorm_why']}"
        )
    print(
        f"time/step local {s['local_median_step_ms']:.2f} ms, sync "
        f"{s['sync_median_step_ms']:.2f} ms; bytes/step local "
        f"{s['local_bytes_per_step']:,.0f}, sync {s['sync_bytes_per_step']:,.0f}"
    )
    print(
        f"wall time {s['wall_seconds']:.1f} s; wrote {out}/results.json, report.md, "
        "report.html and figures"
    )
