"""Run the full benchmark suite and write results.json and results.md into a folder.

Usage: .venv/bin/python benchmarks/run_full.py [--repeats N] [--out DIR]

The results go to ``bench-out/`` in the current folder by default (listed in .gitignore), so
a run never rewrites the tracked ``benchmarks/results.*`` that the evidence page quotes; pass
``--out benchmarks`` to refresh those on purpose.

Each ratio is a minimum over repeats measured side by side in one run (these machines are
shared and noisy): our NumPy and numba backends and PyTorch's CPU kernel against np.copyto of
the same array.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from batchnorm_demo.bench import format_bench, run_bench

DEFAULT_OUT = "bench-out"


def _repeats(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--repeats must be an integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--repeats must be >= 1; got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of this script.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=_repeats, default=10, help="repeats per timing")
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="folder for results.json and results.md (created if missing)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the full suite and write its results (see the module docstring).

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).
    """
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_bench("full", repeats=args.repeats)
    table = format_bench(result)
    for name, text in (("results.json", json.dumps(result, indent=1)), ("results.md", table)):
        tmp = out / f".{name}.partial"
        tmp.write_text(text + ("\n" if name.endswith(".md") else ""))
        tmp.replace(out / name)  # never a half-written file
    print(table)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
