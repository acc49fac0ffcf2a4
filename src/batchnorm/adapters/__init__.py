"""Thin framework adapters over the library's pure kernels and reducers (level 7).

Each subpackage imports its framework; nothing here is imported by ``import batchnorm``.
The public entry points are :mod:`batchnorm.torch` and :mod:`batchnorm.jax`.
"""
