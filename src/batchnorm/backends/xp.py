"""The array-API backend: every array that is not a NumPy array, in its own namespace and
on its own device, through the passes of :mod:`batchnorm.core.passes`.

Same contract as :class:`batchnorm.backends.numpy.NumpyBackend` (``moments``, ``affine``,
``train``, ``grad_sums``, ``input_grad`` and the per-feature helpers; the local backward is
:func:`batchnorm.core.passes.backward` itself), with
per-feature arrays in the statistics dtype of the device (:func:`batchnorm._xp.stats_dtype`)
and the overflow scale always applied (no data-dependent branch: multiplying by 1 is exact).
``out=`` is not supported (the caller refuses it first). The statistics take the range
rule of every eager library (:func:`batchnorm.core.sums.shifted_sums`).
"""

from __future__ import annotations

import threading

import numpy as np

from .. import _xp
from .._validation import layout
from ..core import passes

_CACHE: dict = {}
_LOCK = threading.Lock()


def xp_backend(x) -> XpBackend:
    """The backend for array ``x`` (one per namespace, device and statistics dtype)."""
    xp = _xp.namespace(x)
    dev = _xp.device(x)
    sdt = _xp.stats_dtype(xp, dev)
    try:
        key = (xp.__name__, dev, str(sdt))
        hash(key)
    except TypeError:
        key = (xp.__name__, repr(dev), str(sdt))
    be = _CACHE.get(key)
    if be is None:
        with _LOCK:
            be = _CACHE.setdefault(key, XpBackend(xp, dev, sdt))
    return be


class XpBackend:
    """Array-API passes for one namespace ``xp`` on one device (see the module docstring)."""

    name = "array-api"

    def __init__(self, xp, dev, sdt) -> None:
        self.xp, self.device, self.sdt = xp, dev, sdt

    def __repr__(self) -> str:
        return f"XpBackend({_xp.describe(self.xp, self.device)}, statistics {self.sdt})"

    # ------------------------------------------------------------------ per-feature arrays
    def feature(self, v, name: str, lay, x):
        """Check a per-feature argument: an array of ``x``'s library and device, floating,
        of the per-feature shape; returned in the statistics dtype."""
        xp = self.xp
        if not _xp.is_array(v) or isinstance(v, np.ndarray):
            raise TypeError(
                f"{name} must be an array of the same library as x "
                f"({_xp.describe(xp, self.device)}); got {type(v).__name__}"
            )
        if _xp.namespace(v) is not xp and _xp.namespace(v).__name__ != xp.__name__:
            raise TypeError(f"{name} comes from another array library than x")
        _xp.check_same_device("x", x, name, v)
        _xp.check_float(v, name)
        if tuple(v.shape) != lay.fshape:
            raise ValueError(
                f"{name} has shape {tuple(v.shape)} but x with shape {tuple(x.shape)} has "
                f"per-feature shape {lay.fshape}"
            )
        return xp.astype(v, self.sdt)

    def param(self, v):
        """A layer's (valid) per-feature array in the statistics dtype; None stays None."""
        return None if v is None else self.xp.astype(v, self.sdt)

    def copy(self, v):
        """A copy of a per-feature array."""
        return self.xp.asarray(v, copy=True)

    def zeros(self, shape):
        """Per-feature zeros."""
        return self.xp.zeros(shape, dtype=self.sdt, device=self.device)

    def ones(self, shape):
        """Per-feature ones."""
        return self.xp.ones(shape, dtype=self.sdt, device=self.device)

    def from_host(self, v):
        """A merged per-feature array (NumPy float64 from a reducer) on this device."""
        if isinstance(v, (np.ndarray, np.generic)):
            return _xp.from_numpy(self.xp, np.asarray(v), self.device, self.sdt)
        return v

    def concat(self, arrays: list, axis: int):
        """Arrays joined along ``axis``."""
        return self.xp.concat(arrays, axis=axis)

    def any_le_zero(self, v) -> bool:
        """Whether any entry is <= 0 (validation, eager)."""
        return bool(self.xp.any(v <= 0))

    def overflow(self, mean, var, count: int, xw):
        """The per-feature overflow scale ``h`` (always an array here)."""
        return passes.overflow_h(self.xp, mean, var, count, xw)

    def x_hat(self, x, mean, inv_std, bshape):
        """The normalized input in the statistics dtype (for inspection)."""
        xp = self.xp
        return (xp.astype(x, self.sdt) - xp.reshape(mean, bshape)) * xp.reshape(inv_std, bshape)

    # ------------------------------------------------------------------ the contract
    @staticmethod
    def work(x):
        """The array the passes read (the input itself)."""
        return x

    @staticmethod
    def work_dy(dy, xw):
        """``dy`` as the passes read it (unchanged)."""
        return dy

    def moments(self, xw, axes):
        """Per-feature mean and biased variance in the statistics dtype."""
        lay = layout(tuple(xw.shape), axes)
        mean, var = passes.moments(self.xp, xw, lay.red, self.sdt)
        return self.xp.reshape(mean, lay.fshape), self.xp.reshape(var, lay.fshape)

    def train(self, xw, axes, gamma, beta, eps, dtype, out=None):
        """Training forward: ``(y, mean, var, inv_std)``."""
        return passes.train(self.xp, xw, axes, gamma, beta, eps, self.sdt)

    def affine(self, xw, axes, mean, scale, bias, dtype, out=None, h=None, delta=None):
        """``y = (x - mean) * scale + bias`` per feature in the rounding-safe form
        (:func:`batchnorm.core.passes.scale_shift`)."""
        xp = self.xp
        b = layout(tuple(xw.shape), axes).bshape
        m, a, c = (xp.reshape(v, b) for v in (mean, scale, bias))
        return passes.scale_shift(xp, xw, m, a, c, 1.0 if h is None else xp.reshape(h, b), dtype)

    def grad_sums(self, xw, dyw, axes, mean, h=None):
        """Per-feature ``sum(dy)`` and ``sum(dy * (x - mean))`` in the statistics dtype."""
        xp = self.xp
        lay = layout(tuple(xw.shape), axes)
        hb = xp.ones(lay.bshape, dtype=self.sdt, device=self.device) if h is None else h
        s1, s2 = passes.grad_sums(
            xp, xw, dyw, xp.reshape(mean, lay.bshape), lay.red, self.sdt, xp.reshape(hb, lay.bshape)
        )
        return xp.reshape(s1, lay.fshape), xp.reshape(s2, lay.fshape)

    def input_grad(self, xw, dyw, axes, mean, k, p, q, dtype, out=None, h=None):
        """``dx = k * dy + p * (x - mean) + q`` per feature, in ``dtype``."""
        xp = self.xp
        lay = layout(tuple(xw.shape), axes)
        hb = xp.ones(lay.fshape, dtype=self.sdt, device=self.device) if h is None else h
        r = [xp.reshape(v, lay.bshape) for v in (mean, k, p, q, hb)]
        return passes.input_grad(xp, xw, dyw, r[0], r[1], r[2], r[3], dtype, r[4])
