"""The stateful norm layers: the base split by concern, and :class:`BatchNorm`.

* :mod:`.args`: the argument record (validated constructor arguments, config, repr);
* :mod:`.state`: versioned state dicts, ``save``/``load``;
* :mod:`.base`: :class:`NormLayer`: modes, reducer, the forward and backward templates,
  the atomic commit;
* :mod:`.batchnorm`: :class:`BatchNorm`.

The siblings (:class:`batchnorm.BatchRenorm`, :class:`batchnorm.GhostBatchNorm`,
:class:`batchnorm.FrozenBatchNorm`) add only their maths.
"""

from .base import NormLayer
from .batchnorm import BatchNorm

__all__ = ["BatchNorm", "NormLayer"]
