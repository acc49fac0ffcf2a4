"""batchnorm_demo: the demo, benchmark and command line around the :mod:`batchnorm` library.

The ``batchnorm`` command (:mod:`batchnorm_demo.cli`): ``demo`` (the experiments of
:mod:`batchnorm_demo.experiments`, the report of :mod:`batchnorm_demo.report`), ``bench``
(:mod:`batchnorm_demo.bench`), ``inspect`` (the library's
:func:`batchnorm.diagnostics.describe_checkpoint`) and ``sync-demo``
(:mod:`batchnorm_demo.experiments.sync`, :mod:`batchnorm_demo.report.sync`).

The demo uses the library only through its public modules and names; the library never
imports the demo (``tests/test_demo_boundary.py`` checks both).
"""
