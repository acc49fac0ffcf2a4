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
# Without fast-math: every operation the IEEE one, so that a kernel's values do not depend
# on how LLVM compiles a loop in one caller or another (two compilations of one loop may
# contract different multiply-adds to FMA: the native torch node's strips of columns and the
# Python route's one call of the same kernel measured 1-ulp apart in 29% of the outputs).
# A helper called by kernels of both kinds states ``fastmath=False`` itself: numba compiles
# a callee without its own fastmath option with its first caller's, and caches it under a
# key without the flags (a C entry point once linked a coefficient helper compiled for a
# fast-math caller, x / n as x * (1 / n), 1 ulp from the Python route's).
EXACT_OPTS = {**SERIAL_OPTS, "fastmath": False}
