"""``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``: torch's own classes, on this library's
kernels.

Each subclasses ``torch.nn.BatchNorm*d`` and overrides only ``forward``: the constructor,
parameters (``weight``, ``bias``), buffers (``running_mean``, ``running_var``,
``num_batches_tracked``), ``state_dict`` keys, ``_version`` and its checkpoint migration,
``training`` (a plain attribute), ``reset_*``, ``extra_repr`` and the input-dimension
checks are torch's. So ``isinstance(m, torch.nn.BatchNorm2d)`` holds, and torch's tools
(``torch.optim.swa_utils.update_bn``, ``torch.nn.utils.fusion.fuse_conv_bn_eval``,
``SyncBatchNorm.convert_sync_batchnorm``) and user loops treat the layers as torch's.

What ``forward`` computes is torch's batch norm (momentum the weight of the new value,
``None`` a cumulative average; unbiased running variance; batch statistics in evaluation
when there are no running statistics), with this library's numerics: statistics exact far
from zero (float64, centred before squaring; float32 statistics for half inputs); a
training batch whose statistics are not finite raises
:class:`batchnorm.NonFiniteStatisticsError` and leaves the running statistics unchanged
(torch writes NaN into them). The computation is the compiled kernels (:mod:`.fast`,
:mod:`.ops`): ``torch.compile``, ``torch.export``, ``torch.func`` and the ``meta`` device
see the custom operators ``torch.ops.batchnorm.*``. ``torch.jit.script`` is refused with a
message (the forward is Python calling compiled kernels).
"""

from __future__ import annotations

import sys

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..._plans import PLANS, cached
from ...conventions import RunningStats, update_running
from . import _bridge as B
from ._cpu import Layout, layout
from ._running import UPDATE_LOCK
from .fast import PLAIN_TYPES as _PLAIN
from .fast import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "NormBase"]

_NO_SCRIPT = (
    "{cls} runs this library's kernels from Python, which torch.jit cannot {verb}; use "
    "torch.compile or torch.export (they see the batchnorm custom operators), or "
    "batchnorm.torch.revert_batchnorm(model) before scripting"
)


def check_jit(module: torch.nn.Module) -> None:
    """Refuse ``torch.jit.trace`` of a variant's forward with a clear message."""
    if torch.jit.is_tracing():
        raise RuntimeError(_NO_SCRIPT.format(cls=type(module).__name__, verb="trace"))


class eager:  # noqa: N801 - used as a decorator
    """A ``forward`` that ``torch.compile`` runs eagerly (a graph break around it): for
    layers whose traced form would not be exact (``BatchRenorm``, see
    :mod:`batchnorm.adapters.torch.variants`) or that synchronize ranks (``SyncBatchNorm``).

    The method is wrapped in ``torch.compiler.disable`` only once ``torch._dynamo`` has been
    imported (by ``torch.compile``), so importing this module does not import the compiler.
    """

    def __init__(self, fn) -> None:
        self.fn, self.disabled = fn, None
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls=None):
        fn = self.fn
        if "torch._dynamo" in sys.modules:
            if self.disabled is None:
                self.disabled = torch.compiler.disable(self.fn)
            fn = self.disabled
        return fn if obj is None else fn.__get__(obj, cls)


def _host(t: torch.Tensor):
    """A per-feature buffer as :func:`batchnorm.update_running` reads it."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy() if t.device.type == "cpu" else t


def _checked(module: NormBase, x: torch.Tensor) -> Layout | None:
    """:meth:`NormBase.check_input` of ``x``, once per (module class, shape, strides,
    dtype) for a plain tensor: its :class:`._cpu.Layout` (None for other types, checked
    on every call, as under ``torch.compile``)."""
    if type(x) not in _PLAIN or torch.compiler.is_compiling():
        module.check_input(x)
        return None
    key = ("torch-in", type(module), x.shape, x.stride(), x.dtype)
    lay = PLANS.get(key)
    if lay is None or x.shape[1] != module.num_features:
        module.check_input(x)
        lay = cached(key, layout, x)
    return lay


def _check_eps(eps: float, batch: bool) -> None:
    if batch and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def eps_value(eps, batch: bool) -> float:
    """``eps`` as a float (an int, a NumPy scalar or a one-element tensor read as torch
    reads it), checked (:func:`_check_eps`)."""
    if type(eps) is not float:
        if isinstance(eps, (str, bytes, complex)) or eps is None:
            raise TypeError(f"batch_norm eps must be a real number, got {eps!r}")
        try:
            eps = float(eps)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"batch_norm eps must be a real number, got {eps!r}") from err
    _check_eps(eps, batch)
    return eps


_INF = float("inf")


def check_momentum(momentum) -> None:
    """``momentum`` must be None or a finite real number (a NaN or infinite one would write
    non-finite running statistics; raised before anything changes)."""
    if isinstance(momentum, (str, bytes, complex)):
        raise TypeError(f"momentum must be None or a real number, got {momentum!r}")
    try:
        value = float(momentum)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"momentum must be None or a real number, got {momentum!r}") from err
    if not -_INF < value < _INF:
        raise ValueError(
            f"momentum must be finite, got {value}: the running statistics would become "
            "non-finite (they are left unchanged)"
        )


def _one_missing(training: bool, rm) -> None:
    """Refuse a module with one running statistic set to None, as torch.nn refuses it."""
    if training:
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    name = "running_mean" if rm is None else "running_var"
    raise RuntimeError(f"{name} must be defined in evaluation mode")


def _flat(p, x):
    """A weight or bias of ``C`` elements in another shape (torch.nn checks only the number
    of elements) as the ``(C,)`` view the kernels read; the gradient flows back through
    the view. Other sizes are left for the size check, which names the shape."""
    if p is None or p.dim() == 1 or p.numel() != x.shape[1]:
        return p
    return p.reshape(-1)


class NormBase(_BatchNorm):
    """What this library's torch batch-norm modules share: torch's ``_BatchNorm`` with the
    forward of ``batchnorm.adapters.torch.fast``, and the checks and running update the
    variants use."""

    def __prepare_scriptable__(self):
        """Refuse ``torch.jit.script`` with a clear message."""
        raise TypeError(_NO_SCRIPT.format(cls=type(self).__name__, verb="script"))

    # ------------------------------------------------------------------ checks
    def check_input(self, x) -> None:
        """``x`` must be a floating ``(N, num_features, *)`` tensor of an accepted rank."""
        B.check_float(x, "input")
        self._check_input_dim(x)
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"input of shape {tuple(x.shape)} has {x.shape[1]} channels (dim 1); this "
                f"{type(self).__name__} has num_features={self.num_features}"
            )

    @staticmethod
    def check_batch(x, what: str = "training") -> None:
        """Batch statistics need more than one value per channel (an empty batch is let
        through, as torch does)."""
        if x.numel() // x.shape[1] == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when {what}, got input size {x.size()}"
            )

    @property
    def uses_batch_stats(self) -> bool:
        """Whether a forward now normalizes with batch statistics."""
        return self.training or (self.running_mean is None and self.running_var is None)

    def update_running(self, stats, *, unbiased: bool = True, smooth: str = "var") -> None:
        """One update of the running statistics from a forward's batch statistics (the
        variants' rule, through :func:`batchnorm.update_running`)."""
        with UPDATE_LOCK, torch.no_grad():  # (read, blend, write: one update at a time)
            nbt = int(self.num_batches_tracked)
            new = update_running(
                RunningStats(_host(self.running_mean), _host(self.running_var), nbt),
                stats,
                momentum=self.momentum,
                momentum_weights="new",
                unbiased=unbiased,
                smooth=smooth,
                eps=self.eps if smooth == "std" else 0.0,
            )
            self.running_mean.copy_(B.tensor(new.mean, self.running_mean))
            self.running_var.copy_(B.tensor(new.var, self.running_var))
            self.num_batches_tracked.add_(1)

    def _reducer(self):
        """The reducer of a training forward (None: this process only)."""
        return None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize ``input`` (see the module docstring); in training mode with running
        statistics, update them."""
        lay = _checked(self, input)
        training = self.training
        w, b, rm0, rv0, nbt = self._tensors()
        batch = training or (rm0 is None and rv0 is None)
        eps = self.eps
        if type(eps) is not float or not eps > 0:
            eps = eps_value(eps, batch)
        if batch and (lay is None or lay.count < 2 or not lay.view_shape[1]):
            self.check_batch(input)
        track = not training or self.track_running_stats
        rm = rm0 if track else None
        rv = rv0 if track else None
        if (rm is None) is not (rv is None):
            _one_missing(training, rm)
        update = training and self.track_running_stats  # (nbt None: torch still updates)
        if update and rm is not None:
            m = self.momentum
            if m is not None and (type(m) is not float or not -_INF < m < _INF):
                check_momentum(m)
        if (w is not None and w.dim() != 1) or (b is not None and b.dim() != 1):
            w, b = _flat(w, input), _flat(b, input)
        params = (w, b, nbt)
        return batch_norm(self, input, batch, update and rm is not None, rm, rv, params, lay, eps)

    def _tensors(self):
        """``(weight, bias, running_mean, running_var, num_batches_tracked)``, read from
        the parameter and buffer dicts (a tenth of the cost of five attribute reads
        through ``Module.__getattr__``), by attribute where one is not there (so a
        deleted one raises torch's AttributeError)."""
        p, bufs = self._parameters, self._buffers
        try:
            return (
                p["weight"],
                p["bias"],
                bufs["running_mean"],
                bufs["running_var"],
                bufs["num_batches_tracked"],
            )
        except KeyError:
            return (
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                self.num_batches_tracked,
            )


class BatchNorm1d(NormBase, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on this library's kernels: a 2D ``(N, C)`` or 3D
    ``(N, C, L)`` input; torch's arguments.

    Parameters
    ----------
    num_features : int
        C.
    eps : float
        Added to the variance (default 1e-5).
    momentum : float or None
        Weight of the new batch value in the running averages (default 0.1); None: the
        cumulative average.
    affine : bool
        Learnable ``weight`` and ``bias``.
    track_running_stats : bool
        Keep running statistics (else batch statistics in evaluation too).
    device, dtype : optional
        Of the parameters and buffers.
    bias : bool
        With ``affine``: whether there is a learnable ``bias`` (keyword only, as torch).
    """


class BatchNorm2d(NormBase, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on this library's kernels: a 4D ``(N, C, H, W)`` input,
    contiguous or channels_last (kept).

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        As :class:`BatchNorm1d`.
    """


class BatchNorm3d(NormBase, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on this library's kernels: a 5D ``(N, C, D, H, W)`` input.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        As :class:`BatchNorm1d`.
    """
