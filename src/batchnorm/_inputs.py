"""Validation of one call, once (internal): the reducer a call uses, the validated
arguments of a forward (:class:`Inputs`), of a backward, and the scale check of an
``eps`` near 0. The array checks themselves live in :mod:`batchnorm._validation`; what is
here also needs the backends (which one runs the input) and the cache record."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _xp
from ._cache import BatchNormCache, ensure_pytree
from ._validation import COUNT_LIMIT, Layout, as_float_array, as_input, check_eps, check_out
from .backends import check_backend, plan
from .core.reduce import LOCAL, Reducer, check_reducer

__all__ = [
    "Inputs",
    "backward_args",
    "check_backward",
    "check_dy",
    "check_merged",
    "check_scale",
    "check_sums",
    "check_synchronized",
    "check_variance",
    "inputs",
    "reducer_of",
]


def reducer_of(comm: object = None, reducer: object = None, timeout=None) -> Reducer:
    """The reducer a call uses: ``reducer``, an MPI reducer over ``comm`` (waiting at most
    ``timeout`` seconds for missing ranks), or local."""
    if reducer is not None:
        if comm is not None:
            raise TypeError("pass comm= or reducer=, not both")
        if timeout is not None:  # it would be ignored: a reducer keeps its own timeout
            raise TypeError(
                f"timeout={timeout!r} applies to comm=; a reducer carries its own timeout "
                "(e.g. batchnorm.distributed.MpiReducer(comm, timeout))"
            )
        return check_reducer(reducer)
    if comm is None:
        if timeout is not None:
            raise TypeError("timeout= needs comm=")
        return LOCAL
    from ._sync.reducer import MpiReducer

    return MpiReducer(comm, timeout)


@dataclass(eq=False)
class Inputs:
    """Validated arguments of one forward (internal): the data, its layout and backend,
    per-feature parameters in the backend's statistics dtype (or None), eps, ``out``."""

    x: object
    lay: Layout
    be: object
    gamma: object
    beta: object
    eps: float
    out: object = None


def inputs(
    x, gamma, beta, axis, eps, backend, out=None, *others, empty_ok=False, reducer=None
) -> Inputs:
    """Validate the arguments of a forward once (internal; the public kernels' first step).
    An empty batch is refused unless ``empty_ok`` or ``reducer`` is distributed (a
    participant may hold no rows of a synchronized batch)."""
    check_backend(backend)
    raw, x = x, as_input(x)
    p = plan(backend, x, axis)
    lay, be = p.layout, p.backend
    if math.prod(x.shape) == 0 and not (empty_ok or getattr(reducer, "distributed", False)):
        raise ValueError(f"cannot normalize an empty batch: x has shape {x.shape}")
    if be.xp is not None:
        ensure_pytree(be.xp)
    g = None if gamma is None else be.feature(gamma, "gamma", lay, x)
    b = None if beta is None else be.feature(beta, "beta", lay, x)
    if out is not None:
        named = dict(zip(("running_mean", "running_var"), others, strict=False))
        out = check_out(out, x, "out", {"x": raw, "gamma": gamma, "beta": beta, **named})
    return Inputs(x, lay, be, g, b, check_eps(eps), out)


def check_dy(dy: object, cache: BatchNormCache):
    """``dy`` as an array of the forward input's shape, library and device."""
    dy = as_float_array(dy, "dy")
    if dy.shape != cache.x.shape:
        raise ValueError(
            f"dy has shape {dy.shape} but the forward input x had shape {cache.x.shape}"
        )
    if type(dy) is not type(cache.x) and not (
        isinstance(dy, np.ndarray) and isinstance(cache.x, np.ndarray)
    ):
        raise TypeError(
            f"dy is a {type(dy).__name__} but the forward input was a {type(cache.x).__name__};"
            " pass dy from the same array library"
        )
    if not isinstance(dy, np.ndarray):
        from ._xp import check_same_device

        check_same_device("the forward input x", cache.x, "dy", dy)
    return dy


#: Below this eps a variance can be small enough that ``1/sqrt(var + eps)`` leaves the range
#: of the working precision; only then is the output's scale checked.
_TINY_EPS = 1e-30


def check_scale(inp: Inputs, inv, gamma) -> None:
    """With ``eps`` (almost) 0, refuse statistics whose ``gamma / sqrt(var + eps)`` is not
    finite in the working precision although the feature's data are not all equal (a
    variance lost to underflow, e.g. float64 data of scale 1e-170): the output would be
    inf/NaN from finite, varying data. Constant features keep their 0/0 = NaN. An O(C)
    check, made only for ``eps < 1e-30`` and NumPy arrays."""
    if inp.eps >= _TINY_EPS or inp.be.xp is not None:
        return
    a = np.abs(inv if gamma is None else inv * gamma)
    big = float(np.finfo(np.float64 if inp.x.dtype == np.float64 else np.float32).max)
    bad = a > big  # (NaN data give NaN statistics: they propagate, never refused)
    if bad.any():
        # a feature whose values are all equal has variance 0 exactly: 0/0 is its NaN, as the
        # maths says (kept); only a variance lost to underflow is refused
        red = inp.lay.red
        const = (np.max(inp.x, axis=red) == np.min(inp.x, axis=red)).reshape(bad.shape)
        bad &= ~const
    if bad.any():
        where = np.flatnonzero(bad)
        raise ValueError(
            f"eps={inp.eps!r}: features {where[:8].tolist()} have a variance so small (or zero) "
            f"that 1/sqrt(var + eps) is not finite in {np.dtype(inp.x.dtype).name}; the output "
            "would be inf/NaN from finite data. Use eps > 0 (e.g. 1e-5) or rescale the data"
        )


def check_variance(inp: Inputs, mean, var) -> None:
    """Refuse float64 NumPy data whose batch variance overflows float64 although the data
    are finite (a spread beyond ~1.3e154, e.g. 1e308 and -1e308 mixed): the variance is
    +inf, so ``1/sqrt(var + eps)`` is 0 and the output would be ``beta`` everywhere instead
    of values of order 1, and the cache could not give a gradient. Non-finite data (a NaN or
    inf mean) propagate as always. An O(C) check of float64 inputs (float16/32 data are
    summed in float64 and cannot overflow it) of NumPy and of every eager array library
    (torch, CuPy, array-api-strict: one sum of the C variances and a host read); not of
    JAX, whose passes never branch on data, so a program gives the same results eagerly and
    under ``jax.jit`` (there the variance is inf and the output ``beta``)."""
    xp = inp.be.xp
    if xp is None:
        if inp.x.dtype != np.float64:
            return
        if float(np.add.reduce(var, axis=None)) < np.inf:  # the fast exit (a sum bounds the max)
            return
        bad = (var == np.inf) & np.isfinite(mean)
    else:
        if _xp.is_jax(xp) or inp.x.dtype != xp.float64:
            return
        if float(xp.sum(var)) < math.inf:  # the same fast exit: one reduction, one read
            return
        found = (var == xp.inf) & xp.isfinite(mean)
        if not bool(xp.any(found)):
            return
        bad = np.asarray(_xp.to_numpy(found))
    if bad.any():
        at = np.flatnonzero(bad)
        raise ValueError(
            f"x with shape {tuple(inp.x.shape)}: the batch variance of features "
            f"{at[:8].tolist()} overflows float64 (the data are finite but spread over more "
            "than ~1.3e154, e.g. 1e308 and -1e308 mixed), so the output would be beta "
            "everywhere; scale x by a power of two (e.g. x * 2.0**-600, exact) first"
        )


def backward_args(dy, cache, out, reducer: Reducer, what: str):
    """Validate the arguments of a backward pass with ``reducer``: ``(dy, out)``."""
    dy, out = check_backward(dy, cache, out)
    check_synchronized(cache, reducer, what)
    return dy, out


def check_backward(dy, cache, out=None):
    """Validate the arguments of a backward pass: ``(dy, out)``."""
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache must be a BatchNormCache; got {type(cache).__name__}")
    d = check_dy(dy, cache)
    inputs = {"dy": dy, "the forward input x": cache.x, "the forward's work array": cache.work}
    return d, check_out(out, cache.x, "out", inputs)


def check_synchronized(cache: BatchNormCache, reducer: Reducer, what: str) -> None:
    """A synchronized forward's backward must reduce too, and a local one must not."""
    if cache.synchronized and not reducer.distributed:
        raise ValueError(
            f"{what}: this cache comes from a synchronized forward (statistics merged "
            "across processes): pass the same comm= / reducer= to the backward pass"
        )
    if reducer.distributed and not cache.synchronized:
        raise ValueError(f"{what}: comm=/reducer= given, but the forward was not synchronized")


def _reducer_name(reducer: object) -> str:
    text, name = repr(reducer), type(reducer).__name__
    return text if text.startswith(name) else f"{name} {text}"


def _host_stat(reducer: object, label: str, name: str, value: object, fshape) -> np.ndarray:
    """A merged per-feature array as NumPy, refused unless real floating of ``fshape``."""
    from ._xp import to_numpy

    try:
        a = value if isinstance(value, np.ndarray) else to_numpy(value)
    except Exception as exc:  # noqa: BLE001 - whatever the reducer returned is not an array
        raise TypeError(
            f"{label}: reducer {_reducer_name(reducer)} returned {name} of type "
            f"{type(value).__name__}, not an array ({type(exc).__name__}: {exc})"
        ) from None
    if a.dtype.kind != "f" or tuple(a.shape) != tuple(fshape):
        raise TypeError(
            f"{label}: reducer {_reducer_name(reducer)} returned {name} of shape "
            f"{tuple(a.shape)} and dtype {a.dtype}; expected real floating values of the "
            f"feature shape {tuple(fshape)}"
        )
    return a


def check_merged(reducer: object, label: str, local, merged, fshape, dtype=None) -> object:
    """``merged`` (what ``reducer.merge`` returned for this participant's ``local``
    statistics) when it is usable: statistics with an integer ``count`` >= the local count,
    ``mean`` and ``var`` real floating arrays of the feature shape, ``var >= 0``, and finite
    unless a participant's statistics were not (the local ones, or those the reducer names
    in ``nonfinite_ranks``), the merged count is 0, or the variance overflowed (+inf with a
    finite mean). Else a TypeError/ValueError naming the reducer and the values; nothing
    has changed (the caller has not stored anything yet)."""
    who = f"{label}: reducer {_reducer_name(reducer)}"
    if not all(hasattr(merged, k) for k in ("count", "mean", "var")):
        raise TypeError(
            f"{who} returned {type(merged).__name__} {str(merged)[:80]!r} from merge(); "
            "expected statistics with count, mean and var (e.g. SyncBatchStats)"
        )
    count = merged.count
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"{who} returned count={count!r}; expected an integer")
    least = int(local.count) if local is not None else 0
    if count < least:
        raise ValueError(f"{who} returned count={count}, fewer than the local {least} values")
    if count >= COUNT_LIMIT:
        raise ValueError(f"{who} returned count={count}; counts are below 2**63")
    mean = _host_stat(reducer, label, "mean", merged.mean, fshape)
    var = _host_stat(reducer, label, "var", merged.var, fshape)
    with np.errstate(invalid="ignore"):
        negative = var < 0
    if negative.any():
        at = np.flatnonzero(negative)
        raise ValueError(
            f"{who} returned a negative variance: features {at[:8].tolist()} have var "
            f"{var.ravel()[at[:4]].tolist()}"
        )
    _check_narrow(who, dtype, mean, var)
    finite = np.isfinite(mean) & (np.isfinite(var) | (var == np.inf))
    if count and not finite.all() and not getattr(merged, "nonfinite_ranks", ()):
        loc = local is None or not (
            np.all(np.isfinite(to_host(local.mean))) and np.all(np.isfinite(to_host(local.var)))
        )
        if not loc:
            at = np.flatnonzero(~finite)
            raise ValueError(
                f"{who} returned non-finite statistics from finite local ones without naming "
                f"a participant in nonfinite_ranks: features {at[:8].tolist()} have mean "
                f"{mean.ravel()[at[:4]].tolist()}, var {var.ravel()[at[:4]].tolist()}"
            )
    return merged


def _check_narrow(who: str, dtype, mean: np.ndarray, var: np.ndarray) -> None:
    """Statistics no float16/32 (or bfloat16) data can have: a finite mean beyond the data
    dtype's range, or an infinite variance with a finite mean."""
    try:
        info = np.finfo(dtype) if dtype is not None else None
    except (TypeError, ValueError):  # a dtype NumPy does not know (torch's): its item size tells
        size = getattr(dtype, "itemsize", 8)
        info = None if size >= 8 else np.finfo(np.float32 if size == 4 else np.float16)
    if info is None or info.bits >= 64:
        return
    limit = float(np.finfo(np.float32).max) if info.bits < 32 else float(info.max)
    with np.errstate(invalid="ignore"):
        bad = (np.isfinite(mean) & (np.abs(mean) > limit)) | (np.isfinite(mean) & (var == np.inf))
    if bad.any():
        at = np.flatnonzero(bad)
        raise ValueError(
            f"{who} returned statistics no {dtype} data can have: features {at[:8].tolist()} "
            f"have mean {mean.ravel()[at[:4]].tolist()}, var {var.ravel()[at[:4]].tolist()}"
        )


def check_sums(reducer: object, label: str, arrays: list, sums) -> list:
    """What ``reducer.sum`` returned for ``arrays``: a sequence of as many arrays, each of
    its array's shape; else a TypeError naming the reducer (values may be non-finite: a
    non-finite ``dy`` propagates)."""
    who = f"{label}: reducer {_reducer_name(reducer)}"
    try:
        sums = list(sums)
    except TypeError:
        raise TypeError(
            f"{who} returned {type(sums).__name__} from sum(); expected a list of arrays"
        ) from None
    if len(sums) != len(arrays):
        raise TypeError(f"{who} returned {len(sums)} sums for {len(arrays)} arrays")
    for i, (a, s) in enumerate(zip(arrays, sums, strict=True)):
        _host_stat(reducer, label, f"sum {i}", s, tuple(a.shape))
    return sums


def to_host(a) -> np.ndarray:
    """A per-feature array as NumPy (validation)."""
    from ._xp import to_numpy

    return np.asarray(a) if isinstance(a, (np.ndarray, np.generic)) else to_numpy(a)
