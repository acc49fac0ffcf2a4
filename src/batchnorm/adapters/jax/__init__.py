"""The JAX adapter: pure batch-norm functions with the library's numerics and hand-written
backward pass (``jax.custom_vjp``), usable under ``jit``, ``vmap``, ``grad``, ``pmap`` and
``shard_map``. Public as :mod:`batchnorm.jax`; see :mod:`.functions`."""

from .functions import batch_norm, batch_renorm, ghost_batch_norm

__all__ = ["batch_norm", "batch_renorm", "ghost_batch_norm"]
