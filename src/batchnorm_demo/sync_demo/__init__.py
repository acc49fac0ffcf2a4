"""``batchnorm sync-demo``: synchronized BN over MPI (:mod:`.command`); the experiments are in
:mod:`batchnorm_demo.experiments.sync`, the report in :mod:`batchnorm_demo.report.sync`."""
