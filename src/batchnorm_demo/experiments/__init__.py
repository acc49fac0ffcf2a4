"""The demo's experiments: the articles' claims (:mod:`.ioffe`, :mod:`.runner`,
:mod:`.assess`) and synchronized BN over MPI (:mod:`.sync`)."""
