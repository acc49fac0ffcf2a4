"""``flax.nnx`` batch normalization with this library's numerics: :class:`BatchNorm`
(a drop-in for ``flax.nnx.BatchNorm``) and :class:`BatchRenorm`. See
:mod:`batchnorm.adapters.flax.nnx`."""

from ..adapters.flax.nnx import BatchNorm, BatchRenorm

__all__ = ["BatchNorm", "BatchRenorm"]
