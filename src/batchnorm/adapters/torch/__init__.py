"""PyTorch modules on this library's kernels (public as :mod:`batchnorm.torch`)."""

from __future__ import annotations

from . import native
from .convert import convert_batchnorm, revert_batchnorm
from .function import BatchNormOp, GhostOp, NormFunction, RenormOp
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, NormBase
from .recalibrate import recalibrate
from .sync import SyncBatchNorm, SyncTimeoutError, TorchDistReducer
from .variants import BatchRenorm, FrozenBatchNorm2d, GhostBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormOp",
    "BatchRenorm",
    "FrozenBatchNorm2d",
    "GhostBatchNorm",
    "GhostOp",
    "NormBase",
    "NormFunction",
    "RenormOp",
    "SyncBatchNorm",
    "SyncTimeoutError",
    "TorchDistReducer",
    "convert_batchnorm",
    "native",
    "recalibrate",
    "revert_batchnorm",
]
