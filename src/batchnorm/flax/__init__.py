"""Batch normalization modules for Flax, thin over :mod:`batchnorm.jax`:
:mod:`batchnorm.flax.linen` and :mod:`batchnorm.flax.nnx`, each with ``BatchNorm`` (a
drop-in for Flax's, with this library's numerics) and ``BatchRenorm`` (Ioffe 2017).

Imports Flax (install the ``[flax]`` extra); ``import batchnorm`` does not. Import the
submodule you use: ``from batchnorm.flax.linen import BatchNorm``.
"""

from . import linen, nnx

__all__ = ["linen", "nnx"]
