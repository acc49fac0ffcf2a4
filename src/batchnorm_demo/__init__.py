"""batchnorm_demo: the demo, benchmark and command line around the :mod:`batchnorm` library.

The ``batchnorm`` command (:mod:`batchnorm_demo.cli`, the parser and ``main``) has one
subpackage per subcommand, each with a ``command`` module holding the subcommand's arguments
(``add_parser``) and its body (``run_<name>``):

* ``demo`` (:mod:`batchnorm_demo.demo`): the experiments of :mod:`batchnorm_demo.experiments`,
  the report of :mod:`batchnorm_demo.report`;
* ``bench`` (:mod:`batchnorm_demo.bench`): the kernel benchmark, and the framework
  comparisons of ``benchmarks/`` with ``--torch`` / ``--jax``;
* ``warmup`` (:mod:`batchnorm_demo.warmup`): compile the numba kernels, and the compile
  watching the other commands use;
* ``inspect`` (:mod:`batchnorm_demo.inspect`): the library's
  :func:`batchnorm.diagnostics.describe_checkpoint`;
* ``sync-demo`` (:mod:`batchnorm_demo.sync_demo`): :mod:`batchnorm_demo.experiments.sync`,
  :mod:`batchnorm_demo.report.sync`.

What several commands share stays at the top: the argument types (``_cli_types``), the output
folder check and compile notice (``_common``), progress (``_progress``), stop signals
(``_stop``), MPI ranks (``_ranks``), atomic writes (``_atomic``), number formatting
(``_format``, ``_table_render``) and the data sets (``data``).

The demo uses the library only through its public modules and names; the library never
imports the demo (``tests/test_demo_boundary.py`` checks both).
"""
