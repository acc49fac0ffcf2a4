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

from dataclasses import dataclass

import numpy as np

from ._compose import Inputs, backward_local, train_local
from ._validation import as_float_array, check_count, check_state_array
from .backends import plan
from .conventions import BatchStats, RunningStats, update_running_unchecked
from .layers import ConventionLayer, NormLayer
from .layers.args import Argument, Constant, by_value, library_layer
from .layers.arrays import Placement
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
    "GhostBatchStats",
    "RenormCache",
    "RenormSchedule",
    "batch_renorm_backward",
    "batch_renorm_eval",
    "batch_renorm_train",
    "ghost_slices",
]


# ----------------------------------------------------------------------------- ghost
def ghost_slices(n: int, virtual_batch_size: int, values_per_sample: int = 1) -> list[slice]:
    """Split ``range(n)`` into virtual batches of ``virtual_batch_size`` samples.

    A last virtual batch with a single value per feature (one sample, when each sample holds
    ``values_per_sample`` values of each feature) has no variance: it joins the one before.
    """
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be >= 1; got {virtual_batch_size}")
    bounds = list(range(0, n, virtual_batch_size)) + [n]
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * values_per_sample < 2:
        del bounds[-2]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass(frozen=True, eq=False)
class GhostBatchStats(BatchStats):
    """Statistics of a whole batch (``count``, ``mean``, ``var``) and of its virtual batches.

    Attributes
    ----------
    parts : tuple of BatchStats
        One record per virtual batch, in order.
    """

    parts: tuple[BatchStats, ...] = ()


@library_layer
class GhostBatchNorm(ConventionLayer):
    """Ghost batch norm (Hoffer et al. 2017): statistics per virtual batch along axis 0.

    Parameters
    ----------
    num_features : int or tuple of int
    virtual_batch_size : int
        Samples (along axis 0) per virtual batch.
    **kwargs
        As :class:`batchnorm.BatchNorm`; axis 0 may not be a feature axis.

    ``last_batch_stats`` is a :class:`GhostBatchStats`: the whole batch's statistics, with
    each virtual batch's in ``parts``. Not synchronizable (``comm``): over MPI, local batch
    norm on R ranks is already ghost batch norm with the per-rank batch as virtual batch.
    """

    synchronizable = Constant(False, "Ghost batch norm is not synchronized (see above).")
    virtual_batch_size = Argument(
        by_value(check_count, "virtual_batch_size"), doc="Samples per virtual batch."
    )

    def __init__(self, num_features, *, virtual_batch_size: int, **kwargs):
        vbs = check_count(virtual_batch_size, "virtual_batch_size")
        super().__init__(num_features, **kwargs)
        if 0 in ((self.axis,) if isinstance(self.axis, int) else self.axis):
            raise ValueError(
                f"GhostBatchNorm splits axis 0, so it cannot be a feature axis (axis={self.axis!r})"
            )
        self._args.add("virtual_batch_size", vbs)

    def _forward_batch(self, inp):
        x, axes = inp.x, inp.lay.axes
        if 0 in axes:
            raise ValueError(f"GhostBatchNorm splits axis 0, which is a feature axis {axes}")
        if x.shape[0] == 0:
            raise ValueError(f"cannot normalize an empty batch: x has shape {tuple(x.shape)}")
        per_sample = inp.lay.count // x.shape[0]
        parts = ghost_slices(x.shape[0], self.virtual_batch_size, per_sample)
        if x.shape[0] * per_sample < 2 or (self.virtual_batch_size * per_sample < 2):
            raise ValueError(
                f"GhostBatchNorm with virtual_batch_size={self.virtual_batch_size} on x of shape "
                f"{tuple(x.shape)} (feature axis {self.axis!r}) gives virtual batches with 1 "
                "value per feature, which have no variance; use a larger virtual_batch_size"
            )
        outs, caches, stats = [], [], []
        for sl in parts:  # the input was validated once: each slice only gets its layout
            xs = x[sl, ...]  # the Array API indexes every axis or names the rest (...)
            p = plan(self.backend, xs, axes)
            part = Inputs(xs, p.layout, p.backend, inp.gamma, inp.beta, inp.eps)
            y, cache, st = train_local(part)
            outs.append(y)
            caches.append((sl, cache))
            stats.append(st)
        whole = BatchStats.combine(stats)
        record = GhostBatchStats(whole.count, whole.mean, whole.var, tuple(stats))
        return inp.be.concat(outs, 0), caches, record

    def _running_update(self, running: RunningStats, stats: BatchStats) -> RunningStats:
        # one update per real batch, towards the size-weighted average of the virtual
        # batches' statistics (each made unbiased on its own when the convention asks)
        parts = stats.parts if isinstance(stats, GhostBatchStats) else (stats,)
        total = sum(p.count for p in parts)
        if self.unbiased and min(p.count for p in parts) < 2:
            raise ValueError("the unbiased variance needs at least 2 values per virtual batch")
        mean = sum((p.count / total) * p.mean for p in parts)
        var = sum(
            (p.count / total) * (p.var * (p.count / (p.count - 1)) if self.unbiased else p.var)
            for p in parts
        )
        return update_running_unchecked(
            running, BatchStats(total, mean, var), self.momentum, self.convention.momentum_weights
        )

    def _backward(self, dy, cache):
        if not isinstance(cache, list):
            return super()._backward(dy, cache)
        first = cache[0][1]
        n = cache[-1][0].stop
        shape = (n, *first.x.shape[1:])
        dy = as_float_array(dy, "dy")
        if tuple(dy.shape[:1]) != (n,):
            raise ValueError(f"dy has shape {tuple(dy.shape)}; the last forward had {n} samples")
        if tuple(dy.shape) != shape:
            raise ValueError(
                f"dy has shape {tuple(dy.shape)} but the forward input x had shape {shape}"
            )
        results = [backward_local(dy[sl, ...], c, self.backend) for sl, c in cache]
        be = plan(self.backend, results[0][0], first.axis).backend
        dx = be.concat([r[0] for r in results], 0)
        if not self.affine:
            return dx, None, None
        return dx, sum(r[1] for r in results), sum(r[2] for r in results)


# ----------------------------------------------------------------------------- frozen
@library_layer
class FrozenBatchNorm(NormLayer):
    """Batch norm with fixed statistics and parameters: an affine map in every mode.

    ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``. A sibling of the
    layers that train (not one of them with parts removed): it takes only the arguments every
    norm layer has, keeps ``gamma``/``beta`` (when ``affine``) and the running statistics as
    fixed state, has no learnable ``parameters()`` (like torchvision's
    ``FrozenBatchNorm2d``, whose weight and bias are buffers), and ``backward()`` returns
    ``dx`` only. ``train()``/``eval()`` set ``training`` as for every module; the output is the
    same in both modes. Build one with :meth:`from_batchnorm` (any norm layer with running
    statistics) or :meth:`from_statistics`.
    """

    def __init__(
        self,
        num_features,
        *,
        axis=1,
        eps: float = 1e-5,
        affine: bool = True,
        dtype=np.float64,
        backend: str = "auto",
    ):
        super().__init__(
            num_features,
            axis=axis,
            eps=eps,
            affine=affine,
            dtype=dtype,
            backend=backend,
            track_running_stats=True,
        )
        self.training = False  # built to evaluate; the mode does not change the output

    @classmethod
    def from_batchnorm(cls, layer: NormLayer) -> FrozenBatchNorm:
        """Freeze a trained norm layer (copies its parameters and running statistics)."""
        if not isinstance(layer, NormLayer):
            raise TypeError(f"expected a norm layer; got {type(layer).__name__}")
        if not layer.track_running_stats:
            raise ValueError(
                f"cannot freeze {type(layer).__name__}: it keeps no running statistics"
            )
        frozen = cls(
            layer.feature_shape,
            axis=layer.axis,
            eps=layer.eps,
            affine=layer.affine,
            dtype=layer.dtype,
            backend=layer.backend,
        )
        state = {k: layer.state_dict()[k] for k in frozen.state_keys()}
        return frozen.load_state_dict(state)

    @classmethod
    def from_statistics(
        cls,
        running_mean,
        running_var,
        gamma=None,
        beta=None,
        *,
        axis=1,
        eps: float = 1e-5,
        backend: str = "auto",
    ) -> FrozenBatchNorm:
        """A frozen layer from its statistics (and optional ``gamma``, ``beta``), float64.

        Every array goes through the one state check first (masked, complex, object,
        string, bool and non-finite arrays are refused), then ``load_state_dict()``.
        """
        given = {"running_mean": running_mean, "running_var": running_var}
        if (gamma is None) != (beta is None):
            raise ValueError("pass both gamma and beta, or neither")
        if gamma is not None:
            given.update(gamma=gamma, beta=beta)
        arrays = {k: check_state_array(Placement.host_any(v), k) for k, v in given.items()}
        rm = arrays["running_mean"]
        if rm.ndim == 0:
            raise ValueError(f"running_mean must have at least one feature axis; got {rm!r}")
        frozen = cls(
            rm.shape if rm.ndim != 1 else rm.shape[0],
            axis=axis,
            eps=eps,
            affine=gamma is not None,
            backend=backend,
        )
        state = {**arrays, "num_batches_tracked": 0}
        return frozen.load_state_dict(state)
