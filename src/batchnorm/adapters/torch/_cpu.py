"""The compiled kernels on CPU tensors: one cached plan per input signature, NumPy views.

A CPU tensor is handed to the numba kernels (:mod:`batchnorm.backends.numba.kernels`) as a
NumPy view of its memory, with no copy: a contiguous ``(N, C, *)`` tensor as an
``(N, C, I)`` array, a ``channels_last`` one (NHWC / NDHWC in memory) as ``(M, C)``; the
features are axis 1 of the viewed array either way. Any other strides cost one copy.
bfloat16, which NumPy lacks, is computed from a float32 copy and rounded back.

:func:`layout` computes everything that depends only on the input's shape, strides and
dtype once and caches it (the adapter's per-signature plan cache; a candidate for the core).
The statistics are float64 vectors; ``h`` (the kernels' overflow scale) is 1 on this path:
:func:`needs_general` sends the rare inputs that need it (``|mean|`` or the spread within
a quarter of the dtype's range, ``eps < 1e-30``) to the general path
(:mod:`batchnorm.functional`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..._plans import PLANS, cached
from ...backends.numba import kernels as K
from ...backends.numba import small as S
from ...backends.numpy import OVERFLOW_LIMIT
from ...core import coef as F

NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_BIG = {torch.float16: 6.5e4 / 2, torch.float32: 3.4e38 / 2, torch.float64: 1.79e308 / 2}
TINY_EPS = 1e-30
_AXES = (1,)


@dataclass(frozen=True)
class Layout:
    """How tensors of one (shape, strides, dtype) are viewed by the kernels.

    Attributes
    ----------
    copy : bool
        The tensor must first be made contiguous (its strides are neither NCHW nor NHWC).
    channels_last : bool
        Viewed in NHWC / NDHWC memory order.
    view_shape : tuple of int
        The shape of the viewed array (features on axis 1).
    perm : tuple of int or None
        The permutation from ``(N, C, *)`` to memory order (channels_last only).
    compute : torch.dtype
        What the kernels read and write (float32 for bfloat16).
    np_dtype : numpy dtype
    count : int
        Values per feature.
    fmt : torch.memory_format
    kind : int
        What the one-call route does with it (:func:`kind`).
    native : bool
        The kernels read the tensor itself (no copy, no conversion).
    """

    copy: bool
    channels_last: bool
    view_shape: tuple
    perm: tuple | None
    compute: torch.dtype
    np_dtype: type
    count: int
    fmt: torch.memory_format
    kind: int = 0
    native: bool = False


def layout(x: torch.Tensor) -> Layout:
    """The cached :class:`Layout` of ``x``'s signature (the library's one plan cache,
    :mod:`batchnorm._plans`)."""
    key = ("torch", x.shape, x.stride(), x.dtype)
    lay = PLANS.get(key)
    return lay if lay is not None else cached(key, _make_layout, x)


def _make_layout(x: torch.Tensor) -> Layout:
    shape = tuple(x.shape)
    n, c = shape[0], shape[1]
    inner = int(np.prod(shape[2:], dtype=np.int64))
    compute = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
    cl, perm, fmt = False, None, torch.contiguous_format
    if x.dim() in (4, 5) and not x.is_contiguous():
        f = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=f):
            cl, fmt = True, f
            perm = (0, 2, 3, 1) if x.dim() == 4 else (0, 2, 3, 4, 1)
    copy = not cl and not x.is_contiguous()
    view = (n * inner, c) if cl else (n, c, inner)
    k = _kind(view, NP_DTYPES[compute])
    native = not copy and compute is x.dtype
    return Layout(copy, cl, view, perm, compute, NP_DTYPES[compute], n * inner, fmt, k, native)


def arrange(t: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``t`` (detached) in the layout's dtype and memory format: itself when it is."""
    t = t.detach()
    if t.dtype != lay.compute:
        t = t.to(lay.compute)
    if lay.copy or not t.is_contiguous(memory_format=lay.fmt):
        t = t.contiguous(memory_format=lay.fmt)
    return t


def view(t: torch.Tensor, lay: Layout) -> np.ndarray:
    """The NumPy view the kernels read of an arranged tensor (no copy)."""
    a = t.numpy(force=True)
    if lay.perm is not None:
        a = a.transpose(lay.perm)
    return a.reshape(lay.view_shape)


#: The allocator of large outputs: None (torch's), or the native extension's pool
#: (``empty_pooled(x, dtype, memory_format)``, :mod:`.native`), which reuses freed blocks
#: instead of paying their page faults again.
POOLED = None
_POOL_MIN = 1 << 20  # (smaller blocks: torch's allocator, glibc's heap serves them)


def new_like(x: torch.Tensor, dtype=None, memory_format=torch.preserve_format) -> torch.Tensor:
    """``torch.empty_like(x, dtype=dtype, memory_format=memory_format)`` for a CPU ``x``,
    from :data:`POOLED` when set and the output takes at least a MiB."""
    dtype = x.dtype if dtype is None else dtype
    pooled = POOLED  # (read once: another thread may turn it off meanwhile)
    if pooled is not None and x.numel() * dtype.itemsize >= _POOL_MIN:
        return pooled(x, dtype, memory_format)
    return torch.empty_like(x, dtype=dtype, memory_format=memory_format)


def empty(x: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, np.ndarray]:
    """A new tensor shaped like ``x`` in the layout (:func:`new_like`), and its NumPy
    view."""
    t = new_like(x, lay.compute, lay.fmt)  # x: on the CPU
    return t, view(t, lay)


_ONES: dict = {}


def feature64(p: torch.Tensor | None, c: int, fill: float) -> np.ndarray:
    """A per-feature tensor as a float64 NumPy vector (``fill`` everywhere for None)."""
    if p is None:
        key = (c, fill)
        a = _ONES.get(key)
        if a is None:
            a = _ONES[key] = np.full(c, fill)
        return a
    p = p.detach()
    if p.dtype == torch.bfloat16:
        p = p.float()
    return p.numpy().astype(np.float64)


def needs_general(mean: np.ndarray, spread: float, dtype: torch.dtype, eps: float) -> bool:
    """Whether the overflow scale may be needed (or eps is tiny): the general path then."""
    if eps < TINY_EPS:
        return True
    big = _BIG[dtype] / 4
    m = float(np.add.reduce(np.abs(mean)))
    return not (m < big and spread < big * big)


def train(xa: torch.Tensor, lay: Layout, g: np.ndarray, b: np.ndarray, eps: float):
    """``(y, mean, var, inv_std)``: the training forward (y in the compute dtype and
    layout; ``inv_std`` the one the kernel computed and used)."""
    if lay.kind in SMALL:  # (separate vectors: an operator's outputs must not alias)
        y, stats, _ = train_small(xa, lay, g, b, eps)
        return y, stats[0].copy(), stats[1].copy(), stats[2]
    y, yv = empty(xa, lay)
    _, mean, var, inv = K.train(view(xa, lay), _AXES, g, b, eps, lay.np_dtype, yv, return_inv=True)
    return y, mean.copy(), var.copy(), inv


def evaluate(xa, lay: Layout, g, b, mean: np.ndarray, inv: np.ndarray) -> torch.Tensor:
    """``(x - mean) * inv * g + b`` in one pass."""
    y, yv = empty(xa, lay)
    K.affine(view(xa, lay), _AXES, mean, inv * g, b, lay.np_dtype, yv)
    return y


def backward(dya, xa, lay: Layout, mean, inv, g, batch_stats: bool, need_dx: bool = True):
    """``(dx or None, sum_dy, sum_dy_xhat)``: the input gradient and the bias and weight
    gradients (float64 vectors)."""
    if lay.kind in SMALL:  # (separate vectors: an operator's outputs must not alias)
        gw, gb = np.empty(mean.shape[0]), np.empty(mean.shape[0])
        dx = backward_small(dya, xa, lay, mean, inv, g, batch_stats, need_dx, gw, gb)
        return dx, gb, gw
    xv, dyv = view(xa, lay), view(dya, lay)
    if not need_dx:
        s1, s2 = K.grad_sums(xv, dyv, _AXES, mean)
        return None, s1, s2 * inv
    dx, dxv = empty(xa, lay)
    ones = feature64(None, mean.shape[0], 1.0)
    _, s1, s2 = K.backward(xv, dyv, _AXES, mean, inv, inv * g, ones, batch_stats, lay.np_dtype, dxv)
    return dx, s1, s2 * inv


# ---------------------------------------------------------------- the one-call kernels
#: What the one-call route does with a layout: nothing (``OTHER``); training and
#: evaluation up to :data:`SMALL_BYTES` (``ROWS``: one value per feature per row, i.e.
#: ``(N, C)`` or channels-last, viewed ``(O, K)``, one serial call per pass; ``WIDE``:
#: NCHW with at least ``WIDE_INNER`` values per row, viewed ``(N, C, I)``, the fused
#: kernels, parallel from ``SERIAL_MAX`` values); beyond that size (``LARGE``) evaluation
#: only, as one coefficient call and one (parallel) pass.
OTHER, ROWS, WIDE, LARGE = 0, 1, 2, 3
SMALL = (ROWS, WIDE)
#: Largest input the serial one-call kernels take (bytes): it stays in the core's caches,
#: where one thread is as fast as a parallel launch on few cores and needs no launch.
SMALL_BYTES = 1 << 21
_BIG_LIMIT = {t: v / 4 for t, v in _BIG.items()}  # needs_general's bound


def kind(lay: Layout) -> int:
    """``OTHER``, ``ROWS``, ``WIDE`` or ``LARGE`` (see above) for a layout."""
    return lay.kind


def _kind(vs: tuple, np_dtype) -> int:
    size = int(np.prod(vs)) * np.dtype(np_dtype).itemsize
    if 0 in vs or (len(vs) == 3 and 1 < vs[2] < K.WIDE_INNER):  # (an empty input: OTHER)
        return OTHER
    if size > SMALL_BYTES:
        return LARGE
    return ROWS if len(vs) == 2 or vs[2] == 1 else WIDE


def kview(t: torch.Tensor, lay: Layout) -> np.ndarray:
    """The one-call kernels' view of an arranged tensor: ``(O, K)`` for ``ROWS``, ``(N, C,
    I)`` for ``WIDE``; float16 as its bits."""
    a = t.numpy(force=True)
    if a.ndim == 2 and lay.compute is not torch.float16:
        return a  # an (N, C) tensor: its own view (the common small case, no reshape)
    if lay.perm is not None:
        a = a.transpose(lay.perm)
    vs = lay.view_shape
    a = a.reshape(vs if len(vs) == 2 or vs[2] != 1 else vs[:2])
    return a.view(np.uint16) if a.dtype == np.float16 else a


def grad_kview(dy: torch.Tensor, lay: Layout) -> np.ndarray:
    """:func:`kview` of an incoming gradient, arranged first only when its dtype or
    memory format differs from the layout's (an expanded or transposed gradient)."""
    if dy.dtype is lay.compute and not lay.copy and dy.is_contiguous(memory_format=lay.fmt):
        return kview(dy, lay)
    return kview(arrange(dy, lay), lay)


def train_small(xa, lay: Layout, g, b, eps: float):
    """``(y, stats, plain)``: the training forward of a ``ROWS`` or ``WIDE`` input in one
    call of the fused kernels (``stats`` rows: mean, biased var, inv_std, float64;
    ``plain``: not :func:`needs_general`); ``g``, ``b`` per-feature vectors of any float
    dtype."""
    y = new_like(xa)
    c = g.shape[0]
    stats = np.empty((3, c))
    coef = np.empty((4, c), _WORK[lay.compute])
    limit = _BIG_LIMIT[lay.compute]
    xk, yk = kview(xa, lay), kview(y, lay)
    if lay.kind == ROWS:
        plain = S.train_rows(xk, g, b, float(eps), _OVERFLOW[lay.compute], limit, coef, yk, stats)
    elif K.train_wide_direct(xk, g, b, float(eps), coef, yk, stats):
        plain = S.plain_stats(stats, lay.count, limit)
    else:  # one channel on several threads: the plan driver's two passes
        res = K.train(view(xa, lay), _AXES, g, b, eps, None, view(y, lay), return_inv=True)
        stats[0], stats[1], stats[2] = res[1:]
        plain = S.plain_stats(stats, lay.count, limit)
    return y, stats, plain and eps >= TINY_EPS


def backward_small(dya, xa, lay: Layout, mean, inv, g, batch_stats: bool, need_dx: bool, gw, gb):
    """``dx`` (None unless ``need_dx``) of a ``ROWS`` input in one serial call (``WIDE``:
    the fused kernels); ``dya`` the incoming gradient, arranged here if it must be;
    ``gw``, ``gb`` receive the weight and bias gradients ``sum(dy * x_hat)`` and ``sum(dy)``
    (each in its own dtype)."""
    dx = new_like(xa) if need_dx else None
    c = mean.shape[0]
    if lay.kind == ROWS:
        xv = kview(xa, lay)
        out = xv[:0] if dx is None else kview(dx, lay)
        coef = np.empty((5, c), _WORK[lay.compute])
        S.backward_rows(
            xv, grad_kview(dya, lay), mean, inv, g, bool(batch_stats), coef, out, gw, gb
        )
        return dx
    s1, s2 = np.empty((2, c))
    if dx is not None:  # the fused kernel on the one-call views: no plan, no copies
        coef = np.empty((5, c), _WORK[lay.compute])
        xk, dyk, dxk = kview(xa, lay), grad_kview(dya, lay), kview(dx, lay)
        args = (mean, inv, inv * g, bool(batch_stats), coef, dxk, s1, s2)
        done = K.backward_wide_direct(xk, dyk, *args)
    if dx is None or not done:
        xv, dyv = view(xa, lay), view(arrange(dya, lay), lay)
        if dx is None:
            s1, s2 = K.grad_sums(xv, dyv, _AXES, mean)
        else:
            h = feature64(None, c, 1.0)
            _, s1, s2 = K.backward(
                xv, dyv, _AXES, mean, inv, inv * g, h, batch_stats, None, view(dx, lay)
            )
    S.param_grads(s1, s2, inv, gw, gb)
    return dx


def evaluate_direct(xa, lay: Layout, g, b, rm, rv, eps: float) -> torch.Tensor | None:
    """Evaluation with the running statistics in one coefficient call and one pass
    (``ROWS``/``WIDE`` layouts); every per-feature vector in its own dtype. None when the
    running mean is too large for the plain form (the caller takes the general path)."""
    coef = np.empty((4, rm.shape[0]), _WORK[lay.compute])
    y = new_like(xa)
    xk, yk = kview(xa, lay), kview(y, lay)
    limit = _BIG_LIMIT[lay.compute]
    if xk.size < K.SERIAL_MAX:  # coefficients and pass in one serial call
        run = S.eval_rows if xk.ndim == 2 else S.eval_wide
        return y if run(xk, g, b, rm, rv, float(eps), limit, coef, yk) else None
    if not S.eval_coef(g, b, rm, rv, float(eps), limit, coef):
        return None
    K.affine_pass(xk, coef, yk)
    return y


_WORK = {torch.float16: np.float32, torch.float32: np.float32, torch.float64: np.float64}
_OVERFLOW = {t: OVERFLOW_LIMIT[np.dtype(w).itemsize] for t, w in _WORK.items()}


def kernel_limits(dtype: torch.dtype) -> tuple[float, float]:
    """``(big, limit)``: the overflow bound of the working precision and
    :func:`needs_general`'s bound, as :func:`train_small` hands them to the kernels."""
    return _OVERFLOW[dtype], _BIG_LIMIT[dtype]


def inv_std(var: np.ndarray, eps: float) -> np.ndarray:
    """``1 / sqrt(var + eps)`` (float64; :func:`batchnorm.core.coef.inv_std`)."""
    if eps > 0:  # var >= 0 or NaN: no warning to silence
        return F.inv_std(var, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        return F.inv_std(var, eps)
