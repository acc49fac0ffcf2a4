"""Choosing a backend: the NumPy reference or the compiled numba kernels.

Both backends are classes with one contract (:class:`batchnorm._numpy_kernels.NumpyBackend`
and :class:`batchnorm._numba_kernels.NumbaBackend`): ``work``, ``work_dy`` and the four
primitives ``moments``, ``affine``, ``grad_sums`` and ``input_grad``, with the same
signatures. :func:`select` picks one for an array.
"""

from __future__ import annotations

from ._numpy_kernels import NumpyBackend

BACKENDS = ("auto", "numpy", "numba")
# Below this many elements "auto" stays with NumPy: launching the compiled parallel kernels
# costs ~70 us per call, more than NumPy needs for the whole job (measured crossover ~16K
# elements on 2 cores), and small arrays interleaved with BLAS calls suffer most from
# thread contention.
AUTO_NUMBA_MIN_SIZE = 1 << 15
_kernels_module = None
NUMPY = NumpyBackend()


def _load_kernels():
    """The compiled kernels module, or None when numba is not importable (imported lazily)."""
    global _kernels_module
    if _kernels_module is None:
        try:
            from . import _numba_kernels
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


def select(name: str, size: int, axes: tuple[int, ...]):
    """The backend object to run an array of ``size`` elements with feature ``axes``.

    ``"auto"`` picks numba when it is importable and ``size >= AUTO_NUMBA_MIN_SIZE``;
    feature axes that are not adjacent always take the NumPy path.
    """
    check_backend(name)
    if name == "numpy" or (name == "auto" and size < AUTO_NUMBA_MIN_SIZE):
        return NUMPY
    kern = _load_kernels()
    if kern is None:
        if name == "numba":
            raise ImportError("backend='numba' needs numba: pip install numba")
        return NUMPY
    backend = kern.NumbaBackend
    return backend if backend.supports(axes) else NUMPY
