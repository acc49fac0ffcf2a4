"""The running-statistics update of the torch modules' eager route (:mod:`.fast`): torch's
rule (momentum the weight of the new value, None a cumulative average, unbiased variance)
from float64 batch statistics, refusing non-finite ones with nothing changed; and the
same rule in torch operations for traced calls.

Each update (read the batch counter, blend, write the buffers and the counter) holds
:data:`UPDATE_LOCK`, so forwards of one module from several threads at once lose no
update (as torch.nn's own counter, which one in-place add keeps, loses none): the compiled
blend releases the GIL, and without the lock two threads read the same count.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from ..._validation import COUNT_LIMIT
from ...backends.numba.small import running_update
from ...conventions import NonFiniteStatisticsError
from . import _cpu

_COMPILED = (torch.float32, torch.float64)  # buffer dtypes running_update compiles for

#: Held by every eager running update of the torch modules (one update is a pass over
#: ``C`` values; reentrant, as the fallbacks call each other).
UPDATE_LOCK = threading.RLock()


def host64(t: torch.Tensor) -> np.ndarray:
    """A per-feature tensor as a float64 NumPy copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().astype(np.float64)


def next_count(nbt) -> int:
    """``num_batches_tracked + 1``, refused (ValueError, nothing changed) where it would
    reach 2**63, which the int64 buffer cannot hold (torch.nn wraps it to -2**63)."""
    n_new = int(nbt) + 1
    if n_new >= COUNT_LIMIT:
        raise ValueError(
            f"num_batches_tracked={n_new - 1} cannot count another batch: it would reach "
            "2**63, which its int64 buffer cannot hold; the running statistics and "
            "num_batches_tracked are left unchanged"
        )
    return n_new


def weight(momentum: float | None, nbt) -> tuple[float, int | None]:
    """torch's weight of the new value and the new batch count (None: no counter, as when
    ``num_batches_tracked`` is set to None; a cumulative average then weighs 0)."""
    if nbt is None:
        return (0.0 if momentum is None else momentum), None
    n_new = next_count(nbt)
    return (momentum if momentum is not None else 1.0 / n_new), n_new


def update_views(module, views, mean, var, count: int, shape) -> None:
    """:func:`update_running` on the cached views of the buffers."""
    with UPDATE_LOCK:
        _update_views(module, views, mean, var, count, shape)


def _update_views(module, views, mean, var, count: int, shape) -> None:
    if not views[5]:
        return update_running(module, mean, var, count, shape)
    m_np, v_np, n_np = views[2], views[3], views[4]
    n_new = next_count(n_np)
    w = module.momentum if module.momentum is not None else 1.0 / n_new
    if not running_update(
        m_np, v_np, mean, var, float(1.0 - w), float(w), float(w * count / (count - 1))
    ):
        return update_running(module, mean, var, count, shape)  # raises, changes nothing
    n_np[...] = n_new
    return None


def update_running(module, mean: np.ndarray, var: np.ndarray, count: int, shape) -> None:
    """torch's running update from float64 batch statistics, refusing non-finite ones.

    Raises
    ------
    NonFiniteStatisticsError
        When the batch statistics, or the new running statistics in the buffers' dtype, are
        not finite; nothing is changed then.
    """
    with UPDATE_LOCK:
        _update_running(module, mean, var, count, shape)


def _update_running(module, mean: np.ndarray, var: np.ndarray, count: int, shape) -> None:
    rm, rv, nbt = module.running_mean, module.running_var, module.num_batches_tracked
    if not (rm.device.type == "cpu" and rm.dtype in _cpu.NP_DTYPES and rv.dtype == rm.dtype):
        return _update_tensors(module, mean, var, count, shape)
    m_np, v_np = rm.detach().numpy(), rv.detach().numpy()
    n_np = None if nbt is None else nbt.detach().numpy()
    w, n_new = weight(module.momentum, n_np)
    if (
        rm.dtype in _COMPILED
        and type(mean) is np.ndarray
        and running_update(
            m_np, v_np, mean, var, float(1.0 - w), float(w), float(w * count / (count - 1))
        )
    ):  # the expressions below, in one compiled call; False: a value is not finite
        if n_np is not None:
            n_np[...] = n_new
        return None
    with np.errstate(all="ignore"):  # (1 - w) old + w new, in float64, then the buffer dtype
        keep = np.float64(1.0 - w)  # a float64 scalar: the products are float64
        new_m = (m_np * keep + w * mean).astype(m_np.dtype)
        new_v = (v_np * keep + (w * count / (count - 1)) * var).astype(v_np.dtype)
    total = float(np.add.reduce(new_m, dtype=np.float64) + np.add.reduce(new_v, dtype=np.float64))
    if not math.isfinite(total):  # (a finite sum proves every value finite)
        _check_finite(mean, var, new_m, new_v, shape)
    m_np[...] = new_m
    v_np[...] = new_v
    if n_np is not None:
        n_np[...] = n_new


def _update_tensors(module, mean: np.ndarray, var: np.ndarray, count: int, shape) -> None:
    """:func:`update_running` for buffers NumPy cannot view (bfloat16, other devices)."""
    rm, rv, nbt = module.running_mean, module.running_var, module.num_batches_tracked
    w, _ = weight(module.momentum, nbt)
    with np.errstate(all="ignore"):
        new_m = host64(rm) * (1.0 - w) + w * mean
        new_v = host64(rv) * (1.0 - w) + (w * count / (count - 1)) * var
    tm, tv = torch.from_numpy(new_m).to(rm.dtype), torch.from_numpy(new_v).to(rv.dtype)
    _check_finite(mean, var, tm.double().numpy(), tv.double().numpy(), shape)
    with torch.no_grad():
        rm.copy_(tm)
        rv.copy_(tv)
        if nbt is not None:
            nbt.add_(1)


def _check_finite(mean, var, new_m, new_v, shape) -> None:
    bad = ~(np.isfinite(mean) & np.isfinite(var) & np.isfinite(new_m) & np.isfinite(new_v))
    if bad.any():
        where = np.flatnonzero(bad)
        raise NonFiniteStatisticsError(
            f"the batch of shape {tuple(shape)} gives non-finite statistics (or running statistics "
            f"that overflow their dtype) for features {where[:8].tolist()}; the running "
            "statistics and num_batches_tracked are left unchanged"
        )


def update_traced(module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """The running update in torch operations (compiled, exported or transformed calls)."""
    rm, rv, nbt = module.running_mean, module.running_var, module.num_batches_tracked
    with torch.no_grad():
        ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
        if module.momentum is not None:
            w = module.momentum
        elif nbt is None:  # torch: no counter, a cumulative average weighs the batch 0
            w = 0.0
        else:
            w = 1.0 / (nbt + 1).to(mean.dtype)
        # the same float64 operations, in the same order, as update_running
        new_m = rm.to(mean.dtype) * (1.0 - w) + w * mean
        new_v = rv.to(var.dtype) * (1.0 - w) + (w * count / max(count - 1, 1)) * var
        rm.copy_(torch.where(ok, new_m.to(rm.dtype), rm))
        rv.copy_(torch.where(ok, new_v.to(rv.dtype), rv))
        if nbt is not None:
            nbt.add_(ok.to(nbt.dtype))
