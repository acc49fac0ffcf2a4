"""Thin framework adapters over the library's pure kernels and reducers (level 7): this
library's kernels as PyTorch modules (:mod:`batchnorm.torch`) and JAX functions
(:mod:`batchnorm.jax`).

Importing this package imports no framework; each subpackage imports its framework only when
it is imported itself, and ``import batchnorm`` imports neither.
"""
