"""Choosing a backend: the NumPy reference or the compiled numba kernels.

Both backends are classes with one contract (:class:`batchnorm.backends.numpy.NumpyBackend`
and :class:`batchnorm.backends.numba.backend.NumbaBackend`): ``work``, ``work_dy`` and the four
primitives ``moments``, ``affine``, ``grad_sums`` and ``input_grad``, with the same
signatures. :func:`plan` picks one for an array (once per NumPy signature), with the
checked layout: the one path from a call to its backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._plans import PLANS, cached
from .._validation import Layout, axis_key, layout
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


@dataclass(frozen=True)
class Plan:
    """What a call does with inputs of one signature: the checked :class:`Layout` and
    the backend that runs them (cached in :mod:`batchnorm._plans`).

    Attributes
    ----------
    layout : Layout
    backend : NumpyBackend, NumbaBackend or XpBackend
    """

    layout: Layout
    backend: object


def plan(name: str, x: object, axis: object) -> Plan:
    """The :class:`Plan` of the array ``x`` with feature ``axis`` run by backend ``name``:
    the one validation of the axis against the shape, the layout and the backend choice
    (:func:`_numpy_plan`; arrays of other libraries take the array-API passes of their own
    namespace, :class:`batchnorm.backends.xp.XpBackend`), made once per NumPy signature
    (shape, strides, dtype, axis, backend name; with the module's settings
    ``AUTO_NUMBA_MIN_SIZE`` and ``_load_kernels``, so changing them takes effect). Arrays
    of other libraries get their layout from the cache and their backend (namespace and
    device) per call."""
    if x.__class__ is not np.ndarray and not isinstance(x, np.ndarray):
        return Plan(layout(x.shape, axis), _xp_backend(name, x))
    ak = (axis, int) if axis.__class__ is int else axis_key(axis)  # (the common case inline)
    key = (name, x.shape, x.strides, x.dtype, *ak, AUTO_NUMBA_MIN_SIZE, _load_kernels)
    try:
        found = PLANS.get(key)
    except TypeError:  # an unhashable name or axis: refused with its own message
        return _numpy_plan(name, x, axis)
    return found if found is not None else cached(key, _numpy_plan, name, x, axis)


def _xp_backend(name: object, x: object):
    """The array-API backend of an array that is not a NumPy array (``name`` checked, and
    ignored unless it is "numba", which is refused)."""
    from .xp import xp_backend

    check_backend(name)
    if name == "numba":
        raise ValueError(
            f"backend='numba' runs NumPy arrays only; got a {type(x).__name__} (its own "
            "library's arrays take the array-API path: use backend='auto')"
        )
    return xp_backend(x)


def _numpy_plan(name: object, x: np.ndarray, axis: object) -> Plan:
    """The plan of a NumPy array: ``"auto"`` picks numba when it is importable and either
    the array has at least ``AUTO_NUMBA_MIN_SIZE`` elements (parallel kernels) or it is
    small and its layout is one the serial kernels do in a single pass (NCHW-like channel
    blocks, ``(N, D)`` and channels-last: the demo's (60, 100) batches), judged in the
    array's memory order (a channels-last view of NCHW memory counts as NCHW); feature
    axes that are not adjacent always take the NumPy path, and so do empty arrays (a rank
    holding no rows of a synchronized batch)."""
    check_backend(name)
    lay = layout(x.shape, axis)
    if name == "numpy" or x.size == 0:
        return Plan(lay, NUMPY)
    kern = _load_kernels()
    if kern is None:
        if name == "numba":
            raise ImportError("backend='numba' needs numba: pip install numba")
        return Plan(lay, NUMPY)
    backend = kern.NumbaBackend
    if not backend.supports(lay.axes):
        return Plan(lay, NUMPY)
    if name == "auto" and x.size < AUTO_NUMBA_MIN_SIZE:
        small = kern.small_fused(*kern.memory_shape(x, lay.axes))
        return Plan(lay, backend if small else NUMPY)
    return Plan(lay, backend)
