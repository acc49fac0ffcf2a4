"""Batch norm written with torch operations: the custom operators' implementation on devices
other than the CPU, and the differentiable formula behind their double backward.

The statistics are centred before squaring, in float64 where the device has it.
"""

from __future__ import annotations

import torch


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def _shape(x: torch.Tensor) -> list[int]:
    s = [1] * x.dim()
    s[1] = x.shape[1]
    return s


def _red(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and biased variance of an ``(N, C, *)`` tensor (statistics dtype)."""
    xd = x.to(_stat_dtype(x))
    red = _red(x)
    mean = xd.mean(red)
    var = (xd - mean.view(_shape(x))).square().mean(red)
    return mean, var


def affine(x, weight, bias, mean, var, eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` in the statistics dtype, returned in
    ``x``'s dtype and memory format."""
    sd = _stat_dtype(x)
    s = _shape(x)
    inv = (var.to(sd) + eps).rsqrt()
    y = (x.to(sd) - mean.to(sd).view(s)) * inv.view(s)
    if weight is not None:
        y = y * weight.to(sd).view(s)
    if bias is not None:
        y = y + bias.to(sd).view(s)
    return y.to(x.dtype)


def backward(dy, x, weight, mean, var, eps: float, batch_stats: bool):
    """``(dx, dweight, dbias)`` (the last two in the statistics dtype), differentiable in
    ``dy``, ``x`` and ``weight``; with ``batch_stats`` the statistics are recomputed from
    ``x`` so that their dependence on ``x`` is part of the graph."""
    sd = _stat_dtype(x)
    s, red = _shape(x), _red(x)
    xd, dyd = x.to(sd), dy.to(sd)
    if batch_stats:
        mean, var = moments(x)
    inv = (var.to(sd) + eps).rsqrt()
    xc = xd - mean.to(sd).view(s)
    sum_dy = dyd.sum(red)
    sum_dy_xc = (dyd * xc).sum(red)
    k = inv if weight is None else inv * weight.to(sd)
    dx = dyd * k.view(s)
    if batch_stats:
        m = x.numel() // max(x.shape[1], 1)
        dx = dx - (k / m).view(s) * (sum_dy.view(s) + xc * (inv * inv * sum_dy_xc).view(s))
    return dx.to(x.dtype), sum_dy_xc * inv, sum_dy
