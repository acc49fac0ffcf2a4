"""Run the full benchmark suite and write benchmarks/results.json and benchmarks/results.md.

Usage: python benchmarks/run_full.py [--repeats N]

Each ratio is a minimum over repeats measured side by side in one run (these machines are
shared and noisy): our NumPy and numba backends and PyTorch's CPU kernel against np.copyto of
the same array.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from batchnorm_demo.bench import format_bench, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    result = run_bench("full", repeats=args.repeats)
    here = Path(__file__).resolve().parent
    (here / "results.json").write_text(json.dumps(result, indent=1))
    table = format_bench(result)
    (here / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
