"""float16 without copies: load/store intrinsics for the kernels, and array converters.

float16 data are read and written as such: the kernels take their bit patterns (uint16)
and convert each value in registers (LLVM ``fpext``/``fptrunc``, i.e. F16C instructions
where the CPU has them; round to nearest even), so no float32 copy is ever made. The
kernels call :func:`ld` and :func:`st`, which compile to the conversion for uint16 and
to nothing for float32/float64.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .plan import guard


@intrinsic
def _h2f(typingctx, bits):  # pragma: no cover - compiled
    """float16 bit pattern (uint16) -> float32, exact (LLVM fpext)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f2h(typingctx, v):  # pragma: no cover - compiled
    """float32 -> float16 bit pattern, rounded to nearest even (LLVM fptrunc)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def ld(v):  # pragma: no cover - replaced in compiled code
    """Load one element in working precision (float16 bits -> float32; floats unchanged)."""
    raise NotImplementedError


@overload(ld, inline="always")
def _ld_impl(v):
    if isinstance(v, types.Integer):
        return lambda v: _h2f(v)
    return lambda v: v


def st(v, out):  # pragma: no cover - replaced in compiled code
    """A working-precision value as it is stored in ``out`` (float16 bits for uint16)."""
    raise NotImplementedError


@overload(st, inline="always")
def _st_impl(v, out):
    if isinstance(out.dtype, types.Integer):
        return lambda v, out: _f2h(np.float32(v))
    return lambda v, out: v


@njit(parallel=True, cache=True, nogil=True)
def _h2f_array(bits, out):  # pragma: no cover - compiled
    for i in prange(bits.size):
        out[i] = _h2f(bits[i])


@njit(parallel=True, cache=True, nogil=True)
def _f2h_array(v, out):  # pragma: no cover - compiled
    for i in prange(v.size):
        out[i] = _f2h(v[i])


def half_to_float(x: np.ndarray) -> np.ndarray:
    """float16 array -> C-contiguous float32 array (exact)."""
    bits = np.ascontiguousarray(x).view(np.uint16).reshape(-1)
    out = np.empty(x.shape, np.float32)
    with guard():
        _h2f_array(bits, out.reshape(-1))
    return out


def float_to_half(y: np.ndarray) -> np.ndarray:
    """float32 array -> float16 array, rounded to nearest even (as NumPy's astype)."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    out = np.empty(y.shape, np.float16)
    with guard():
        _f2h_array(y.reshape(-1), out.reshape(-1).view(np.uint16))
    return out
