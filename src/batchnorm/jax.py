"""Batch normalization for JAX: pure functions in Flax's conventions, with this library's
numerics, its hand-written backward pass, and exact statistics across devices.

Imports JAX (install the ``[jax]`` extra); ``import batchnorm`` does not. See
:mod:`batchnorm.adapters.jax.functions` for the conventions.
"""

try:  # a missing framework gets the install line, not a bare ModuleNotFoundError
    import jax as _jax  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name != "jax":
        raise
    raise ModuleNotFoundError(
        "batchnorm.jax needs JAX: pip install 'batchnorm[jax]' (or pip install 'jax[cpu]')",
        name="jax",
    ) from exc
from .adapters.jax import batch_norm, batch_renorm, ghost_batch_norm

__all__ = ["batch_norm", "batch_renorm", "ghost_batch_norm"]
