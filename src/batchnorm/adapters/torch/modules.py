"""``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``: drop-ins for torch's, on this
library's kernels.

Same constructor arguments and defaults as ``torch.nn.BatchNorm*d`` (``num_features, eps=1e-5,
momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None``), the same
parameters (``weight``, ``bias``) and buffers (``running_mean``, ``running_var``,
``num_batches_tracked``) under the same ``state_dict`` keys, and torch's conventions:
``momentum`` is the weight of the new batch value (``momentum=None``: a cumulative average),
the running variance is unbiased (``m/(m-1)``), evaluation mode normalizes with the running
statistics (with batch statistics when ``track_running_stats=False``).

Differences from torch: the statistics are exact far from zero (accumulated in float64,
centred before squaring); a batch whose statistics are not finite raises
:class:`batchnorm.NonFiniteStatisticsError` and leaves the running statistics unchanged
(torch writes NaN into them); ``torch.jit.script`` and ``torch.jit.trace`` are refused with a
message; under ``torch.compile`` the layers run eagerly (a graph break around each).
"""

from __future__ import annotations

import sys

import torch

from ...conventions import RunningStats, update_running
from . import _bridge as B
from .function import BatchNormOp, apply

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "NormBase"]

_NO_SCRIPT = (
    "{cls} runs this library's kernels through a Python torch.autograd.Function, which "
    "torch.jit cannot {verb}; use torch.compile (the layer then runs eagerly between "
    "compiled graphs) or batchnorm.torch.revert_batchnorm(model) before exporting"
)


def check_jit(module: torch.nn.Module) -> None:
    """Refuse ``torch.jit.trace`` with a clear message (scripting is refused earlier)."""
    if torch.jit.is_tracing():
        raise RuntimeError(_NO_SCRIPT.format(cls=type(module).__name__, verb="trace"))


class eager:  # noqa: N801 - used as a decorator
    """A ``forward`` that ``torch.compile`` runs eagerly (a graph break around the layer).

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
    """A per-feature buffer as the running update reads it (a NumPy view on CPU)."""
    return t.detach().numpy() if t.device.type == "cpu" else t.detach()


class NormBase(torch.nn.Module):
    """State and running-statistics update shared by the torch modules (see the module
    docstring for the arguments)."""

    _version = 2
    #: valid numbers of input dimensions; None: any ``(N, C, *)`` input
    input_dims: tuple[int, ...] | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int; got {num_features!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0; got {eps!r}")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be in [0, 1] or None; got {momentum!r}")
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        if self.affine:
            self.weight = torch.nn.Parameter(torch.empty(num_features, **kw))
            if bias:
                self.bias = torch.nn.Parameter(torch.empty(num_features, **kw))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))
            self.register_buffer("running_var", torch.ones(num_features, **kw))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # ------------------------------------------------------------------ torch's API
    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight 1 and bias 0."""
        self.reset_running_stats()
        if self.affine:
            torch.nn.init.ones_(self.weight)
            if self.bias is not None:
                torch.nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        """The constructor arguments, as torch prints them."""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None or not self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def __prepare_scriptable__(self):
        """Refuse ``torch.jit.script`` with a clear message."""
        raise TypeError(_NO_SCRIPT.format(cls=type(self).__name__, verb="script"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args):
        # checkpoints older than torch's version 2 have no num_batches_tracked
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    # ------------------------------------------------------------------ checks
    def check_input(self, x) -> None:
        """``x`` must be a floating ``(N, num_features, *)`` tensor of an accepted rank."""
        B.check_float(x, "input")
        dims = self.input_dims
        if dims is not None and x.dim() not in dims:
            want = " or ".join(f"{d}D" for d in dims)
            raise ValueError(
                f"expected {want} input (got {x.dim()}D input of shape {tuple(x.shape)})"
            )
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"input of shape {tuple(x.shape)} has {x.shape[1]} channels (dim 1); this "
                f"{type(self).__name__} has num_features={self.num_features}"
            )

    @staticmethod
    def check_batch(x, what: str = "training") -> None:
        """Batch statistics need more than one value per channel."""
        if x.numel() // x.shape[1] < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when {what}, got input size "
                f"{tuple(x.shape)}"
            )

    @property
    def uses_batch_stats(self) -> bool:
        """Whether a forward now normalizes with batch statistics."""
        return self.training or self.running_mean is None

    def _momentum(self):
        return self.momentum

    def update_running(self, stats, *, unbiased: bool = True, smooth: str = "var") -> None:
        """One update of the running statistics from a forward's batch statistics."""
        nbt = int(self.num_batches_tracked)
        run = RunningStats(_host(self.running_mean), _host(self.running_var), nbt)
        new = update_running(
            run,
            stats,
            momentum=self._momentum(),
            momentum_weights="new",
            unbiased=unbiased,
            smooth=smooth,
            eps=self.eps if smooth == "std" else 0.0,
        )
        with torch.no_grad():
            self.running_mean.copy_(B.tensor(new.mean, self.running_mean))
            self.running_var.copy_(B.tensor(new.var, self.running_var))
            self.num_batches_tracked.add_(1)

    def _reducer(self):
        """The reducer of a training forward (None: this process only)."""
        return None

    @eager
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize ``input`` (see the module docstring); updates the running statistics
        in training mode."""
        check_jit(self)
        self.check_input(input)
        batch = self.uses_batch_stats
        if batch:
            self.check_batch(input)
        op = BatchNormOp(
            self.eps,
            None if batch else self.running_mean,
            None if batch else self.running_var,
            self._reducer() if batch else None,
        )
        y = apply(op, input, self.weight, self.bias)
        if self.training and self.track_running_stats:
            self.update_running(op.stats)
        return y


class BatchNorm1d(NormBase):
    """Batch norm over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input; torch's arguments.

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

    input_dims = (2, 3)


class BatchNorm2d(NormBase):
    """Batch norm over a 4D ``(N, C, H, W)`` input; the arguments of :class:`BatchNorm1d`.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        As :class:`BatchNorm1d`.
    """

    input_dims = (4,)


class BatchNorm3d(NormBase):
    """Batch norm over a 5D ``(N, C, D, H, W)`` input; the arguments of :class:`BatchNorm1d`.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        As :class:`BatchNorm1d`.
    """

    input_dims = (5,)
