"""The one model walker: the modules of a model, and its norm layers.

A model is a module or a container with a ``modules`` list or tuple (e.g.
:class:`batchnorm.nn.Sequential`), searched recursively. Every tool (recalibration,
synchronization, gradient reduction, parameter broadcast) walks a model with these.
"""

from __future__ import annotations

from .layers import NormLayer

__all__ = ["modules", "norm_layers"]


def modules(model: object) -> list:
    """The leaf modules of ``model`` in order (``model`` itself when it has no ``modules``)."""
    children = getattr(model, "modules", None)
    if not isinstance(children, (list, tuple)):
        return [model]
    out = []
    for m in children:
        out.extend(modules(m))
    return out


def norm_layers(model: object) -> list[NormLayer]:
    """Every norm layer of ``model`` that normalizes with batch statistics in training
    (:class:`batchnorm.FrozenBatchNorm` layers, which never do, are skipped)."""
    return [m for m in modules(model) if isinstance(m, NormLayer) and m.uses_batch_stats]
