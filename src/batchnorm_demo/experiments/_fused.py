"""Fused elementwise steps of the batched networks (numba, one pass, no temporaries).

The same arithmetic as :class:`batchnorm.nn.Sigmoid` (``1/(1+e)`` or ``e/(1+e)`` with
``e = exp(-|x|)``, stable on both tails) and its backward ``dy * y * (1 - y)``; NumPy's
version of each takes six to eight passes over the array, which made the sigmoid as costly
as the first layer's matrix product in the batched demo.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["sigmoid", "sigmoid_backward"]


@numba.njit(cache=True, nogil=True)
def _sigmoid(x, out):
    for i in range(x.size):
        v = x[i]
        e = math.exp(-abs(v))
        out[i] = 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)


@numba.njit(cache=True, nogil=True)
def _sigmoid_backward(dy, y, out):
    for i in range(dy.size):
        out[i] = dy[i] * y[i] * (1.0 - y[i])


@numba.njit(cache=True, nogil=True)
def _sigmoid_backward_scaled(dy, y, s, out):
    for i in range(dy.size):
        out[i] = dy[i] * y[i] * (1.0 - y[i]) * s[i]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function of a float32 or float64 array (a new array, same shape and
    dtype)."""
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _sigmoid(x.reshape(-1), out.reshape(-1))
    return out


def sigmoid_backward(dy: np.ndarray, y: np.ndarray, s: np.ndarray | None = None) -> np.ndarray:
    """``dy * y * (1 - y)`` (times ``s`` when given: noisy BN's scales), for arrays of one
    shape, in the dtype of ``y``."""
    y = np.ascontiguousarray(y)
    dy = np.ascontiguousarray(dy, dtype=y.dtype)
    out = np.empty_like(dy)
    if s is None:
        _sigmoid_backward(dy.reshape(-1), y.reshape(-1), out.reshape(-1))
    else:
        s = np.ascontiguousarray(s, dtype=y.dtype)
        _sigmoid_backward_scaled(dy.reshape(-1), y.reshape(-1), s.reshape(-1), out.reshape(-1))
    return out
