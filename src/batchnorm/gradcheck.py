"""Finite-difference gradient checking, in float64.

For a function ``f`` and an upstream gradient ``dy`` the scalar ``L(x) = sum(f(x) * dy)`` has
gradient ``dL/dx``; :func:`numerical_gradient` estimates it by central differences,
``(L(x + h e_i) - L(x - h e_i)) / 2h``, one coordinate at a time. Use a *random* ``dy``: an
all-ones ``dy`` makes batch norm's ``dx`` identically zero and proves nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._validation import check_real

__all__ = ["numerical_gradient", "relative_error"]


def numerical_gradient(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dy: np.ndarray, h: float = 1e-5
) -> np.ndarray:
    """Central-difference estimate of ``d sum(f(x) * dy) / dx``.

    Parameters
    ----------
    f : callable, ndarray -> ndarray
        Must not modify its argument.
    x : ndarray, float64
    dy : ndarray, shape of ``f(x)``
    h : float
        Step; relative to 1, so scale inputs of very different magnitude accordingly.

    Returns
    -------
    ndarray, shape of ``x``, float64

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm.gradcheck import numerical_gradient
    >>> x, dy = np.array([1.0, 2.0]), np.array([1.0, 1.0])
    >>> numerical_gradient(lambda v: v ** 2, x, dy).round(6)
    array([2., 4.])
    """
    h = check_real(h, "h")
    if h <= 0:
        raise ValueError(f"h must be > 0; got {h!r}")
    for name, a in (("x", x), ("dy", dy)):
        if np.iscomplexobj(a) or np.asarray(a).dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a real array; got dtype {np.asarray(a).dtype}")
    x = np.array(x, dtype=np.float64)  # a private copy we may perturb
    dy = np.asarray(dy, dtype=np.float64)
    grad = np.empty_like(x)
    flat_x, flat_g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat_x.size):
        orig = flat_x[i]
        flat_x[i] = orig + h
        plus = float(np.sum(np.asarray(f(x), dtype=np.float64) * dy))
        flat_x[i] = orig - h
        minus = float(np.sum(np.asarray(f(x), dtype=np.float64) * dy))
        flat_x[i] = orig
        flat_g[i] = (plus - minus) / (2.0 * h)
    return grad


def relative_error(estimate: np.ndarray, reference: np.ndarray) -> float:
    """``max|a - b| / max(max|a|, max|b|)``; 0 when both are all zero."""
    a = np.asarray(estimate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(a - b)) / scale)
