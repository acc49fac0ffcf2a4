"""``batchnorm bench``: the kernel benchmark (:mod:`.suite`, with its cases in :mod:`.cases`,
its timings in :mod:`.timing` and its tables in :mod:`.table`), the framework comparisons
that ``--torch`` and ``--jax`` run (:mod:`.frameworks`), and the subcommand (:mod:`.command`).

Benchmarks have two homes, by who runs them: what the ``batchnorm bench`` command runs lives
here, in the installed package; standalone scripts (``benchmarks/*.py`` in the repository:
the framework comparisons, the GPU run, the before/after comparison) stay in ``benchmarks/``
and are run as ``python benchmarks/<file>.py``.
"""

from .cases import CASES, SMALL_CASES, Case, goal
from .suite import compile_times, run_bench
from .table import format_bench

__all__ = ["CASES", "SMALL_CASES", "Case", "compile_times", "format_bench", "goal", "run_bench"]
