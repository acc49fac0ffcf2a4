"""The NumPy backend: the four primitives every batch-norm pass is made of.

All per-feature arguments are float64 arrays in the broadcast shape of ``x``. See
:mod:`batchnorm.functional` for the equations and the numerics.
"""

from __future__ import annotations

import numpy as np

from ._validation import reduce_axes


def _work_dtype(dtype: np.dtype) -> np.dtype:
    """Precision of the elementwise work: float64 stays, float16/float32 run in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _centre(x: np.ndarray, mean_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``d = x - s`` in working precision and ``delta = mean - s`` in float64.

    ``s`` is ``mean`` rounded to the working precision; ``x - s`` is exact when x and s are
    close (Sterbenz) and correctly rounded otherwise, so ``d - delta`` is ``x - mean`` to
    working precision without a float64 copy of ``x``.
    """
    wt = _work_dtype(x.dtype)
    shift = mean_b.astype(wt)
    d = np.subtract(x, shift, dtype=wt)
    return d, mean_b - shift.astype(np.float64)


def _np_moments(x, axes, bshape):
    """Per-feature mean and biased variance (float64, broadcast shape).

    Two passes: a float64 mean ``m0``, then the mean square of ``d = x - s`` with ``s`` =
    ``m0`` rounded to working precision, less ``(m0 - s)^2``. For float64 input ``d`` is
    exact and the corrected two-pass form also uses ``mean(d)`` to repair summation error
    in ``m0`` (NumPy sums naively along non-contiguous axes, which matters at offsets of
    ~1e9 std); for float16/32 input ``m0`` is already exact to float64 round-off.
    """
    red = reduce_axes(x.ndim, axes)
    m0 = np.mean(x, axis=red, dtype=np.float64, keepdims=True)
    d, delta = _centre(x, m0)
    if d.dtype == np.float64:
        mean_d = np.mean(d, axis=red, dtype=np.float64, keepdims=True)
        mean = (m0 - delta) + mean_d
    else:
        mean_d, mean = delta, m0
    msq = np.mean(np.square(d, out=d), axis=red, dtype=np.float64, keepdims=True)
    return mean, np.maximum(msq - mean_d * mean_d, 0.0)


def _np_affine(x, axes, mean_b, scale_b, bias_b):
    """y = (x - mean) * scale + bias, all per-feature arrays in broadcast shape."""
    d, delta = _centre(x, mean_b)
    wt = d.dtype
    d *= scale_b.astype(wt)
    d += (bias_b - delta * scale_b).astype(wt)
    return d.astype(x.dtype, copy=False)


def _np_grad_sums(x, dy, axes, mean_b):
    """sum(dy) and sum(dy * (x - mean)) per feature, accumulated in float64."""
    red = reduce_axes(x.ndim, axes)
    d, delta = _centre(x, mean_b)
    sum_dy = np.sum(dy, axis=red, dtype=np.float64, keepdims=True)
    d *= dy
    sum_dy_d = np.sum(d, axis=red, dtype=np.float64, keepdims=True)
    return sum_dy, sum_dy_d - delta * sum_dy


def _np_input_grad(x, dy, axes, mean_b, k_b, p_b, q_b):
    """dx = k * dy + p * (x - mean) + q per feature."""
    d, delta = _centre(x, mean_b)
    wt = d.dtype
    d *= p_b.astype(wt)
    d += (q_b - p_b * delta).astype(wt)
    d += np.multiply(dy, k_b.astype(wt), dtype=wt)
    return d.astype(x.dtype, copy=False)


class NumpyBackend:
    """The readable reference backend; same contract as the compiled ``NumbaBackend``.

    Per-feature arguments and results are float64 arrays of the per-feature shape (the sizes
    of the feature axes); ``xw`` is what :meth:`work` returned for the data (here the data
    itself), ``dtype`` the dtype of the result.
    """

    name = "numpy"

    @staticmethod
    def supports(axes: tuple[int, ...]) -> bool:
        """Every layout is supported."""
        return True

    @staticmethod
    def work(x: np.ndarray) -> np.ndarray:
        """The array the primitives read (the input itself: nothing is converted)."""
        return x

    @staticmethod
    def work_dy(dy: np.ndarray, xw: np.ndarray) -> np.ndarray:
        """``dy`` as the primitives read it (unchanged)."""
        return dy

    @staticmethod
    def moments(xw: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 mean and biased variance."""
        fshape = tuple(xw.shape[a] for a in axes)
        mean, var = _np_moments(xw, axes, _bshape(xw, axes))
        return mean.reshape(fshape), var.reshape(fshape)

    @staticmethod
    def affine(xw, axes, mean, scale, bias, dtype) -> np.ndarray:
        """``y = (x - mean) * scale + bias`` per feature, returned in ``dtype``."""
        b = _bshape(xw, axes)
        y = _np_affine(xw, axes, mean.reshape(b), scale.reshape(b), bias.reshape(b))
        return y.astype(dtype, copy=False)

    @staticmethod
    def grad_sums(xw, dyw, axes, mean) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 ``sum(dy)`` and ``sum(dy * (x - mean))``."""
        s1, s2 = _np_grad_sums(xw, dyw, axes, mean.reshape(_bshape(xw, axes)))
        return s1.reshape(mean.shape), s2.reshape(mean.shape)

    @staticmethod
    def input_grad(xw, dyw, axes, mean, k, p, q, dtype) -> np.ndarray:
        """``dx = k * dy + p * (x - mean) + q`` per feature, returned in ``dtype``."""
        b = _bshape(xw, axes)
        dx = _np_input_grad(
            xw, dyw, axes, mean.reshape(b), k.reshape(b), p.reshape(b), q.reshape(b)
        )
        return dx.astype(dtype, copy=False)


def _bshape(x: np.ndarray, axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n if i in axes else 1 for i, n in enumerate(x.shape))
