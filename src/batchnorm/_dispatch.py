"""Choosing and running a backend: NumPy or the compiled numba kernels."""

from __future__ import annotations

import numpy as np

from ._numpy_kernels import _np_affine, _np_grad_sums, _np_input_grad, _np_moments
from ._validation import broadcast_shape, feature_shape

BACKENDS = ("auto", "numpy", "numba")
# Below this many elements "auto" stays with NumPy: launching the compiled parallel kernels
# costs ~70 us per call, more than NumPy needs for the whole job (measured crossover ~16K
# elements on 2 cores), and small arrays interleaved with BLAS calls suffer most from
# thread contention.
AUTO_NUMBA_MIN_SIZE = 1 << 15
_kernels_module = None


def _load_kernels():
    """The compiled kernels module, or None when numba is not importable (imported lazily)."""
    global _kernels_module
    if _kernels_module is None:
        try:
            from . import _kernels
        except ImportError:
            _kernels_module = False
        else:
            _kernels_module = _kernels
    return _kernels_module or None


def numba_available() -> bool:
    """Whether the compiled backend can be used (numba importable)."""
    return _load_kernels() is not None


class Backend:
    """The four primitives on per-feature float64 vectors, for one array layout."""

    def __init__(self, name: str, x: np.ndarray, axes: tuple[int, ...]):
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
        small = name == "auto" and x.size < AUTO_NUMBA_MIN_SIZE
        kern = None if name == "numpy" or small else _load_kernels()
        if name == "numba" and kern is None:
            raise ImportError("backend='numba' needs numba: pip install numba")
        # feature axes that are not adjacent take the general (NumPy) path
        self.kern = kern if kern is not None and kern.supported(axes) else None
        self.name = "numba" if self.kern is not None else "numpy"
        self.x, self.axes = x, axes
        self.fshape = feature_shape(x.shape, axes)
        self.bshape = broadcast_shape(x.ndim, axes, x.shape)
        self._xw = None

    def _b(self, v):
        return v.reshape(self.bshape)

    def _work(self):
        if self._xw is None:
            self._xw = self.kern._work_array(self.x)
        return self._xw

    def moments(self):
        if self.kern is not None:
            mean, var, self._xw = self.kern.moments(self.x, self.axes)
            return mean.reshape(self.fshape), var.reshape(self.fshape)
        mean, var = _np_moments(self.x, self.axes, self.bshape)
        return mean.reshape(self.fshape), var.reshape(self.fshape)

    def affine(self, mean, scale, bias):
        if self.kern is not None:
            return self.kern.affine(
                self._work(), self.axes, mean.ravel(), scale.ravel(), bias.ravel(), self.x.dtype
            )
        return _np_affine(self.x, self.axes, self._b(mean), self._b(scale), self._b(bias))

    def grad_sums(self, dy, mean):
        if self.kern is not None:
            xw = self._work()
            s1, s2 = self.kern.grad_sums(xw, self.kern.as_work(dy, xw), self.axes, mean.ravel())
        else:
            s1, s2 = _np_grad_sums(self.x, dy, self.axes, self._b(mean))
        return s1.reshape(self.fshape), s2.reshape(self.fshape)

    def input_grad(self, dy, mean, k, p, q):
        if self.kern is not None:
            xw = self._work()
            return self.kern.input_grad(
                xw,
                self.kern.as_work(dy, xw),
                self.axes,
                mean.ravel(),
                k.ravel(),
                p.ravel(),
                q.ravel(),
                self.x.dtype,
            )
        return _np_input_grad(
            self.x, dy, self.axes, self._b(mean), self._b(k), self._b(p), self._b(q)
        )
