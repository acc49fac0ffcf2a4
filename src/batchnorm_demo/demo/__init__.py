"""``batchnorm demo``: the experiments that test the articles' claims (:mod:`.command`); the
experiments are in :mod:`batchnorm_demo.experiments`, the report in
:mod:`batchnorm_demo.report`."""
