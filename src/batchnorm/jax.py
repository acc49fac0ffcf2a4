"""Batch normalization for JAX: pure functions in Flax's conventions, with this library's
numerics, its hand-written backward pass, and exact statistics across devices.

Imports JAX (install the ``[jax]`` extra); ``import batchnorm`` does not. See
:mod:`batchnorm.adapters.jax.functions` for the conventions.
"""

from .adapters.jax import batch_norm, batch_renorm, ghost_batch_norm

__all__ = ["batch_norm", "batch_renorm", "ghost_batch_norm"]
