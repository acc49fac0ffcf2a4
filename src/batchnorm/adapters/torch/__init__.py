"""PyTorch modules on this library's kernels (public as :mod:`batchnorm.torch`)."""

from __future__ import annotations

from .function import BatchNormOp, GhostOp, NormFunction, RenormOp
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, NormBase

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormOp",
    "GhostOp",
    "NormBase",
    "NormFunction",
    "RenormOp",
]
