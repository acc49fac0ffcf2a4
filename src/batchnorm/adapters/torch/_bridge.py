"""Tensors as the arrays the kernels read and write, without copying where possible.

A CPU tensor becomes a NumPy view of its memory: a contiguous ``(N, C, *)`` tensor is an
``(N, C, *)`` array with the features on axis 1; a ``channels_last`` tensor (NHWC or NDHWC
in memory) is viewed in its memory order, ``(N, H, W, C)``, with the features on the last
axis, so nothing is transposed. Other strides are made contiguous first (one copy).
bfloat16, which NumPy lacks, is computed from a float32 copy. Tensors on any other device
are handed to the array-API path as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._cpu import new_like

_NATIVE = (torch.float16, torch.float32, torch.float64)
_FLOATS = (*_NATIVE, torch.bfloat16)


@dataclass(frozen=True)
class View:
    """How a tensor of one forward is seen by the kernels.

    Attributes
    ----------
    cpu : bool
        NumPy views (compiled kernels) rather than the array-API path.
    channels_last : bool
        The tensor is viewed in NHWC / NDHWC memory order (features on the last axis).
    compute : torch.dtype
        The dtype the kernels see (float32 for bfloat16 input).
    axis : int
        The feature axis of the viewed array.
    ndim : int
        Dimensions of the tensor.
    """

    cpu: bool
    channels_last: bool
    compute: torch.dtype
    axis: int
    ndim: int = 2

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format of tensors allocated for this view."""
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last if self.ndim == 4 else torch.channels_last_3d


def check_float(x: torch.Tensor, what: str) -> None:
    """``x`` must be a floating tensor of a dtype the kernels support."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{what} has dtype {x.dtype}; supported: float16, bfloat16, float32, float64"
        )


def plan(x: torch.Tensor) -> View:
    """The view the kernels take of ``x`` (see the module docstring)."""
    compute = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
    cpu = x.device.type == "cpu"
    cl = False
    if cpu and x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        cl = x.is_contiguous(memory_format=fmt)
    return View(cpu, cl, compute, -1 if cl else 1, x.dim())


def arrange(t: torch.Tensor, v: View) -> torch.Tensor:
    """``t`` (detached) in ``v``'s dtype and memory layout (a copy only where needed)."""
    t = t.detach()
    if t.dtype != v.compute:
        t = t.to(v.compute)
    if v.cpu:
        t = t.contiguous(memory_format=v.memory_format)
    return t


def array(t: torch.Tensor, v: View):
    """The array the kernels read for an arranged tensor: a NumPy view on CPU."""
    if not v.cpu:
        return t
    if v.channels_last:
        perm = (0, 2, 3, 1) if t.dim() == 4 else (0, 2, 3, 4, 1)
        t = t.permute(perm)
    return t.numpy()


def empty(x: torch.Tensor, v: View) -> tuple[torch.Tensor, object]:
    """A new tensor shaped like ``x`` in ``v``'s dtype and layout, and the array to write
    (on CPU through :func:`._cpu.new_like`: the native extension's pool for large ones)."""
    if v.cpu:
        t = new_like(x, v.compute, v.memory_format)
    else:
        t = torch.empty(x.shape, dtype=v.compute, device=x.device, memory_format=v.memory_format)
    return t, array(t, v)


def feature(p: torch.Tensor | None, v: View, dtype=None):
    """A per-feature tensor as the kernels read it (NumPy on CPU), or None. bfloat16 is
    read as float32 on CPU (NumPy has no bfloat16: ``model.to(torch.bfloat16)``)."""
    if p is None:
        return None
    p = p.detach()
    if dtype is None and v.cpu and p.dtype == torch.bfloat16:
        dtype = torch.float32
    if dtype is not None:
        p = p.to(dtype)
    return p.numpy() if v.cpu else p


def tensor(a, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A per-feature result (NumPy float64 or a tensor) as a tensor on ``like``'s device."""
    if isinstance(a, (np.ndarray, np.generic)):
        a = torch.from_numpy(np.ascontiguousarray(a))
    return a.to(device=like.device, dtype=dtype or like.dtype)


def from_array(a, v: View) -> torch.Tensor:
    """A kernel result of the viewed shape (NumPy on CPU) as a tensor of the original shape."""
    if not v.cpu:
        return a
    t = torch.from_numpy(a)
    if v.channels_last:
        t = t.permute((0, 3, 1, 2) if t.dim() == 4 else (0, 4, 1, 2, 3))
    return t


def result(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A computed tensor in ``dtype`` (bfloat16 results are rounded from float32)."""
    return y if y.dtype == dtype else y.to(dtype)
