"""The passes of a call on validated inputs (internal, used by :mod:`batchnorm.functional`
and the layers): local statistics, the reducer's merge, the output; :func:`train_pass` /
:func:`eval_pass` / :func:`backward_pass`, each with a reducer. The validation is
:mod:`batchnorm._inputs`, the cache record :mod:`batchnorm._cache` (re-exported here for the
layers)."""

from __future__ import annotations

import math

import numpy as np

from . import backends
from ._cache import BatchNormCache
from ._inputs import (
    Inputs,
    backward_args,
    check_backward,
    check_merged,
    check_scale,
    check_sums,
    check_synchronized,
    check_variance,
    inputs,
    reducer_of,
)
from .backends import NUMPY, plan
from .core import coef
from .core.reduce import KIND_BACKWARD, KIND_TRAIN, LOCAL, Call, Reducer
from .core.stats import BatchStats

__all__ = [
    "LOCAL",
    "BatchNormCache",
    "Inputs",
    "backward_args",
    "backward_local",
    "backward_pass",
    "backward_synced",
    "check_backward",
    "check_merged",
    "check_synchronized",
    "eval_pass",
    "inputs",
    "local_moments",
    "local_moments_of",
    "local_stats",
    "merged_stats",
    "normalize",
    "reducer_of",
    "train_local",
    "train_pass",
    "train_synced",
]


# NaN/Inf are data here, not errors: they propagate through the arithmetic silently.
def _quiet() -> np.errstate:
    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


# --------------------------------------------------------------------------- passes
_SAME = object()


def _cache(
    inp: Inputs, xw, mean, var, inv, batch_stats, count, synchronized=False, g=_SAME, b=_SAME
):
    g = inp.gamma if g is _SAME else g
    b = inp.beta if b is _SAME else b
    return BatchNormCache(
        x=inp.x,
        work=xw,
        gamma=None if g is None else inp.be.copy(g),
        has_beta=b is not None,
        mean=mean,
        var=var,
        inv_std=inv,
        axis=inp.lay.axes,
        eps=inp.eps,
        batch_stats=batch_stats,
        count=count,
        synchronized=synchronized,
    )


def local_stats(inp: Inputs) -> BatchStats:
    """This participant's (count, mean, var); an empty slice has count 0."""
    return local_moments(inp)[0]


def local_moments(inp: Inputs):
    """``(stats, split)``: this participant's :class:`BatchStats` and, for NumPy data, the
    mean held unrounded as ``split = (ref, delta)`` (a sample-based shift and the mean's
    offset from it, which the output pass uses; None otherwise)."""
    lay, be = inp.lay, inp.be
    if lay.count == 0 or math.prod(inp.x.shape) == 0:
        return BatchStats(0, be.zeros(lay.fshape), be.zeros(lay.fshape)), None
    if be.xp is None and inp.x.size < backends.AUTO_NUMBA_MIN_SIZE and be is not NUMPY:
        # statistics alone of a small array: NumPy's centred two-pass (the serial compiled
        # kernels pay off when they also write the output in the same pass)
        be = NUMPY
    with _quiet():
        if be.xp is not None:
            mean, var = be.moments(be.work(inp.x), lay.axes)
            return BatchStats(lay.count, mean, var), None
        ref, delta, var = be.moments_shifted(be.work(inp.x), lay.axes)
    return BatchStats(lay.count, ref + delta, var), (ref, delta)


def normalize(
    inp: Inputs, mean, var, gamma=None, beta=None, count=None, synchronized=False, split=None
):
    """The output pass and cache of a training forward, given the batch statistics (local or
    merged); ``gamma``/``beta`` override the layer's (batch renorm folds r and d into them);
    ``split`` the unrounded mean of local statistics (:attr:`BatchStats.split`)."""
    be, lay = inp.be, inp.lay
    xw = be.work(inp.x)
    g = inp.gamma if gamma is None else gamma
    b = inp.beta if beta is None else beta
    with _quiet():
        inv = coef.inv_std(var, inp.eps)
        check_scale(inp, inv, g)
        check_variance(inp, mean, var)
        scale = inv if g is None else inv * g
        m = lay.count if count is None else count
        h = be.overflow(mean, var, m, xw)
        bias = be.zeros(lay.fshape) if b is None else b
        ref, delta = (mean, 0.0) if split is None else split
        y = be.affine(xw, lay.axes, ref, scale, bias, inp.x.dtype, inp.out, h, delta)
    return y, _cache(inp, xw, mean, var, inv, True, m, synchronized, g, b)


def merged_stats(reducer: Reducer, call: Call, error, inp: Inputs | None):
    """This participant's statistics merged by a distributed ``reducer`` (``error`` raised
    everywhere): ``(mean, var, stats)`` with mean/var in the backend's arrays."""
    local = None
    if error is None:
        local, error = reducer.attempt(local_stats, inp)
    st = reducer.merge(call, local, error, None if inp is None else inp.x.dtype)
    if error is not None:  # the reducer returned although this participant failed
        raise error
    check_merged(reducer, call.label, local, st, inp.lay.fshape, inp.x.dtype)
    return inp.be.from_host(st.mean), inp.be.from_host(st.var), st


def train_pass(inp: Inputs | None, reducer: Reducer = LOCAL, call=None, error=None):
    """Training forward on validated inputs: ``(y, cache, stats)``.

    The reducer runs :func:`train_local` (one fused pass forms the statistics and the
    output) or :func:`train_synced` (the local statistics merged first; ``error``: this
    participant's validation error, raised on every participant).
    """
    return reducer.dispatch(train_local, train_synced, call or _TRAIN_CALL, error, inp)


_TRAIN_CALL = Call("batch_norm_train", KIND_TRAIN)


def train_local(inp: Inputs):
    """The single-process training forward: one fused pass, ``(y, cache, stats)``."""
    be, lay = inp.be, inp.lay
    xw = be.work(inp.x)
    with _quiet():
        g1 = be.ones(lay.fshape) if inp.gamma is None else inp.gamma
        b0 = be.zeros(lay.fshape) if inp.beta is None else inp.beta
        y, mean, var, inv = be.train(xw, lay.axes, g1, b0, inp.eps, inp.x.dtype, inp.out)
    check_scale(inp, inv, inp.gamma)
    check_variance(inp, mean, var)
    stats = BatchStats(lay.count, mean, var)
    return y, _cache(inp, xw, mean, var, inv, True, lay.count), stats


def train_synced(reducer: Reducer, call: Call, error, inp: Inputs | None):
    """The synchronized training forward: merged statistics, then the output pass."""
    mean, var, st = merged_stats(reducer, call, error, inp)
    y, cache = normalize(inp, mean, var, count=st.count, synchronized=True)
    return y, cache, st


def eval_pass(inp: Inputs, mean, var, return_cache=True):
    """Evaluation forward on validated inputs (``mean``/``var`` in the statistics dtype)."""
    be, lay = inp.be, inp.lay
    xw = be.work(inp.x)
    with _quiet():
        inv = coef.inv_std(var, inp.eps)
        check_scale(inp, inv, inp.gamma)
        scale = inv if inp.gamma is None else inv * inp.gamma
        h = be.overflow(mean, var, 0, xw)
        bias = be.zeros(lay.fshape) if inp.beta is None else inp.beta
        y = be.affine(xw, lay.axes, mean, scale, bias, inp.x.dtype, inp.out, h)
    if not return_cache:
        return y
    return y, _cache(inp, xw, be.copy(mean), be.copy(var), inv, False, lay.count)


def backward_pass(
    dy, cache: BatchNormCache, backend="auto", out=None, reducer=LOCAL, call=None, error=None
):
    """Gradients on a validated ``dy`` (and ``out``): ``(dx, dgamma, dbeta)``.

    The reducer runs :func:`backward_local` (one fused pass gives the two gradient sums
    and ``dx``) or :func:`backward_synced` (the local sums summed over the participants,
    in order, identical everywhere, then this participant's ``dx``); ``error`` (this
    participant's validation error) is raised on every participant instead.
    """
    args = (dy, cache, backend, out)
    return reducer.dispatch(backward_local, backward_synced, call or _BACKWARD_CALL, error, *args)


_BACKWARD_CALL = Call("batch_norm_backward", KIND_BACKWARD)


def backward_local(dy, cache: BatchNormCache, backend="auto", out=None):
    """The single-process backward: one fused pass."""
    be = plan(backend, cache.x, cache.axis).backend
    xw = cache.work
    dyw = be.work_dy(dy, xw)
    if be.xp is not None:  # the composed array-API pass
        return _xp_local_backward(be, xw, dyw, cache)
    inv_std, mean = cache.inv_std, cache.mean
    with _quiet():
        k = inv_std if cache.gamma is None else inv_std * cache.gamma
        var = cache.var if cache.batch_stats else be.zeros(cache.var.shape)
        h = be.overflow(mean, var, cache.count, xw)
        dx, sum_dy, sum_dy_xc = be.backward(
            xw, dyw, cache.axis, mean, inv_std, k, h, cache.batch_stats, cache.x.dtype, out
        )
        dgamma = inv_std * sum_dy_xc
    return dx, (None if cache.gamma is None else dgamma), (sum_dy if cache.has_beta else None)


def backward_synced(reducer: Reducer, call: Call, error, dy, cache, backend="auto", out=None):
    """The synchronized backward: local gradient sums, ``reducer.sum``, ``dx``."""
    if error is not None:
        reducer.sum(call, [], error)  # raises, on every participant
        raise error
    be = plan(backend, cache.x, cache.axis).backend
    inv_std, mean, axes, xw = cache.inv_std, cache.mean, cache.axis, cache.work
    dyw = be.work_dy(dy, xw)
    with _quiet():
        k = inv_std if cache.gamma is None else inv_std * cache.gamma
        var = cache.var if cache.batch_stats else be.zeros(cache.var.shape)
        h = be.overflow(mean, var, cache.count, xw)
        sum_dy, sum_dy_xc = be.grad_sums(xw, dyw, axes, mean, h)
        sums = check_sums(
            reducer, call.label, [sum_dy, sum_dy_xc], reducer.sum(call, [sum_dy, sum_dy_xc])
        )
        sum_dy, sum_dy_xc = (be.from_host(a) for a in sums)
        if cache.batch_stats:
            p, q = coef.backward_coef(sum_dy, sum_dy_xc, inv_std, k, cache.count)
        else:
            p = q = be.zeros(k.shape)
        dx = be.input_grad(xw, dyw, axes, mean, k, p, q, cache.x.dtype, out, h)
        dgamma = inv_std * sum_dy_xc
    return dx, (None if cache.gamma is None else dgamma), (sum_dy if cache.has_beta else None)


def _xp_local_backward(be, xw, dyw, cache: BatchNormCache):
    """The array-API backward of a local forward (one composed pass)."""
    from .core.passes import backward

    dx, dgamma, dbeta = backward(
        be.xp,
        xw,
        dyw,
        cache.axis,
        cache.mean,
        cache.var,
        cache.inv_std,
        cache.gamma,
        cache.batch_stats,
        cache.count,
        be.sdt,
    )
    return dx, (None if cache.gamma is None else dgamma), (dbeta if cache.has_beta else None)


def local_moments_of(x, axis, backend, reducer: Reducer):
    """``(inp, stats)``: the validated input and its local statistics (a call of
    :func:`batchnorm.moments`, run through :func:`batchnorm.core.reduce.attempt`)."""
    inp = inputs(x, None, None, axis, 0.0, backend, reducer=reducer)
    return inp, local_stats(inp)
