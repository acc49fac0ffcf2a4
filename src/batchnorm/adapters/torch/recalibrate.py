"""Precise batch norm for torch models: running statistics recomputed exactly over a loader.

Like ``torch.optim.swa_utils.update_bn`` (the model runs in training mode over the batches,
so every layer normalizes with batch statistics and each layer's input is what training
gives it), but the statistics of each layer's input are accumulated exactly over all the
batches, in float64, with the library's streaming merge (:class:`batchnorm.recalibrate.Moments`),
instead of a cumulative average of per-batch variances. The running variance is then the
population variance of all the values seen, unbiased (``M/(M-1)``) for layers with torch's
convention and biased for :class:`BatchRenorm`; ``method="ioffe"`` gives Ioffe & Szegedy's
Algorithm 2 estimate instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch

from ...functional import moments
from ...recalibrate import Moments
from . import _bridge as B
from .convert import is_batchnorm
from .variants import BatchRenorm

__all__ = ["recalibrate"]


def _first(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _stats(x: torch.Tensor) -> Moments:
    v = B.plan(x)
    xa = B.arrange(x, v)
    count = x.numel() // x.shape[1]
    mean, var = moments(B.array(xa, v), axis=v.axis)
    host = [np.asarray(a.cpu().numpy() if isinstance(a, torch.Tensor) else a) for a in (mean, var)]
    return Moments.from_batch(count, host[0], host[1])


def recalibrate(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    max_batches: int | None = None,
    method: str = "population",
    forward: Callable | None = None,
) -> list[torch.nn.Module]:
    """Set the running statistics of every batch-norm layer of ``model`` to the exact
    statistics of its input over ``loader`` (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        Layers: this library's torch modules and ``torch.nn.BatchNorm*d`` with running
        statistics. Its modes, ``num_batches_tracked`` and everything else are kept.
    loader : iterable
        Batches; a tuple or list batch is fed by its first element.
    max_batches : int, optional
        Stop after this many batches.
    method : {"population", "ioffe"}
    forward : callable(model, batch), optional
        How to run a batch (default ``model(first element)``).

    Returns
    -------
    list of torch.nn.Module
        The layers recalibrated. A layer the forward passes never reach (an unused head) is
        left unchanged and named in a ``RuntimeWarning``, as ``update_bn`` completes.

    Raises
    ------
    ValueError
        When no batch was seen, ``method`` is unknown, or an estimate is not finite in its
        layer's dtype (a batch holding inf or NaN, a float16 variance beyond 65504); then
        nothing has changed.
    """
    if method not in ("population", "ioffe"):
        raise ValueError(f"method must be 'population' or 'ioffe'; got {method!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None; got {max_batches!r}")
    layers = [m for m in model.modules() if is_batchnorm(m)]
    modes = {m: m.training for m in model.modules()}
    saved = {m: [t.clone() for t in _state(m)] for m in layers}
    acc = {m: Moments() for m in layers}
    hooks = [m.register_forward_pre_hook(_hook(acc)) for m in layers]
    run = forward or (lambda mdl, batch: mdl(_first(batch)))
    try:
        model.train()
        n = 0
        with torch.no_grad():
            for batch in loader:
                if max_batches is not None and n >= max_batches:
                    break
                run(model, batch)
                n += 1
        if n == 0:
            raise ValueError("recalibrate saw no batches (an empty loader?)")
        unused = [m for m in layers if acc[m].count == 0]
        estimates = {m: _estimate(m, acc[m], method) for m in layers if acc[m].count > 0}
        _check_finite(model, estimates)
    except BaseException:
        _restore(saved)
        raise
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    _restore(saved)
    with torch.no_grad():
        for m, (mean, var) in estimates.items():
            m.running_mean.copy_(B.tensor(mean, m.running_mean))
            m.running_var.copy_(B.tensor(var, m.running_var))
    if unused:
        names = {m: name or "(the model itself)" for name, m in model.named_modules()}
        warnings.warn(
            f"recalibrate: {len(unused)} batch-norm layer(s) saw no input in the forward "
            f"passes and were left unchanged: {', '.join(names[m] for m in unused)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return list(estimates)


def _check_finite(model: torch.nn.Module, estimates: dict) -> None:
    """Refuse estimates that are not finite in their layer's buffers' dtype (a torch.nn
    layer's own forward lets inf and NaN into its buffers; they never come out of here)."""
    for m, (mean, var) in estimates.items():
        cast = (B.tensor(mean, m.running_mean), B.tensor(var, m.running_var))
        if not all(bool(torch.isfinite(torch.as_tensor(a)).all()) for a in (mean, var, *cast)):
            name = next((n for n, mod in model.named_modules() if mod is m), "") or "(the model)"
            raise ValueError(
                f"recalibrate: the statistics of layer {name} are not finite in its dtype "
                f"{m.running_var.dtype} (max |mean| {float(np.max(np.abs(mean)))!r}, max var "
                f"{float(np.max(var))!r}); nothing was changed"
            )


def _state(m) -> list[torch.Tensor]:
    return [t for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]


def _restore(saved) -> None:
    with torch.no_grad():
        for m, values in saved.items():
            for t, v in zip(_state(m), values, strict=True):
                t.copy_(v)


def _hook(acc: dict):
    def hook(module, args):
        acc[module] = acc[module].merge(_stats(args[0]))

    return hook


def _estimate(m, mom: Moments, method: str):
    mean, var = mom.estimate(method)
    if method == "population" and not isinstance(m, BatchRenorm):
        if mom.count < 2:
            raise ValueError("the unbiased running variance needs at least 2 values per channel")
        var = var * (mom.count / (mom.count - 1))
    return mean, var
