"""How the kernels are compiled: numba options shared by every kernel module.

Fast-math lets LLVM contract to FMA, but never assumes the absence of NaN or Inf, which
therefore propagate.
"""

from __future__ import annotations

# Contract to FMA and ignore the sign of zero, but never assume "no NaN/Inf" (they must
# propagate) and never reassociate: reassociation may rewrite sum(x - s) as sum(x) - n*s or
# (x - s)*a as x*a - s*a, which is exactly the cancellation the shift exists to avoid.
# Reductions are instead vectorized by hand with independent accumulators.
FASTMATH = {"contract", "nsz", "arcp"}
OPTS = {
    "parallel": True,
    "fastmath": FASTMATH,
    "cache": True,
    "nogil": True,
    "error_model": "numpy",  # x/0 is inf or NaN, as in NumPy (never an exception)
}
SERIAL_OPTS = {**OPTS, "parallel": False}
