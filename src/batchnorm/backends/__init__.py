"""Choosing a backend: the NumPy reference or the compiled numba kernels.

Both backends are classes with one contract (:class:`batchnorm.backends.numpy.NumpyBackend`
and :class:`batchnorm.backends.numba.backend.NumbaBackend`): ``work``, ``work_dy`` and the four
primitives ``moments``, ``affine``, ``grad_sums`` and ``input_grad``, with the same
signatures. :func:`select` picks one for an array.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .numpy import NumpyBackend

BACKENDS = ("auto", "numpy", "numba")
# Below this many elements "auto" stays with NumPy: launching the compiled parallel kernels
# costs ~70 us per call, more than NumPy needs for the whole job (measured crossover ~16K
# elements on 2 cores), and small arrays interleaved with BLAS calls suffer most from
# thread contention.
AUTO_NUMBA_MIN_SIZE = 1 << 15
# Small arrays of the layouts the compiled kernels fuse run in serial compiled kernels
# (no thread launch): one pass instead of ~8 NumPy passes and ~20 small NumPy calls.
_kernels_module = None
NUMPY = NumpyBackend()


def _load_kernels():
    """The compiled kernels module, or None when numba is not importable (imported lazily)."""
    global _kernels_module
    if _kernels_module is None:
        try:
            from .numba import backend as _numba_kernels
        except ImportError:
            _kernels_module = False
        else:
            _kernels_module = _numba_kernels
    return _kernels_module or None


def numba_available() -> bool:
    """Whether the compiled backend can be used (numba importable)."""
    return _load_kernels() is not None


def check_backend(name: object) -> str:
    """Validate a ``backend=`` argument."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return name


def select(name: str, x: object, lay=None):
    """The backend object to run the array ``x`` (of layout ``lay``) on.

    Arrays that are not NumPy arrays take the array-API passes of their own namespace
    (:class:`batchnorm.backends.xp.XpBackend`; ``name`` is then ignored unless it is
    "numba", which is refused). For NumPy arrays, ``"auto"`` picks numba when it is
    importable and either the array has at least ``AUTO_NUMBA_MIN_SIZE`` elements
    (parallel kernels) or it is small and its layout is one the serial kernels do in a
    single pass (NCHW-like channel blocks, ``(N, D)`` and channels-last: the demo's
    (60, 100) batches), judged in the array's memory order (a channels-last view of NCHW
    memory counts as NCHW); feature axes that are not adjacent always take the NumPy path,
    and so do empty arrays (a rank holding no rows of a synchronized batch).
    """
    if name.__class__ is not str or name not in BACKENDS:
        check_backend(name)
    if not isinstance(x, np.ndarray):
        from .xp import xp_backend

        if name == "numba":
            raise ValueError(
                f"backend='numba' runs NumPy arrays only; got a {type(x).__name__} (its own "
                "library's arrays take the array-API path: use backend='auto')"
            )
        return xp_backend(x)
    if name == "numpy" or x.size == 0:
        return NUMPY
    key = (x.shape, x.strides, x.itemsize, lay.axes)
    return _numpy_route(name, *key, AUTO_NUMBA_MIN_SIZE, _load_kernels)


@functools.lru_cache(maxsize=1024)
def _numpy_route(name, shape, strides, itemsize, axes, min_size, load_kernels):
    """The backend of a non-empty NumPy array of this shape, memory layout (strides,
    itemsize) and feature axes, decided once per distinct signature: what every later call
    with such an input reuses. ``min_size`` and ``load_kernels`` are the module's settings
    at the call (part of the key, so changing them takes effect)."""
    kern = load_kernels()
    if kern is None:
        if name == "numba":
            raise ImportError("backend='numba' needs numba: pip install numba")
        return NUMPY
    backend = kern.NumbaBackend
    if not backend.supports(axes):
        return NUMPY
    if name == "auto" and math.prod(shape) < min_size:
        # an array of that layout over no memory (its strides are all memory_shape reads)
        base = np.empty(0, np.dtype(f"f{itemsize}"))
        like = np.lib.stride_tricks.as_strided(base, shape, strides, writeable=False)
        return backend if kern.small_fused(*kern.memory_shape(like, axes)) else NUMPY
    return backend
