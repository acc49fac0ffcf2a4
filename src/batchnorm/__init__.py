"""batchnorm: Batch Normalization implemented by hand in NumPy."""

from .conventions import CONVENTIONS, Convention, get_convention
from .functional import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    moments,
)
from .layers import BatchNorm

__version__ = "0.1.0"

__all__ = [
    "CONVENTIONS",
    "BatchNorm",
    "BatchNormCache",
    "Convention",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_train",
    "get_convention",
    "moments",
]
