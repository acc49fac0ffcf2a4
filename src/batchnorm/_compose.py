"""Composition of the backend primitives into the passes (internal, used by
:mod:`batchnorm.functional` and the layers): validate once into :class:`Inputs`, then
:func:`train_pass` / :func:`eval_pass` / :func:`backward_pass`, each with a reducer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import backends
from ._validation import (
    Layout,
    as_float_array,
    as_input,
    cached_layout,
    check_eps,
    check_out,
    layout,
)
from .backends import NUMPY, check_backend, select
from .core import coef
from .core.reduce import KIND_BACKWARD, KIND_TRAIN, LOCAL, Call, Reducer, attempt
from .core.stats import BatchStats


def _xp_is_jax(xp) -> bool:
    from ._xp import is_jax

    return is_jax(xp)


# NaN/Inf are data here, not errors: they propagate through the arithmetic silently.
def _quiet() -> np.errstate:
    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


@dataclass(frozen=True, eq=False)
class BatchNormCache:
    """What the backward pass needs from a forward pass.

    Attributes
    ----------
    x : array
        The forward input (a reference, not a copy: do not modify it before the backward pass).
    work : array
        The array the backend read (``x`` itself, also when it is a transpose of a
        C-contiguous array, which the compiled kernels read in its memory order; or its
        C-contiguous / float16-to-float32 conversion), kept so the backward pass does not
        convert ``x`` again.
    gamma : array or None, shape (*features)
        A float64 copy of the scale used (statistics dtype off NumPy), or None.
    has_beta : bool
        Whether a shift was used (then the backward pass returns ``dbeta``).
    mean, var : array, shape (*features)
        The statistics used to normalize: batch mean and biased batch variance when
        ``batch_stats`` is True, the running statistics otherwise.
    inv_std : array, shape (*features)
        ``1 / sqrt(var + eps)``.
    axis : tuple of int
        The feature axes, non-negative and sorted.
    eps : float
    batch_stats : bool
        True when ``mean``/``var`` were computed from ``x`` (training): their dependence on
        ``x`` enters the gradient. False when they were given (evaluation): constants.
    count : int
        Number of values per feature the statistics reduce over (over all participants of
        a synchronized forward).
    synchronized : bool
        The statistics were merged across processes: the backward pass must reduce its
        gradient sums with the same reducer (``comm=``/``reducer=``).
    """

    x: object
    work: object
    gamma: object
    has_beta: bool
    mean: object
    var: object
    inv_std: object
    axis: tuple[int, ...]
    eps: float
    batch_stats: bool
    count: int
    synchronized: bool = False

    @property
    def x_hat(self):
        """The normalized input, recomputed in the statistics dtype (for inspection)."""
        be = select("numpy", self.x)
        bshape = tuple(n if i in self.axis else 1 for i, n in enumerate(self.x.shape))
        return be.x_hat(self.x, self.mean, self.inv_std, bshape)


_PYTREE_DONE = []


def register_pytree() -> None:
    """Register :class:`BatchNormCache` as a JAX pytree (once, when JAX arrays first come
    through), so a cache can leave ``jax.jit``: the arrays are leaves, the layout is static."""
    if _PYTREE_DONE:
        return
    import jax

    arrays = ("x", "work", "gamma", "mean", "var", "inv_std")
    static = ("has_beta", "axis", "eps", "batch_stats", "count", "synchronized")

    def flatten(c):
        return tuple(getattr(c, k) for k in arrays), tuple(getattr(c, k) for k in static)

    def unflatten(aux, leaves):
        return BatchNormCache(
            **dict(zip(arrays, leaves, strict=True)), **dict(zip(static, aux, strict=True))
        )

    jax.tree_util.register_pytree_node(BatchNormCache, flatten, unflatten)
    _PYTREE_DONE.append(True)


def reducer_of(comm: object = None, reducer: object = None, timeout=None) -> Reducer:
    """The reducer a call uses: ``reducer``, an MPI reducer over ``comm`` (waiting at most
    ``timeout`` seconds for missing ranks), or local."""
    if reducer is not None:
        if comm is not None:
            raise TypeError("pass comm= or reducer=, not both")
        if not isinstance(reducer, Reducer):
            raise TypeError(
                f"reducer must implement batchnorm.core.reduce.Reducer; got {reducer!r}"
            )
        return reducer
    if comm is None:
        if timeout is not None:
            raise TypeError("timeout= needs comm=")
        return LOCAL
    from ._sync.reducer import MpiReducer

    return MpiReducer(comm, timeout)


# --------------------------------------------------------------------------- validation
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
    lay = layout(x.shape, axis)
    if math.prod(x.shape) == 0 and not (empty_ok or getattr(reducer, "distributed", False)):
        raise ValueError(f"cannot normalize an empty batch: x has shape {x.shape}")
    be = select(backend, x, lay)
    if be.xp is not None and not _PYTREE_DONE and _xp_is_jax(be.xp):
        register_pytree()
    g = None if gamma is None else be.feature(gamma, "gamma", lay, x)
    b = None if beta is None else be.feature(beta, "beta", lay, x)
    named = dict(zip(("running_mean", "running_var"), others, strict=False))
    out = check_out(out, x, "out", {"x": raw, "gamma": gamma, "beta": beta, **named})
    return Inputs(x, lay, be, g, b, check_eps(eps), out)


def _check_dy(dy: object, cache: BatchNormCache):
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
        scale = inv if g is None else inv * g
        m = lay.count if count is None else count
        h = be.overflow(mean, var, m, xw)
        bias = be.zeros(lay.fshape) if b is None else b
        ref, delta = (mean, 0.0) if split is None else split
        y = be.affine(xw, lay.axes, ref, scale, bias, inp.x.dtype, inp.out, h, delta)
    return y, _cache(inp, xw, mean, var, inv, True, m, synchronized, g, b)


def merged_stats(inp: Inputs | None, reducer: Reducer, call: Call, error=None):
    """This participant's statistics merged by ``reducer`` (``error`` raised everywhere):
    ``(mean, var, stats, split)`` with mean/var in the backend's arrays and ``split`` the
    unrounded mean of local NumPy statistics (None after a merge)."""
    if not reducer.distributed:
        if error is not None:
            raise error
        st, split = local_moments(inp)
        return st.mean, st.var, st, split
    local = None
    if error is None:
        local, error = attempt(reducer, local_stats, inp)
    st = reducer.merge(call, local, error, None if inp is None else inp.x.dtype)
    return inp.be.from_host(st.mean), inp.be.from_host(st.var), st, None


def train_pass(inp: Inputs | None, reducer: Reducer = LOCAL, call: Call | None = None, error=None):
    """Training forward on validated inputs: ``(y, cache, stats)``.

    With a local reducer one fused pass forms the statistics and the output; otherwise the
    local statistics are merged by ``reducer`` first (``error``: this participant's
    validation error, raised on every participant).
    """
    if not reducer.distributed:
        if error is not None:
            raise error
        be, lay = inp.be, inp.lay
        xw = be.work(inp.x)
        with _quiet():
            g1 = be.ones(lay.fshape) if inp.gamma is None else inp.gamma
            b0 = be.zeros(lay.fshape) if inp.beta is None else inp.beta
            y, mean, var = be.train(xw, lay.axes, g1, b0, inp.eps, inp.x.dtype, inp.out)
            inv = coef.inv_std(var, inp.eps)
        check_scale(inp, inv, inp.gamma)
        stats = BatchStats(lay.count, mean, var)
        return y, _cache(inp, xw, mean, var, inv, True, lay.count), stats
    call = call or Call("batch_norm_train", KIND_TRAIN)
    mean, var, st, _ = merged_stats(inp, reducer, call, error)
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

    Local: one fused pass gives the two gradient sums and ``dx``. Synchronized: the local
    sums are summed over the participants (in order, identical everywhere), then this
    participant's ``dx`` is formed from them; ``error`` (this participant's validation
    error) is raised on every participant instead.
    """
    call = call or Call("batch_norm_backward", KIND_BACKWARD)
    if error is not None:
        reducer.sum(call, [], error)  # raises, on every participant
        raise error
    be = select(backend, cache.x, cached_layout(tuple(cache.x.shape), cache.axis))
    inv_std, mean, axes, xw = cache.inv_std, cache.mean, cache.axis, cache.work
    dyw = be.work_dy(dy, xw)
    with _quiet():
        k = inv_std if cache.gamma is None else inv_std * cache.gamma
        var = cache.var if cache.batch_stats else be.zeros(cache.var.shape)
        h = be.overflow(mean, var, cache.count, xw)
        if not reducer.distributed and be.xp is not None:  # the composed array-API pass
            return _xp_local_backward(be, xw, dyw, cache)
        if not reducer.distributed:
            dx, sum_dy, sum_dy_xc = be.backward(
                xw, dyw, axes, mean, inv_std, k, h, cache.batch_stats, cache.x.dtype, out
            )
        else:
            sum_dy, sum_dy_xc = be.grad_sums(xw, dyw, axes, mean, h)
            sum_dy, sum_dy_xc = (be.from_host(a) for a in reducer.sum(call, [sum_dy, sum_dy_xc]))
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


def backward_args(dy, cache, out, reducer: Reducer, what: str):
    """Validate the arguments of a backward pass with ``reducer``: ``(dy, out)``."""
    dy, out = check_backward(dy, cache, out)
    check_synchronized(cache, reducer, what)
    return dy, out


def check_backward(dy, cache, out=None):
    """Validate the arguments of a backward pass: ``(dy, out)``."""
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache must be a BatchNormCache; got {type(cache).__name__}")
    d = _check_dy(dy, cache)
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
