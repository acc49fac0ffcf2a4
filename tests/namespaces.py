"""Namespace cases shared by the array-API tests (the style of scikit-learn's helpers):
each case is a (namespace, device, dtype) with conversions to and from NumPy."""

from __future__ import annotations

import contextlib

import array_api_compat
import numpy as np
import pytest

from batchnorm import _xp

U32 = 2.0**-24
NAMESPACES = ("numpy", "strict", "strict-device1", "strict-no_float64", "torch", "jax", "jax-x64")
NO_FLOAT64 = ("strict-no_float64", "jax")
HAS_BF16 = ("torch", "jax", "jax-x64")
#: |y - ref| <= TOL * (1 + |ref|) for y in each dtype (float32: a few ulp of y ~ 1)
TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
LAYOUTS = [
    ((64, 5), 1),
    ((64, 5), -1),
    ((6, 3, 4, 5), 1),
    ((6, 3, 4, 5), -1),
    ((6, 3, 4, 5), (1, 3)),
]


def marks_for(name: str) -> tuple:
    """pytest marks of a namespace case: JAX's are slow (a jit compilation per shape and dtype,
    seconds each), so the quick subset (``-m "not slow"``) leaves them out."""
    return (pytest.mark.slow,) if name.startswith("jax") else ()


def namespace_param(name: str):
    """A namespace name as a pytest parameter, with :func:`marks_for`'s marks."""
    return pytest.param(name, marks=marks_for(name), id=name)


@contextlib.contextmanager
def _namespace(name):
    """``(xp, device)`` of a namespace case, with JAX's x64 flag set for its duration."""
    if name == "numpy":
        yield array_api_compat.array_namespace(np.ones(1)), "cpu"
    elif name.startswith("strict"):
        s = pytest.importorskip("array_api_strict")
        yield s, s.Device(name.partition("-")[2] or "CPU_DEVICE")
    elif name == "torch":
        torch = pytest.importorskip("torch")
        yield array_api_compat.array_namespace(torch.ones(1)), torch.device("cpu")
    else:
        jax = pytest.importorskip("jax")
        with jax.enable_x64(name == "jax-x64"):
            yield jax.numpy, jax.devices("cpu")[0]


class Case:
    """One (namespace, device, dtype) combination and conversions to and from NumPy."""

    def __init__(self, name, xp, device, dtype):
        self.name, self.xp, self.device, self.dtype_name = name, xp, device, dtype
        self.dtype = getattr(xp, dtype)
        self.sdt = _xp.stats_dtype(xp, device)

    def arr(self, a, dtype=None):
        """NumPy data as an array of the case (in its dtype, or ``dtype``)."""
        dt = self.dtype if dtype is None else dtype
        return self.xp.asarray(
            np.asarray(a, np.float32 if dt != self.xp.float64 else None),
            dtype=dt,
            device=self.device,
        )

    def feat(self, a):
        """A per-feature array in the statistics dtype."""
        return self.arr(a, self.sdt)

    @staticmethod
    def np(a):
        """Back to NumPy, in float64."""
        return np.asarray(_xp.to_numpy(a), dtype=np.float64)

    def close(self, got, ref, tol=None, what=""):
        got, ref = self.np(got), np.asarray(ref, np.float64)
        tol = TOL[self.dtype_name] if tol is None else tol
        err = np.abs(got - ref) / (1 + np.abs(ref))
        assert err.max() <= tol, f"{what} {self.name} {self.dtype_name}: error {err.max():.3g}"
