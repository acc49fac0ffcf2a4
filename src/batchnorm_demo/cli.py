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
from ._cli_types import HelpFormatter, Parser
from ._stop import Stopped, stop_received, stop_signals_raise

__all__ = ["entry", "main"]

COMMANDS = ("demo", "bench", "warmup", "inspect", "sync-demo")


def build_parser() -> argparse.ArgumentParser:
    """The ``batchnorm`` argument parser (subcommands demo, bench, warmup, inspect, sync-demo);
    each subcommand's arguments are added by its package's ``command.add_parser``.

    Returns
    -------
    argparse.ArgumentParser
    """
    from batchnorm import __version__

    # the subcommands (they import NumPy and the library)
    from .bench.command import add_parser as bench
    from .demo.command import add_parser as demo
    from .inspect.command import add_parser as inspect
    from .sync_demo.command import add_parser as sync_demo
    from .warmup.command import add_parser as warmup

    parser = Parser(
        prog="batchnorm",
        formatter_class=HelpFormatter,
        description="Batch Normalization by hand in NumPy: run the demo, benchmark the kernels, "
        "inspect saved layers.",
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in (demo, bench, warmup, inspect, sync_demo):  # the order of the help
        add_parser(sub)
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
