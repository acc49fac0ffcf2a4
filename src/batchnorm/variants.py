r"""Batch-norm variants built on the core kernels: ghost and frozen batch norm (and renorm).

Batch renormalization lives in :mod:`batchnorm.renorm` (re-exported here).

Ghost batch norm (Hoffer et al. 2017) normalizes each *virtual batch* of
``virtual_batch_size`` consecutive samples (along axis 0) with its own statistics. A batch
that does not divide evenly ends with a smaller virtual batch; a remainder with a single
value per feature (which has no variance) is merged into the virtual batch before it. The
running statistics move once per real batch, towards the average of the virtual batches'
statistics weighted by their sizes.

Frozen batch norm is the evaluation-mode affine map with fixed statistics and parameters; its
backward pass gives only the input gradient.
"""

from __future__ import annotations

import numpy as np

from .functional import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
)
from .layers import BatchNorm
from .renorm import (
    BatchRenorm,
    RenormCache,
    RenormSchedule,
    batch_renorm_backward,
    batch_renorm_eval,
    batch_renorm_train,
)

__all__ = [
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "RenormCache",
    "RenormSchedule",
    "batch_renorm_backward",
    "batch_renorm_eval",
    "batch_renorm_train",
    "ghost_slices",
]


# ----------------------------------------------------------------------------- ghost
def ghost_slices(n: int, virtual_batch_size: int) -> list[slice]:
    """Split ``range(n)`` into virtual batches; a remainder of 1 joins the batch before it."""
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be >= 1; got {virtual_batch_size}")
    bounds = list(range(0, n, virtual_batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class GhostBatchNorm(BatchNorm):
    """Ghost batch norm (Hoffer et al. 2017): statistics per virtual batch along axis 0.

    Parameters
    ----------
    num_features : int or tuple of int
    virtual_batch_size : int
        Samples (along axis 0) per virtual batch.
    Other arguments as :class:`batchnorm.BatchNorm`; axis 0 may not be a feature axis.
    """

    def __init__(self, num_features, *, virtual_batch_size: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if int(virtual_batch_size) < 1:
            raise ValueError(f"virtual_batch_size must be >= 1; got {virtual_batch_size}")
        self.virtual_batch_size = int(virtual_batch_size)

    def forward(self, x, *, training=None, update_stats=True):
        training = self.training if training is None else bool(training)
        if not (training or not self.track_running_stats):
            return super().forward(x, training=False)
        x, axes = self._check_input(x)
        if 0 in axes:
            raise ValueError(f"GhostBatchNorm splits axis 0, which is a feature axis {axes}")
        parts = ghost_slices(x.shape[0], self.virtual_batch_size)
        per_sample = x.size // max(1, x.shape[0]) // int(np.prod(self.feature_shape))
        for sl in parts:
            self._require_two_values(x[sl], axes)
        outs, caches = [], []
        for sl in parts:
            y, cache = batch_norm_train(x[sl], self.gamma, self.beta, axis=axes, eps=self.eps,
                                        backend=self.backend)
            outs.append(y)
            caches.append((sl, cache))
        if training and self.track_running_stats and update_stats:
            sizes = np.array([(sl.stop - sl.start) * per_sample for sl in parts], float)
            weights = sizes / sizes.sum()
            mean = sum(w * c.mean for w, (_, c) in zip(weights, caches, strict=True))
            var = sum(w * c.var for w, (_, c) in zip(weights, caches, strict=True))
            targets = {
                "running_mean": mean,
                "running_var": sum(w * self._batch_targets(c.mean, c.var, int(m))["running_var"]
                                   for w, m, (_, c) in zip(weights, sizes, caches, strict=True)),
            }
            self._update_running_stats(mean, var, targets)
        self._cache = caches
        return np.concatenate(outs, axis=0)

    __call__ = forward

    def backward(self, dy):
        if not isinstance(self._cache, list):
            return super().backward(dy)
        dy = np.asarray(dy)
        n = self._cache[-1][0].stop
        if dy.shape[:1] != (n,):
            raise ValueError(f"dy has shape {dy.shape}; the last forward had {n} samples")
        results = [batch_norm_backward(dy[sl], cache, backend=self.backend)
                   for sl, cache in self._cache]
        dx = np.concatenate([r[0] for r in results], axis=0)
        if self.affine:
            self.dgamma = sum(r[1] for r in results).astype(self.dtype)
            self.dbeta = sum(r[2] for r in results).astype(self.dtype)
        return dx


# ----------------------------------------------------------------------------- frozen
class FrozenBatchNorm:
    """Batch norm with fixed statistics and parameters: an affine map in every mode.

    ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``; :meth:`backward`
    returns ``dx`` only (nothing here learns).
    """

    training = False

    def __init__(self, running_mean, running_var, gamma=None, beta=None, *, axis=1,
                 eps: float = 1e-5, backend: str = "auto"):
        rm = np.array(running_mean, dtype=np.float64)
        rv = np.array(running_var, dtype=np.float64)
        if rm.shape != rv.shape or not np.all(np.isfinite(rm)) or not np.all(np.isfinite(rv)):
            raise ValueError(f"running_mean {rm.shape} and running_var {rv.shape} must match "
                             "and be finite")
        if np.any(rv < 0):
            raise ValueError(f"running_var must be >= 0; got min {rv.min()!r}")
        self.running_mean, self.running_var = rm, rv
        self.gamma = None if gamma is None else np.array(gamma, dtype=np.float64)
        self.beta = None if beta is None else np.array(beta, dtype=np.float64)
        self.axis, self.eps, self.backend = axis, float(eps), backend
        self._cache: BatchNormCache | None = None

    @classmethod
    def from_batchnorm(cls, layer: BatchNorm) -> FrozenBatchNorm:
        """Freeze a trained :class:`batchnorm.BatchNorm` (copies its state)."""
        if not layer.track_running_stats:
            raise ValueError("cannot freeze a layer that keeps no running statistics")
        return cls(layer.running_mean, layer.running_var, layer.gamma, layer.beta,
                   axis=layer.axis, eps=layer.eps, backend=layer.backend)

    @property
    def scale(self) -> np.ndarray:
        """Per-feature multiplier of the affine map, ``gamma / sqrt(running_var + eps)``."""
        s = 1.0 / np.sqrt(self.running_var + self.eps)
        return s if self.gamma is None else s * self.gamma

    def forward(self, x, *, training=None, update_stats=True):
        y, self._cache = batch_norm_eval(x, self.gamma, self.beta, self.running_mean,
                                         self.running_var, axis=self.axis, eps=self.eps,
                                         return_cache=True, backend=self.backend)
        return y

    __call__ = forward

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError("backward() called before any forward pass")
        return batch_norm_backward(dy, self._cache, backend=self.backend)[0]

    def parameters(self) -> dict:
        return {}

    def gradients(self) -> dict:
        return {}

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        return self

    def eval(self) -> FrozenBatchNorm:
        return self
