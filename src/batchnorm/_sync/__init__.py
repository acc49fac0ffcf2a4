"""The MPI reducer: the header protocol (:mod:`.protocol`) and :class:`.reducer.MpiReducer`.

The only package that talks to mpi4py (imported when a communicator is first used). The
public facade is :mod:`batchnorm.distributed`.
"""
