"""The stateful norm layers, by composition.

* :mod:`.args`: the argument record, validated argument attributes, the class registry;
* :mod:`.state`: the state record, its validated attributes, versioned state dicts;
* :mod:`.arrays`: the placement record (namespace and device of a layer's arrays);
* :mod:`.sync`: the synchronization record (reducer, timeout, position);
* :mod:`.base`: :class:`NormLayer`, the small base every layer shares (evaluation forward,
  input gradient, state, files);
* :mod:`.training`: :class:`BatchStatsLayer`, the base of the layers that train with batch
  statistics (running update, learnable parameters, synchronization);
* :mod:`.batchnorm`: :class:`BatchNorm`.

The siblings (:class:`batchnorm.BatchRenorm`, :class:`batchnorm.GhostBatchNorm` under
:class:`BatchStatsLayer`; :class:`batchnorm.FrozenBatchNorm` directly under
:class:`NormLayer`) add only their own arguments, state and maths.
"""

from .args import register_layer
from .base import NormLayer
from .batchnorm import BatchNorm, ConventionLayer
from .training import BatchStatsLayer

__all__ = ["BatchNorm", "BatchStatsLayer", "ConventionLayer", "NormLayer", "register_layer"]
