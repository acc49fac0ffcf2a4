"""batchnorm: Batch Normalization implemented by hand in NumPy."""

from .conventions import CONVENTIONS, Convention, get_convention
from .convert import export_state, import_state, translate_momentum
from .fold import fold_conv, fold_linear
from .functional import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    moments,
)
from .layers import BatchNorm
from .recalibrate import recalibrate
from .renorm import (
    BatchRenorm,
    RenormSchedule,
    batch_renorm_backward,
    batch_renorm_eval,
    batch_renorm_train,
)
from .variants import FrozenBatchNorm, GhostBatchNorm

__version__ = "0.1.0"

__all__ = [
    "CONVENTIONS",
    "BatchNorm",
    "BatchNormCache",
    "BatchRenorm",
    "Convention",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "RenormSchedule",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_train",
    "batch_renorm_backward",
    "batch_renorm_eval",
    "batch_renorm_train",
    "export_state",
    "fold_conv",
    "fold_linear",
    "get_convention",
    "import_state",
    "moments",
    "recalibrate",
    "translate_momentum",
]
