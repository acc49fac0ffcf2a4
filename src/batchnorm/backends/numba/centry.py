"""C entry points of the one-call kernels, for compiled callers (the torch adapter's opt-in
native autograd node, :mod:`batchnorm.adapters.torch.native`).

Each entry point takes raw pointers and sizes, views them as arrays (``numba.carray``, no
copy) and calls the compiled kernels the Python route calls, with the same arguments: the
serial fused kernels of :mod:`.small` (``train_rows``, ``backward_rows``; their cores on a
range of columns, ``train_cols`` and ``backward_cols``, with ``plain_stats``, for the
strips of columns the caller runs on its own threads) and the serial copies of
:mod:`.passes`' ``_train_wide`` / ``_backward_wide`` (:func:`.kernels.kernel`), and their
parallel compilations from :data:`~.plan.SERIAL_MAX` elements, as
:func:`.kernels.train_wide_direct` and :func:`.kernels.backward_wide_direct` choose (the
caller sends the Python route inputs with fewer channels than threads there, and calls
the parallel kernels only where :func:`parallel_safe`)).
There is no second implementation of the maths here, only the argument plumbing.

Nothing is compiled at import: :func:`addresses` compiles the entry points of one dtype
(``numba.cfunc``, cached on disk like the kernels) and returns their machine addresses.

Layouts (C-contiguous, features on axis 1): ``ROWS`` ``(O, K)``, ``WIDE`` ``(N, C, I)``.
Per-feature vectors (``g``, ``b``, ``gw``, ``gb``) are in the input's dtype; ``stats``
``(3, C)`` float64 holds the mean, the biased variance and ``1/sqrt(var + eps)``;
``coef`` is scratch of ``5 * C`` values in the input's dtype.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import carray, cfunc, types

from . import kernels
from .plan import SERIAL_MAX, guard
from .small import (
    backward_cols,
    eval_coef,
    eval_rows,
    eval_wide,
    param_grads,
    plain_stats,
    running_update,
    train_cols,
)

__all__ = ["NAMES", "addresses", "eval_address", "parallel_safe"]

#: The entry points, in the order :func:`addresses` returns them.
NAMES = (
    "train_rows",
    "train_wide",
    "backward_rows",
    "backward_wide",
    "train_cols",
    "backward_cols",
    "plain_stats",
    "running_update",
)

_TRAIN_WIDE = kernels.kernel("_train_wide", serial=True)
_BACKWARD_WIDE = kernels.kernel("_backward_wide", serial=True)
_TRAIN_WIDE_PAR = kernels.kernel("_train_wide", serial=False)
_BACKWARD_WIDE_PAR = kernels.kernel("_backward_wide", serial=False)
_AFFINE_ROWS_PAR = kernels.kernel("_affine_rows", serial=False)
_AFFINE_WIDE_PAR = kernels.kernel("_affine_wide", serial=False)


@numba.njit(inline="always")
def _train_views(x, g, b, eps, big, coef, y, stats, o, k, k0, w):  # pragma: no cover
    """``train_cols`` on views of the raw buffers."""
    train_cols(
        carray(x, (o, k)),
        carray(g, (k,)),
        carray(b, (k,)),
        eps,
        big,
        carray(coef, (4, k)),
        carray(y, (o, k)),
        carray(stats, (3, k)),
        k0,
        w,
    )


def _train_rows_c(x, g, b, eps, big, limit, coef, y, stats, o, k):  # pragma: no cover
    """``train_rows`` (``train_cols`` over every column, then ``plain_stats``) on an
    ``(o, k)`` input; returns 1 when the plain form serves."""
    _train_views(x, g, b, eps, big, coef, y, stats, o, k, 0, k)
    return 1 if plain_stats(carray(stats, (3, k)), o, limit) else 0


def _train_cols_c(x, g, b, eps, big, coef, y, stats, o, k, k0, w):  # pragma: no cover
    """``train_cols`` on the columns ``k0 .. k0 + w`` of an ``(o, k)`` input (every
    pointer the whole array's); no flag (:func:`_plain_c` after the last strip)."""
    _train_views(x, g, b, eps, big, coef, y, stats, o, k, k0, w)
    return 1


def _plain_c(stats, k, count, limit):  # pragma: no cover - compiled
    """``plain_stats`` of the ``(3, k)`` statistics of ``count`` values per feature."""
    return 1 if plain_stats(carray(stats, (3, k)), count, limit) else 0


def _train_wide_c(x, g, b, eps, big, limit, rescale, coef, y, stats, n, c, i):  # pragma: no cover
    """``_train_wide`` (serial below ``SERIAL_MAX`` elements) on an ``(n, c, i)`` input,
    then ``plain_stats``."""
    xa = carray(x, (n, c, i))
    ya = carray(y, (n, c, i))
    ga = carray(g, (c,))
    ba = carray(b, (c,))
    ca = carray(coef, (4, c))
    sa = carray(stats, (3, c))
    if n * c * i < SERIAL_MAX:
        _TRAIN_WIDE(xa, ga, ba, eps, big, rescale, ca, ya, sa[0], sa[1], sa[2])
    else:
        _TRAIN_WIDE_PAR(xa, ga, ba, eps, big, rescale, ca, ya, sa[0], sa[1], sa[2])
    return 1 if plain_stats(sa, n * i, limit) else 0


@numba.njit(inline="always")
def _backward_views(x, dy, stats, g, coef, dx, gw, gb, o, k, o_out, k0, w):  # pragma: no cover
    """``backward_cols`` on views of the raw buffers (batch statistics)."""
    sa = carray(stats, (3, k))
    backward_cols(
        carray(x, (o, k)),
        carray(dy, (o, k)),
        sa[0],
        sa[2],
        carray(g, (k,)),
        True,
        carray(coef, (5, k)),
        carray(dx, (o_out, k)),
        carray(gw, (k,)),
        carray(gb, (k,)),
        k0,
        w,
    )


def _backward_rows_c(x, dy, stats, g, coef, dx, gw, gb, o, k, o_out):  # pragma: no cover
    """``backward_rows`` (batch statistics: ``backward_cols`` over every column) on an
    ``(o, k)`` input; ``dx`` gets ``o_out`` rows (``o`` or 0: parameter gradients only)."""
    _backward_views(x, dy, stats, g, coef, dx, gw, gb, o, k, o_out, 0, k)
    return 1


def _backward_cols_c(x, dy, stats, g, coef, dx, gw, gb, o, k, o_out, k0, w):  # noqa: E501  # pragma: no cover
    """``backward_cols`` on the columns ``k0 .. k0 + w`` of an ``(o, k)`` input (see
    :func:`_backward_rows_c`)."""
    _backward_views(x, dy, stats, g, coef, dx, gw, gb, o, k, o_out, k0, w)
    return 1


def _backward_wide_c(x, dy, stats, g, coef, dx, gw, gb, n, c, i):  # pragma: no cover
    """``_backward_wide`` (batch statistics, ``h = 1``; serial below ``SERIAL_MAX``
    elements) on an ``(n, c, i)`` input, then ``param_grads``: the Python route's
    ``backward_small`` with ``dx``."""
    sa = carray(stats, (3, c))
    ga = carray(g, (c,))
    inv = sa[2]
    k = np.empty(c, np.float64)
    for j in range(c):
        k[j] = inv[j] * np.float64(ga[j])
    h = np.ones(c, np.float64)
    s = np.empty((2, c), np.float64)
    xa = carray(x, (n, c, i))
    dya, dxa, ca = carray(dy, (n, c, i)), carray(dx, (n, c, i)), carray(coef, (5, c))
    if n * c * i < SERIAL_MAX:
        _BACKWARD_WIDE(xa, dya, sa[0], inv, k, h, True, ca, dxa, s[0], s[1])
    else:
        _BACKWARD_WIDE_PAR(xa, dya, sa[0], inv, k, h, True, ca, dxa, s[0], s[1])
    param_grads(s[0], s[1], inv, carray(gw, (c,)), carray(gb, (c,)))
    return 1


def _running_update_c(rm, rv, stats, c, keep, w, wv):  # pragma: no cover
    """``running_update`` of ``c`` running statistics (the input's dtype) from the batch
    mean and biased variance (``stats`` rows 0 and 1); returns 0, changing nothing, where a
    new value would not be finite."""
    sa = carray(stats, (3, c))
    ok = running_update(carray(rm, (c,)), carray(rv, (c,)), sa[0], sa[1], keep, w, wv)
    return 1 if ok else 0


def _eval_c(x, g, b, rm, rv, eps, limit, coef, y, n, c, i, nchunks):  # pragma: no cover
    """Evaluation with the running statistics of an ``(n, c)`` (``i == 0``) or ``(n, c, i)``
    input, as :func:`batchnorm.adapters.torch._cpu.evaluate_direct`: ``eval_rows`` /
    ``eval_wide`` below ``SERIAL_MAX`` elements, else ``eval_coef`` and the parallel
    affine pass (``nchunks`` row chunks); returns 0 (nothing written) where the running
    mean is too large for the plain form."""
    ga, ba, ma, va = carray(g, (c,)), carray(b, (c,)), carray(rm, (c,)), carray(rv, (c,))
    ca = carray(coef, (4, c))
    if i == 0:
        xa, ya = carray(x, (n, c)), carray(y, (n, c))
        if n * c < SERIAL_MAX:
            return 1 if eval_rows(xa, ga, ba, ma, va, eps, limit, ca, ya) else 0
        if not eval_coef(ga, ba, ma, va, eps, limit, ca):
            return 0
        _AFFINE_ROWS_PAR(xa, ca, ya, nchunks)
        return 1
    xw, yw = carray(x, (n, c, i)), carray(y, (n, c, i))
    if n * c * i < SERIAL_MAX:
        return 1 if eval_wide(xw, ga, ba, ma, va, eps, limit, ca, yw) else 0
    if not eval_coef(ga, ba, ma, va, eps, limit, ca):
        return 0
    _AFFINE_WIDE_PAR(xw, ca, yw)
    return 1


_EVAL: dict = {}


def eval_address(x_dtype, g_dtype, b_dtype, m_dtype, v_dtype) -> int:
    """The address of the evaluation entry point for an input of ``x_dtype`` (float16,
    float32 or float64; float16 read as its bits) with a weight, bias, running mean and
    running variance of the given dtypes (float32 or float64), compiled on the first call
    (cached on disk afterwards)."""
    xd = np.dtype(x_dtype)
    vec = [np.dtype(d) for d in (g_dtype, b_dtype, m_dtype, v_dtype)]
    floats = (np.dtype(np.float32), np.dtype(np.float64))
    if xd not in (np.dtype(np.float16), *floats) or any(d not in floats for d in vec):
        raise TypeError(
            f"the evaluation entry point takes a float16/32/64 input with float32/64 vectors, "
            f"not {xd} with {[str(d) for d in vec]}"
        )
    key = (xd, *vec)
    if key not in _EVAL:
        parallel_safe()  # (the threading layer first, as in addresses)
        x = (
            types.uint16
            if xd == np.float16
            else types.float32
            if xd == floats[0]
            else types.float64
        )
        w = types.float32 if xd != floats[1] else types.float64  # the working precision
        p = [types.CPointer(types.float32 if d == floats[0] else types.float64) for d in vec]
        f, n = types.float64, types.int64
        px, pw = types.CPointer(x), types.CPointer(w)
        sig = types.int32(px, *p, f, f, pw, px, n, n, n, n)
        _EVAL[key] = cfunc(sig, cache=True)(_eval_c)
    return _EVAL[key].address


def _signatures(dtype) -> dict:
    t = types.float32 if np.dtype(dtype) == np.float32 else types.float64
    p, d, f, n, r = (
        types.CPointer(t),
        types.CPointer(types.float64),
        types.float64,
        types.int64,
        types.int32,
    )
    return {  # fmt: skip
        "train_rows": (_train_rows_c, r(p, p, p, f, f, f, p, p, d, n, n)),
        "train_wide": (_train_wide_c, r(p, p, p, f, f, f, f, p, p, d, n, n, n)),
        "backward_rows": (_backward_rows_c, r(p, p, d, p, p, p, p, p, n, n, n)),
        "backward_wide": (_backward_wide_c, r(p, p, d, p, p, p, p, p, n, n, n)),
        "train_cols": (_train_cols_c, r(p, p, p, f, f, p, p, d, n, n, n, n)),
        "backward_cols": (_backward_cols_c, r(p, p, d, p, p, p, p, p, n, n, n, n, n)),
        "plain_stats": (_plain_c, r(d, n, n, f)),
        "running_update": (_running_update_c, r(p, p, d, n, f, f, f)),
    }


_COMPILED: dict = {}


def addresses(dtype) -> tuple[int, ...]:
    """The addresses of the entry points (:data:`NAMES` order) for inputs of ``dtype``
    (float32 or float64), compiled on the first call (cached on disk afterwards)."""
    key = np.dtype(dtype)
    if key not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"the C entry points take float32 or float64 inputs, not {key}")
    if key not in _COMPILED:
        # the parallel kernels' code links to numba's threading layer, which must be
        # running before an entry point is compiled or loaded from the cache
        parallel_safe()
        sigs = _signatures(key)
        _COMPILED[key] = [cfunc(sig, cache=True)(fn) for fn, sig in (sigs[n] for n in NAMES)]
    return tuple(c.address for c in _COMPILED[key])


def parallel_safe() -> bool:
    """Whether the parallel kernels may be entered from compiled code without the lock of
    :func:`.plan.guard`: numba's threading layer is not ``workqueue`` (learnt from one tiny
    parallel call, made under the guard)."""
    x = np.zeros((1, 1, 1))
    out, stats, coef, one = np.empty_like(x), np.empty((3, 1)), np.empty((4, 1)), np.ones(1)
    with guard():
        _TRAIN_WIDE_PAR(x, one, one, 1.0, 1.0, 1.0, coef, out, stats[0], stats[1], stats[2])
    return numba.threading_layer() != "workqueue"
