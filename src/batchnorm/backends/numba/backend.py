"""The compiled backend: :class:`NumbaBackend`, the drivers of
:mod:`~batchnorm.backends.numba.kernels` behind the contract of
:class:`batchnorm.backends.numpy.NumpyBackend`.

Every array is read in its memory order: an input that is a transpose of a C-contiguous
array (channels-last data viewed as NCHW, or NCHW data viewed as channels-last) runs
through its memory-order view with the feature axes renumbered, exactly as that
C-contiguous array would (see :func:`~batchnorm.backends.numba.plan.to_memory`), and the
results come back laid out in memory like the input, as NumPy's ufuncs do. Gathering such
an input into a C-contiguous copy first cost ~10x the kernels themselves (a strided copy).
"""

from __future__ import annotations

import numpy as np

from ..numpy import NumpyArrays
from . import kernels as K
from . import plan as P
from .plan import from_memory, memory_perm, memory_shape, small_fused, to_memory

__all__ = ["NumbaBackend", "memory_shape", "small_fused"]


def _layout(a: np.ndarray):
    """ "C" for a C-contiguous array, its memory order for a transpose of one, else None."""
    return "C" if a.flags.c_contiguous else memory_perm(a)


def _out_view(perm, out):
    """``out`` as the kernels write it (its memory-order view), or None when given none or
    one laid out unlike the input (the result then goes through a temporary)."""
    if out is None:
        return None
    o = out if perm is None else out.transpose(perm)
    return o if o.flags.c_contiguous else None


def _result(perm, res: np.ndarray, out, o) -> np.ndarray:
    """The kernels' result ``res`` as the caller's array: ``out`` when given (copied into it
    when it could not be written directly, ``o`` None), else ``res`` in logical order."""
    if out is None:
        return from_memory(perm, res)
    if o is None:
        np.copyto(out, from_memory(perm, res))
    return out


class NumbaBackend(NumpyArrays):
    """The compiled backend; same contract as :class:`batchnorm.backends.numpy.NumpyBackend`.

    Per-feature arguments and results are float64 arrays of the per-feature shape. ``xw``
    is the array returned by :meth:`work`: ``x`` itself when it is C-contiguous or a
    transpose of a C-contiguous array, a C-contiguous copy otherwise; float16 is read as
    float16, so nothing is converted.
    """

    name = "numba"

    @staticmethod
    def supports(axes: tuple[int, ...]) -> bool:
        """Whether this backend handles these feature axes (they must be adjacent)."""
        return K.supported(axes)

    @staticmethod
    def work(x: np.ndarray) -> np.ndarray:
        """The array the kernels read: ``x`` itself when C-contiguous or a transpose of a
        C-contiguous array (read in its memory order), else a C-contiguous copy."""
        return x if _layout(x) is not None else P.contiguous(x)

    @staticmethod
    def work_dy(dy: np.ndarray, xw: np.ndarray) -> np.ndarray:
        """``dy`` as the kernels read it: laid out in memory like ``xw`` (a copy only when it
        is not), in its own dtype (a float64 ``dy`` is used in float64 with float32 data,
        exactly as the NumPy backend does)."""
        want = _layout(xw)
        if _layout(dy) == want:
            return dy
        if want is None or want == "C":
            return P.contiguous(dy)
        return from_memory(want, P.contiguous(dy.transpose(want)))  # copied in xw's order

    @staticmethod
    def moments(xw: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 mean and biased variance."""
        ref, delta, var = NumbaBackend.moments_shifted(xw, axes)
        return ref + delta, var

    @staticmethod
    def affine(xw, axes, mean, scale, bias, dtype, out=None, h=None, delta=0.0) -> np.ndarray:
        """``y = (x - mean) * scale + bias`` per feature, returned in ``dtype`` (into
        ``out`` when given); ``h`` the per-feature overflow scale (default 1); with
        ``delta`` the mean is ``mean + delta`` held unrounded."""
        perm, maxes, (xm,) = to_memory(axes, xw)
        o = _out_view(perm, out)
        h = None if h is None else h.ravel()
        d = delta if isinstance(delta, float) else delta.ravel()
        y = K.affine(xm, maxes, mean.ravel(), scale.ravel(), bias.ravel(), dtype, o, h, d)
        return _result(perm, y, out, o)

    @staticmethod
    def moments_shifted(xw: np.ndarray, axes: tuple[int, ...]):
        """Per-feature float64 ``(ref, delta, var)``: the mean ``ref + delta`` unrounded."""
        fshape = tuple(xw.shape[a] for a in axes)
        _, maxes, (xm,) = to_memory(axes, xw)
        return tuple(v.reshape(fshape) for v in K.moments_shifted(xm, maxes))

    @staticmethod
    def train(xw, axes, gamma, beta, eps, dtype, out=None):
        """Training forward: ``(y, mean, var, inv_std)``; statistics and output in one trip
        when the blocks fit in cache. ``gamma``/``beta`` float64 per feature (not None)."""
        fshape = gamma.shape  # the per-feature shape
        perm, maxes, (xm,) = to_memory(axes, xw)
        o = _out_view(perm, out)
        y, mean, var, inv = K.train(xm, maxes, gamma.ravel(), beta.ravel(), eps, dtype, o, True)
        y = _result(perm, y, out, o)
        return y, mean.reshape(fshape), var.reshape(fshape), inv.reshape(fshape)

    @staticmethod
    def grad_sums(xw, dyw, axes, mean, h=None) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature float64 ``sum(dy)`` and ``sum(dy * (x - mean))``."""
        fshape = mean.shape
        h = None if h is None else h.ravel()
        _, maxes, (xm, dym) = to_memory(axes, xw, dyw)
        s1, s2 = K.grad_sums(xm, dym, maxes, mean.ravel(), h)
        return s1.reshape(fshape), s2.reshape(fshape)

    @staticmethod
    def input_grad(xw, dyw, axes, mean, k, p, q, dtype, out=None, h=None) -> np.ndarray:
        """``dx = k * dy + p * (x - mean) + q`` per feature, returned in ``dtype``."""
        perm, maxes, (xm, dym) = to_memory(axes, xw, dyw)
        o = _out_view(perm, out)
        h = None if h is None else h.ravel()
        vec = (mean.ravel(), k.ravel(), p.ravel(), q.ravel())
        dx = K.input_grad(xm, dym, maxes, *vec, dtype, o, h)
        return _result(perm, dx, out, o)

    @staticmethod
    def backward(xw, dyw, axes, mean, inv, k, h, batch_stats, dtype, out=None):
        """Backward: ``(dx, sum_dy, sum_dy_xc)``, in one trip when the blocks fit in cache."""
        fshape = mean.shape
        perm, maxes, (xm, dym) = to_memory(axes, xw, dyw)
        o = _out_view(perm, out)
        h = np.ones(mean.size) if h is None else h.ravel()
        vec = (mean.ravel(), inv.ravel(), k.ravel(), h)
        dx, s1, s2 = K.backward(xm, dym, maxes, *vec, batch_stats, dtype, o)
        return _result(perm, dx, out, o), s1.reshape(fshape), s2.reshape(fshape)
