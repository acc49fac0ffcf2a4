"""``flax.linen`` batch normalization with this library's numerics: :class:`BatchNorm`
(a drop-in for ``flax.linen.BatchNorm``) and :class:`BatchRenorm`. See
:mod:`batchnorm.adapters.flax.linen`."""

from ..adapters.flax.linen import BatchNorm, BatchRenorm

__all__ = ["BatchNorm", "BatchRenorm"]
