"""Batch renorm, ghost batch norm and frozen batch norm as torch modules.

* :class:`BatchRenorm` (Ioffe 2017; :mod:`batchnorm.renorm`): in training
  ``y = gamma ((x - mu_B) / sigma_B * r + d) + beta`` with
  ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``
  held constant in the backward pass, where ``sigma_B = sqrt(var_B + eps)`` (biased batch
  variance, as Keras 2) and ``sigma = sqrt(running_var + eps)``; the running mean and the
  running *standard deviation* are moving averages (``momentum``: weight of the new value, as
  torch), the latter stored as ``running_var = sigma**2 - eps``. Inference is plain batch
  norm, so its ``state_dict`` loads into ``BatchNorm2d`` and back.
* :class:`GhostBatchNorm` (Hoffer et al. 2017): batch statistics per virtual batch of
  ``virtual_batch_size`` samples (dim 0); one running update per real batch, towards the
  size-weighted average of the virtual batches' statistics (each variance made unbiased).
* :class:`FrozenBatchNorm2d`: torchvision's (``weight``, ``bias``, ``running_mean``,
  ``running_var`` all buffers; ``y = (x - running_mean) / sqrt(running_var + eps) * weight +
  bias`` in training and evaluation), with the gradient of ``x`` from the hand-written
  backward.

Both :class:`BatchRenorm` and :class:`GhostBatchNorm` take any ``(N, C, *)`` input, like
torch's ``SyncBatchNorm``.

Under ``torch.compile`` (:class:`GhostBatchNorm` only, see below), ``torch.export``,
``torch.func`` transforms, on the ``meta`` device and on other devices
(:func:`batchnorm.adapters.torch.fast.use_ops`) both are written with the custom operators
``torch.ops.batchnorm.train`` / ``eval`` (which carry the fake implementation, the
hand-written backward and the vmap rule) and torch operations: a ghost batch is one
``train`` call per virtual batch, concatenated; batch renorm is ``train`` without the
affine parameters (the normalized ``x_hat``) times ``weight * r`` plus ``weight * d +
bias``, with ``r`` and ``d`` computed without gradient (held constant, as in the eager
backward). So compile (ghost) sees no graph break and ``torch.func`` works. The running
update is then made of torch operations too: a non-finite batch leaves the running
statistics unchanged without raising (a traced graph cannot raise on data). In eager mode
on CPU both run this library's kernels directly, as before.

:class:`BatchRenorm` stays a graph break under ``torch.compile`` (its forward runs eagerly):
its backward needs ``r`` and ``d``, which come from the running statistics the same forward
updates in place, and AOTAutograd's partitioner may recompute them in the backward from the
already updated buffers (measured: ``backend="aot_eager"`` then gave input gradients 4% off
on a feature whose ``r`` was not clipped). The eager forward is exact; ``torch.export``,
``torch.func`` and ``meta`` use the operator route.
"""

from __future__ import annotations

import torch

from ..._validation import check_renorm_limits
from ...core.stats import BatchStats
from ...variants import ghost_slices
from . import _bridge as B
from . import ops as O
from .fast import batch_norm, use_ops
from .function import BatchNormOp, GhostOp, RenormOp, apply
from .modules import NormBase, check_jit, eager

__all__ = ["BatchRenorm", "FrozenBatchNorm2d", "GhostBatchNorm"]


class _AnyRank:
    """Any ``(N, C, *)`` input, as torch's ``SyncBatchNorm`` checks it."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


class BatchRenorm(_AnyRank, NormBase):
    """Batch renormalization over any ``(N, C, *)`` input (see the module docstring).

    Parameters
    ----------
    num_features : int
    eps : float
        > 0 (the running std is ``sqrt(running_var + eps)``); default 1e-5.
    momentum : float or None
        Weight of the new batch value in the moving averages (default 0.1); None: cumulative.
    affine : bool
    rmax, dmax : float
        Clipping limits, ``rmax >= 1``, ``dmax >= 0`` (attributes: a schedule may change them
        between steps). ``rmax=1, dmax=0`` is batch norm with biased running variance.
    device, dtype : optional
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        device=None,
        dtype=None,
    ) -> None:
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"BatchRenorm needs eps > 0 (its running std stays > 0); got {eps!r}")
        self.rmax, self.dmax = check_renorm_limits(rmax, dmax)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)

    def reset_running_stats(self) -> None:
        """Running mean 0 and running std 1 (``running_var = 1 - eps``)."""
        self.running_mean.zero_()
        self.running_var.fill_(max(1.0 - self.eps, 0.0))
        self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        """The constructor arguments."""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, rmax={self.rmax}, dmax={self.dmax}"
        )

    @eager
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Renormalize ``input`` in training (updating the running mean and std); batch norm
        with the running statistics in evaluation."""
        check_jit(self)
        self.check_input(input)
        rmax, dmax = check_renorm_limits(self.rmax, self.dmax)
        if use_ops(input):
            if not self.training:
                return O.call_eval(
                    input, self.weight, self.bias, self.running_mean, self.running_var, self.eps
                )
            self.check_batch(input)
            return _renorm_traced(self, input, rmax, dmax)
        if not self.training:
            op = BatchNormOp(self.eps, self.running_mean, self.running_var)
            return apply(op, input, self.weight, self.bias)
        self.check_batch(input)
        with torch.no_grad():
            std = (self.running_var.double() + self.eps).sqrt()
        op = RenormOp(self.eps, rmax, dmax, self.running_mean, std, self._reducer())
        y = apply(op, input, self.weight, self.bias)
        self.update_running(op.stats, unbiased=False, smooth="std")
        return y


class GhostBatchNorm(_AnyRank, NormBase):
    """Ghost batch norm over any ``(N, C, *)`` input (see the module docstring).

    Parameters
    ----------
    num_features : int
    virtual_batch_size : int
        Samples per virtual batch (a last virtual batch with one value per channel joins the
        one before).
    eps, momentum, affine, track_running_stats, device, dtype, bias
        As :class:`batchnorm.torch.BatchNorm2d`.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        vbs = virtual_batch_size
        if isinstance(vbs, bool) or not isinstance(vbs, int) or vbs < 1:
            raise ValueError(f"virtual_batch_size must be a positive int; got {vbs!r}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.virtual_batch_size = vbs

    def extra_repr(self) -> str:
        """The constructor arguments."""
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize each virtual batch with its own statistics in training; with the
        running statistics in evaluation."""
        check_jit(self)
        self.check_input(input)
        if not self.uses_batch_stats:
            if use_ops(input):
                return O.call_eval(
                    input, self.weight, self.bias, self.running_mean, self.running_var, self.eps
                )
            op = BatchNormOp(self.eps, self.running_mean, self.running_var)
            return apply(op, input, self.weight, self.bias)
        per_sample = input.numel() // max(input.shape[0] * input.shape[1], 1)
        if input.numel() == 0:  # (not "1 value per channel": there is none)
            raise ValueError(
                f"GhostBatchNorm cannot normalize an empty batch: input has shape "
                f"{tuple(input.shape)}"
            )
        if input.shape[0] * per_sample < 2 or self.virtual_batch_size * per_sample < 2:
            raise ValueError(
                f"GhostBatchNorm with virtual_batch_size={self.virtual_batch_size} on input of "
                f"shape {tuple(input.shape)} gives virtual batches with 1 value per channel, "
                "which have no variance; use a larger virtual_batch_size"
            )
        if use_ops(input):
            return _ghost_traced(self, input, per_sample)
        op = GhostOp(self.eps, self.virtual_batch_size)
        y = apply(op, input, self.weight, self.bias)
        if self.training and self.track_running_stats:
            self.update_running(_weighted(op.parts), unbiased=False)
        return y


def _feature_shape(x: torch.Tensor) -> tuple:
    return (1, -1) + (1,) * (x.dim() - 2)


def _renorm_traced(module: BatchRenorm, x: torch.Tensor, rmax: float, dmax: float):
    """Batch renorm's training forward with the custom operator (see the module docstring),
    and its running update in torch operations."""
    xhat, mean, var = O.call_train(x, None, None, module.eps)
    rm, rv, eps = module.running_mean, module.running_var, module.eps
    with torch.no_grad():
        std = (rv.to(mean.dtype) + eps).sqrt()
        sigma = (var + eps).sqrt()
        r = (sigma / std).clamp(1.0 / rmax, rmax)
        d = ((mean - rm.to(mean.dtype)) / std).clamp(-dmax, dmax)
    scale, shift = r.to(xhat.dtype), d.to(xhat.dtype)
    if module.weight is not None:
        scale, shift = module.weight * scale, module.weight * shift
    if module.bias is not None:
        shift = shift + module.bias
    y = xhat * scale.view(_feature_shape(x)) + shift.view(_feature_shape(x))
    with torch.no_grad():
        w = _weight(module, mean)
        new_std = std * (1.0 - w) + w * sigma
        new_var = (new_std * new_std - eps).clamp_min(0.0)
        _commit(module, mean, new_var, w, torch.isfinite(mean).all() & torch.isfinite(var).all())
    return y


def _ghost_traced(module: GhostBatchNorm, x: torch.Tensor, per_sample: int):
    """Ghost batch norm's training forward as one custom-operator call per virtual batch,
    and its running update (towards the size-weighted average of the virtual batches'
    means and unbiased variances) in torch operations."""
    ys, parts = [], []
    for sl in ghost_slices(x.shape[0], module.virtual_batch_size, per_sample):
        y, mean, var = O.call_train(x[sl], module.weight, module.bias, module.eps)
        ys.append(y)
        parts.append(((sl.stop - sl.start) * per_sample, mean, var))
    y = torch.cat(ys, 0)
    if module.training and module.track_running_stats:
        total = sum(n for n, _, _ in parts)
        with torch.no_grad():
            mean = sum((n / total) * m for n, m, _ in parts)
            var = sum((n / total) * (n / (n - 1)) * v for n, _, v in parts)
            w = _weight(module, mean)
            new_var = module.running_var.to(var.dtype) * (1.0 - w) + w * var
            ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
            _commit(module, mean, new_var, w, ok)
    return y


def _weight(module, like: torch.Tensor):
    """The weight of the new value: ``momentum``, or ``1 / (num_batches_tracked + 1)``."""
    if module.momentum is None:
        return 1.0 / (module.num_batches_tracked + 1).to(like.dtype)
    return module.momentum


def _commit(module, mean: torch.Tensor, new_var: torch.Tensor, w, ok: torch.Tensor) -> None:
    """Running mean ``(1 - w) old + w mean`` and running variance ``new_var``, written only
    where the batch was finite (``ok``), and the batch counted."""
    rm, rv, nbt = module.running_mean, module.running_var, module.num_batches_tracked
    new_mean = rm.to(mean.dtype) * (1.0 - w) + w * mean
    ok = ok & torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
    rm.copy_(torch.where(ok, new_mean.to(rm.dtype), rm))
    rv.copy_(torch.where(ok, new_var.to(rv.dtype), rv))
    nbt.add_(ok.to(nbt.dtype))


def _weighted(parts: list[BatchStats]) -> BatchStats:
    """Size-weighted average of the virtual batches' means and unbiased variances."""
    if min(p.count for p in parts) < 2:
        raise ValueError("the unbiased variance needs at least 2 values per virtual batch")
    total = sum(p.count for p in parts)
    mean = sum((p.count / total) * p.mean for p in parts)
    var = sum((p.count / total) * p.var * (p.count / (p.count - 1)) for p in parts)
    return BatchStats(total, mean, var)


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision's ``FrozenBatchNorm2d``: fixed statistics and affine parameters.

    Parameters
    ----------
    num_features : int
    eps : float
        Added to ``running_var`` (default 1e-5).

    Attributes
    ----------
    weight, bias, running_mean, running_var : torch.Tensor
        Buffers (not parameters), initialized to 1, 0, 0, 1.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int; got {num_features!r}")
        self.eps = float(eps)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, module: torch.nn.Module) -> FrozenBatchNorm2d:
        """A frozen copy of a (torch or this library's) batch-norm module's state: the same
        values, dtype and device; no ``weight`` gives 1, no ``bias`` gives 0.

        Raises
        ------
        ValueError
            When ``module`` has no running statistics (``track_running_stats=False``):
            there is nothing to freeze.
        """
        rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if rm is None or rv is None:
            raise ValueError(
                f"{type(module).__name__} has no running statistics "
                "(track_running_stats=False); FrozenBatchNorm2d.from_batchnorm needs them"
            )
        out = cls(module.num_features, module.eps)
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        state = {
            "weight": torch.ones_like(rm) if w is None else w.detach().clone(),
            "bias": torch.zeros_like(rm) if b is None else b.detach().clone(),
            "running_mean": rm.detach().clone(),
            "running_var": rv.detach().clone(),
        }
        for name, t in state.items():
            setattr(out, name, t)  # registered buffers: replaced with the exact copies
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args):
        state_dict.pop(prefix + "num_batches_tracked", None)  # as torchvision
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def __prepare_scriptable__(self):
        """Refuse ``torch.jit.script`` with a clear message."""
        NormBase.__prepare_scriptable__(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - running_mean) / sqrt(running_var + eps) * weight + bias``."""
        B.check_float(x, "input")
        if x.dim() != 4 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"FrozenBatchNorm2d({self.weight.shape[0]}) expects (N, "
                f"{self.weight.shape[0]}, H, W) input; got shape {tuple(x.shape)}"
            )
        return batch_norm(self, x, False, False, self.running_mean, self.running_var)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight.shape[0]}, eps={self.eps})"
