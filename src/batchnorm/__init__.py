"""batchnorm: Batch Normalization implemented by hand in NumPy."""

from . import checkpoint, conventions, distributed, nn  # noqa: F401  (public submodules)
from ._version import __version__  # noqa: F401
from .conventions import (
    CONVENTIONS,
    BatchStats,
    Convention,
    NonFiniteStatisticsError,
    RunningStats,
    get_convention,
    update_running,
)
from .convert import export_state, import_state, translate_momentum
from .fold import fold_conv, fold_linear
from .functional import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    moments,
)
from .layers import BatchNorm, NormLayer
from .module import Module, NoForwardError
from .recalibrate import recalibrate
from .renorm import (
    BatchRenorm,
    RenormSchedule,
    batch_renorm_backward,
    batch_renorm_eval,
    batch_renorm_train,
)
from .variants import FrozenBatchNorm, GhostBatchNorm, GhostBatchStats

__all__ = [
    "CONVENTIONS",
    "BatchNorm",
    "BatchNormCache",
    "BatchRenorm",
    "BatchStats",
    "Convention",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GhostBatchStats",
    "Module",
    "NoForwardError",
    "NonFiniteStatisticsError",
    "NormLayer",
    "RenormSchedule",
    "RunningStats",
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
    "update_running",
]
