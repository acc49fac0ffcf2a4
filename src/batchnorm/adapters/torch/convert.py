"""Swapping torch's batch-norm modules for this library's and back, keeping state exactly.

The new module shares the old one's parameters and buffers (the same tensor objects, as
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), so an optimizer built before the
conversion keeps working, and copies its mode (``training``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, NormBase

__all__ = ["convert_batchnorm", "replace_modules", "revert_batchnorm"]

_TO_OURS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_OURS.items()}


def transfer(old: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """``new`` holding ``old``'s parameters, buffers and mode (the same tensors)."""
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


def _args(m: torch.nn.Module) -> tuple:
    return (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)


def replace_modules(
    module: torch.nn.Module, target: Callable[[torch.nn.Module], torch.nn.Module | None]
) -> torch.nn.Module:
    """``module`` with every submodule ``m`` for which ``target(m)`` is a module replaced by
    it (recursively; the root too).

    Parameters
    ----------
    module : torch.nn.Module
    target : callable(module) -> module or None

    Returns
    -------
    torch.nn.Module
        The root (``module`` itself unless it was replaced).
    """
    new = target(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        swapped = replace_modules(child, target)
        if swapped is not child:
            module.add_module(name, swapped)
    return module


def _meta(m: torch.nn.Module) -> dict:
    """Allocate the new module's state on the meta device (it is replaced by ``m``'s)."""
    p = m.running_mean if m.running_mean is not None else m.weight
    kw = {"device": "meta", "dtype": p.dtype if p is not None else None}
    if m.affine and getattr(m, "bias", None) is None:
        kw["bias"] = False  # torch >= 2.13's keyword
    return kw


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` by this library's.

    Parameters
    ----------
    module : torch.nn.Module
        Changed in place (the root is returned replaced when it is a batch-norm layer).

    Returns
    -------
    torch.nn.Module
        The converted model; its parameters and buffers are the same tensor objects.
    """

    def target(m):
        cls = _TO_OURS.get(type(m))
        return None if cls is None else transfer(m, cls(*_args(m), **_meta(m)))

    return replace_modules(module, target)


def revert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``batchnorm.torch.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) in
    ``module`` by torch's own, sharing the state (the inverse of :func:`convert_batchnorm`).

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    torch.nn.Module
    """
    from .sync import SyncBatchNorm

    def target(m):
        if type(m) is SyncBatchNorm:
            new = torch.nn.SyncBatchNorm(*_args(m), process_group=m.process_group, **_meta(m))
            return transfer(m, new)
        cls = _TO_TORCH.get(type(m))
        return None if cls is None else transfer(m, cls(*_args(m), **_meta(m)))

    return replace_modules(module, target)


def sync_target(cls, process_group) -> Callable:
    """The replacement rule of ``SyncBatchNorm.convert_sync_batchnorm``."""

    def target(m):
        plain = (*_TO_OURS, *_TO_TORCH, torch.nn.SyncBatchNorm)
        if type(m) not in plain:
            return None
        return transfer(m, cls(*_args(m), process_group=process_group, **_meta(m)))

    return target


def is_batchnorm(m: torch.nn.Module) -> bool:
    """Whether ``m`` is a batch-norm layer with running statistics (torch's or ours)."""
    ours = isinstance(m, NormBase)
    theirs = isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    return (ours or theirs) and getattr(m, "running_mean", None) is not None
