"""Serial compiled helpers for small per-feature vectors (one call instead of a dozen NumPy
operations, each of which costs about a microsecond on a vector of a few hundred values).

Compiled without fast-math: every operation is the IEEE operation NumPy would perform, in
the same order, so the results are bit for bit those of the NumPy expressions they replace.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["running_update"]


@njit(cache=True, nogil=True, error_model="numpy")
def running_update(rm, rv, mean, var, keep, w, wv):  # pragma: no cover - compiled
    """Update the running statistics in place when every new value is finite.

    ``rm = (rm * keep + w * mean)`` and ``rv = (rv * keep + wv * var)``, each formed in
    float64 and rounded once to the buffers' dtype (float32 or float64).

    Parameters
    ----------
    rm, rv : ndarray, shape (C,)
        The running mean and variance (float32 or float64), changed in place.
    mean, var : ndarray, shape (C,)
        The batch mean and (unbiased-to-be) biased variance, float64.
    keep, w, wv : float
        ``1 - w``, the weight of the batch mean, and that of the batch variance.

    Returns
    -------
    bool
        Whether every new value was finite; when not, nothing was changed.
    """
    c = rm.shape[0]
    new_m = np.empty(c, rm.dtype)
    new_v = np.empty(c, rv.dtype)
    for i in range(c):
        new_m[i] = np.float64(rm[i]) * keep + w * mean[i]
        new_v[i] = np.float64(rv[i]) * keep + wv * var[i]
        if not (np.isfinite(new_m[i]) and np.isfinite(new_v[i])):
            return False
    for i in range(c):
        rm[i] = new_m[i]
        rv[i] = new_v[i]
    return True
