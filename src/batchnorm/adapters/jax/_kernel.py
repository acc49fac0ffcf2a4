r"""The custom-VJP kernels of :mod:`batchnorm.jax`: a forward that takes XLA CPU's fastest
reductions where they are exact and the shifted sums where they are not, and a hand-written
backward, so that each direction compiles to no more passes over the data than Flax's own
``BatchNorm``: forward two reductions and one elementwise pass, backward two reductions and
one elementwise pass.

Forward (training), locally. XLA CPU hands a plain ``sum(x)`` and ``sum(x * x)`` to its
library reductions (YNNPACK's sum and sum of squares); any elementwise work before a sum
(``x - s``, ``x * 2``) takes a slower route, about 1.5x the time of a plain sum on this
project's machine. So the forward first forms the plain sums (:func:`plain_sums`), as Flax
does, and checks every feature (:func:`well_conditioned`): where ``mean**2 <= WELL * var``
(``WELL = 4``: a mean within two standard deviations of zero) ``sum(x**2)/n - mean**2``
loses at most a factor ``1 + WELL`` of relative accuracy, no more than the shifted sums'
own (measured: variance within 1e-6 of float64 for float32 data, the shifted sums' 1e-6
to 2.5e-6). Then ``y = x a + (beta - mean a)`` is one elementwise pass. Where any feature
is not (its mean far from zero, or a sum NaN or infinite), a ``jax.lax.cond`` computes the
shifted sums instead: per feature, samples ``s`` and ``s'`` of the batch (values of ``x``
along the reduced axes, :func:`sample`) are subtracted and ``x - s`` and ``(x - s')**2``
are summed (:func:`shifted_sums`), in the statistics dtype (float64 with x64, else
float32):

.. math::

    \delta = \frac{\sum (x - s)}{n} = \mu_B - s, \qquad
    \sigma_B^2 = \frac{\sum (x - s')^2}{n} - \bigl((s - s') + \delta\bigr)^2 .

The shift cancels an offset far from zero exactly (``x - s`` is exact for values within a
factor two of each other, Sterbenz), so neither the variance nor the output carries the
mean's rounding: the output ``y = (x - s_e) a + (beta - (mu_B - s_e) a)`` with
``a = gamma inv`` is one elementwise pass (never ``x - mean`` with a float32 mean of 1e6,
whose rounding alone is 0.03). The subtraction of the squared offset loses at most a factor
``1 + (mu_B - s')**2 / var`` of relative accuracy, small because ``s'`` is a value of the
batch (a few units of ``sigma`` away at most, unlike ``E[x^2] - E[x]^2`` whose factor is
``1 + mean**2 / var``). Each reduction has its own sample because XLA CPU writes an
``x - s`` shared by two reductions out in full (one more pass); with separate samples each
reduction reads ``x`` once. That path makes two more reductions over ``x`` than the plain
one (``benchmarks/jax_flax.py`` counts the passes of both in the compiled HLO). With
``axis_name``, and for half-precision data, the shifted sums are always used; float32
data under x64 takes the plain sums in float64 (converted within the reductions, slower
than float32 sums but far more accurate). Under ``jax.vmap`` the check
is the AND over the mapped instances (:func:`_all_instances`), so the ``cond`` stays a
conditional rather than a select that would compute both paths.

Backward. Two reductions give ``sum(dy)`` and ``sum(dy (x - s''))``, then
``sum(dy (x - mean)) = sum(dy (x - s'')) - (mu_B - s'') sum(dy)``, and one elementwise pass
forms ``dx = k dy + p (x - s_e) + q``. With ``axis_name`` the statistics are merged exactly,
in participant order (:mod:`._collective`), and the two gradient sums are added in
participant order; ``dgamma``/``dbeta`` stay this participant's share (JAX adds the shares
of a replicated parameter itself).

Batch renorm: ``y = (gamma r) x_hat + (beta + gamma d)`` with ``r``, ``d`` constants of the
backward pass, ``dgamma = r sum(dy x_hat) + d sum(dy)`` (:mod:`batchnorm.renorm`).
The batch statistics returned by :func:`train` carry no gradient (their cotangents are
ignored; the public functions stop their gradient).

Range: where the plain sums are in ``x``'s dtype (float32 data without x64, float64 data),
the shifted branch forms its squares on ``(x - s') h`` with a per-feature power of two
``h`` from the plain sums (:func:`plain_scale`: 1 unless ``sum(x * x)`` is not finite or
above ``finfo.max / (2n + 2)``, where the shifted squares could overflow, or, for
float32, below ``n TINY_VAR``: squares lost to underflow, data of scale 1e-19 and below,
which :func:`well_conditioned` sends there). Scaling by a power of two is exact, so every
``h`` in range gives the same results. (A third branch, or a ``cond`` nested in the
shifted one, made the plain path 6-14% slower at 64x256; the multiply costs the shifted
path 3-13%.) So the statistics are exact wherever the statistics dtype holds the
variance; a variance that overflows it (float32 data spread over more than about
``1.8e19`` without x64) is infinite and the feature's outputs are NaN. NaN and Inf
propagate feature by feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from ..._validation import Layout, layout
from ..._xp import stats_dtype
from . import _collective as coll
from ._sums import (
    WELL,
    centred,
    nonnegative,
    plain_scale,
    plain_sums,
    rescaled_sums,
    sample,
    shifted_sums,
    sum_pair,
    well_conditioned,
)

__all__ = ["WELL", "Spec", "evaluate", "plain_sums", "shifted_sums", "train", "well_conditioned"]


@dataclass(frozen=True)
class Spec:
    """The static arguments of a kernel call (hashable).

    Attributes
    ----------
    axes : tuple of int
        Feature axes, non-negative and sorted.
    eps : float
    axis_name : hashable or None
        Merge the statistics over this named axis.
    renorm : bool
        Batch renorm: :func:`train` takes the running mean, the running std and the
        limits ``(rmax, dmax)`` (arrays: they may change under ``jit``, e.g. by a schedule).
    """

    axes: tuple[int, ...]
    eps: float
    axis_name: object = None
    renorm: bool = False


def _sdt():
    return stats_dtype(jnp, None)


def _cast(v, like):
    """A gradient ``v`` (the feature shape) as ``like``'s: its dtype, and summed over the
    leading feature axes that ``like`` lacks (a per-feature array shared by every group of
    ghost batch norm): up to ``_UNROLL`` groups by adds that XLA fuses into one small
    elementwise kernel (its YNNPACK reduction of the few rows of ``dgamma``'s product
    took 44 us at 4 x 1024 on this project's machine, as long as a pass over the data)."""
    if like is None:
        return None
    extra = v.ndim - like.ndim
    if extra:
        rows = jnp.reshape(v, (-1, *v.shape[extra:]))
        if rows.shape[0] <= _UNROLL:
            v = sum(rows[i] for i in range(1, rows.shape[0])) + rows[0]
        else:  # the barrier: XLA would otherwise sum dy over x's values again for dbeta
            v = jnp.sum(jax.lax.optimization_barrier(rows), axis=0)
    return jnp.astype(v, like.dtype)


_UNROLL = 32


def _unfused(v):
    """``v`` itself, through an operation that XLA CPU does not fuse into a YNNPACK
    reduction (a ``reduce_precision`` to ``v``'s own format, which changes no value): what
    follows a reduction then goes into the reduction's consumers instead, so the reduction
    does not wait for the inputs of what follows (the backward's sums of ``dy`` would
    otherwise wait for the forward's ``cond``)."""
    fi = jnp.finfo(v.dtype)
    return jax.lax.reduce_precision(v, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def _bcast(v, lay: Layout, sdt):
    """A per-feature array in the broadcast shape of ``lay``, in ``sdt``. An array of the
    last feature axes only (ghost batch norm's gamma, shared by every group) broadcasts
    along the leading ones."""
    if v is None:
        return None
    shape = list(lay.bshape)
    for ax in lay.axes[: len(lay.fshape) - v.ndim]:
        shape[ax] = 1
    return jnp.reshape(jnp.astype(v, sdt), shape)


def _clip(v, lo, hi):
    return jnp.where(v < lo, lo, jnp.where(v > hi, hi, v))  # NaN stays NaN


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def train(spec: Spec, x, gamma, beta, mu, sigma, lim):
    """Training forward: ``(y, mean, var)`` (statistics of the feature shape, in the
    statistics dtype); ``mu``/``sigma`` are renorm's running mean and std and ``lim`` the
    array ``(rmax, dmax)`` (else None)."""
    return _train_fwd(spec, x, gamma, beta, mu, sigma, lim)[0]


def _train_fwd(spec: Spec, x, gamma, beta, mu, sigma, lim):
    """The statistics, then :func:`_finish`. With ``axis_name``: the shifted sums merged
    over the axis. Locally, for float32 and float64 data: the plain sums, and
    ``jax.lax.cond`` keeps them where every feature is well conditioned
    (:func:`well_conditioned`) and else computes the shifted sums (two more reductions
    over ``x``), both in the statistics dtype (float64 for float32 data under x64); for
    half-precision data: the shifted sums. Where the plain sums may leave their range, the
    shifted squares are of ``(x - s') h`` (:func:`plain_scale`).

    Residuals: ``x``, a sample ``se`` of the batch (:func:`sample`, 3) and
    ``de = mean - se``, ``inv``, renorm's ``r`` and ``d``, and the inputs. Only what the
    branches compute leaves the ``cond`` (an input passed through it would be copied)."""
    sdt = _sdt()
    lay = layout(tuple(x.shape), spec.axes)
    args = (spec, x, lay, sdt, gamma, beta, mu, sigma, lim)
    if spec.axis_name is not None:
        s, delta, m2 = shifted_sums(x, lay, sdt)
        se, de, var, _ = coll.merge_stats(s, delta, m2, lay.count, spec.axis_name)
        (y, var), res = _finish(*args, se, de, var)
    elif x.dtype not in (sdt, jnp.float32):  # half precision
        se = sample(x, lay, 3, sdt)
        (y, var), res = _finish(*args, se, *_shifted(x, lay, sdt, se))
    else:
        s1, s2 = plain_sums(x, lay, sdt)

        # The branches return the coefficients (a, c), computed once per feature there,
        # and y is formed after the cond: XLA would otherwise compute them (renorm's r and
        # d included) again for every value of x inside the elementwise pass; and batch
        # norm and renorm with r = 1, d = 0 form y by the same operations (bit for bit).
        late = True

        def plain():
            m, var = _plain_stats(s1, s2, lay.count)
            se = sample(x, lay, 3, sdt)
            return _finish(*args, se, m - se, var, mean=m, late=late)

        def shifted(sums=_unchecked):
            se = sample(x, lay, 3, sdt)
            return _finish(*args, se, *_shifted(x, lay, sdt, se, sums), late=late)

        # Each branch slices its own shift (an operand of the cond would be materialized)
        # and so does what follows (the same value, fused where it is used). Plain sums in
        # x's dtype may leave its range: a third branch, the rescaled sums (path_index).
        def ranged():  # squares of (x - s2) h, h from the plain sums (plain_scale)
            h = plain_scale(s1, s2, lay.count)
            return shifted(partial(rescaled_sums, h=h))

        ok = well_conditioned(s1, s2, lay.count)
        (y, var), res = jax.lax.cond(ok, plain, ranged if s1.dtype == x.dtype else shifted)
        se = sample(x, lay, 3, sdt)
        if late:  # (a, c, 0 or 1): y = (x - 0 se) a + c on the plain path
            a, c, on = y
            y = _apply(x, se * on, a, c, sdt)
    de, inv, r, d = res
    mean, var = (jnp.reshape(v, lay.fshape) for v in (se + de, var))
    if spec.axis_name is not None:
        mean, var = coll.invariant(mean, spec.axis_name), coll.invariant(var, spec.axis_name)
    return (y, mean, var), (x, se, de, inv, gamma, beta, mu, sigma, lim, r, d)


_unchecked = partial(shifted_sums, checked=False)


def _shifted(x, lay: Layout, sdt, se, sums=shifted_sums):
    """``(mean - se, var)`` from the shifted sums (``sums``: :func:`shifted_sums` or
    :func:`rescaled_sums`), for a shift ``se`` of the elementwise passes that no reduction
    shares (:func:`sample`)."""
    s, delta, var = sums(x, lay, sdt, per_value=True)
    return (s - se) + delta, var


def _plain_stats(s1, s2, n: int):
    mean = s1 / n
    return mean, nonnegative(s2 / n - mean * mean)


def _finish(spec, x, lay, sdt, gamma, beta, mu, sigma, lim, se, de, var, mean=None, late=False):
    """``y = (x - se) a + c`` from ``mean = se + de`` and ``var``, one elementwise pass;
    given ``mean`` (the plain path's, within two standard deviations of zero),
    ``y = x a + c`` instead: the fewest operations per value. Returns ``(y, var)`` and the
    residuals ``(de, inv, r, d)``; ``late``: ``(a, c, shifted)`` in place of ``y``, with
    ``shifted`` 1.0 where ``c`` is relative to ``se`` and 0.0 where to 0."""
    # a variance that overflowed sdt gives NaN outputs, as a NaN one does (not beta)
    inv = jnp.where(var < jnp.inf, jax.lax.rsqrt(var + spec.eps), jnp.nan)
    g, b = _bcast(gamma, lay, sdt), _bcast(beta, lay, sdt)
    r = d = None
    if spec.renorm:
        mu_b = _bcast(mu, lay, sdt)
        dmu = (se - mu_b) + de  # mean - mu, no rounded mean
        r, d = _renorm_rd(spec, dmu, (var + spec.eps) * inv, sigma, lim, lay)
        b = (0.0 if b is None else b) + (d if g is None else g * d)
        g = r if g is None else g * r
    a = inv if g is None else g * inv
    c = (0.0 if b is None else b) - (de if mean is None else mean) * a
    if late:
        return ((a, c, jnp.asarray(1.0 if mean is None else 0.0, sdt)), var), (de, inv, r, d)
    return (_apply(x, se if mean is None else None, a, c, sdt), var), (de, inv, r, d)


def _apply(x, se, a, c, sdt):
    """The elementwise pass ``y = (x - se) a + c`` (``se`` None: ``x a + c``)."""
    xc = centred(x, se, sdt)
    return jnp.astype(xc * jnp.astype(a, xc.dtype) + jnp.astype(c, xc.dtype), x.dtype)


def _renorm_rd(spec: Spec, dmu, sigma_b, sigma, lim, lay):
    """``r = clip(sigma_B / sigma, 1/rmax, rmax)``, ``d = clip((mu_B - mu)/sigma, +-dmax)``
    with ``dmu = mu_B - mu`` and ``sigma_B = (var + eps) inv`` (no second square root: XLA
    computes it within the passes that use it)."""
    sdt = sigma_b.dtype
    rmax, dmax = jnp.astype(lim[0], sdt), jnp.astype(lim[1], sdt)
    sig = _bcast(sigma, lay, sdt)
    r = _clip(sigma_b / sig, 1.0 / rmax, rmax)
    d = _clip(dmu / sig, -dmax, dmax)
    return r, d


def _train_bwd(spec: Spec, res, cts):
    dy = cts[0]  # the statistics' cotangents: no gradient flows through them (module notes)
    x, se, de, inv, gamma, beta, mu, sigma, lim, r, d = res  # mean = se + de
    sdt = _sdt()
    lay = layout(tuple(x.shape), spec.axes)
    g_eff = _bcast(gamma, lay, sdt)
    if r is not None:
        g_eff = r if g_eff is None else g_eff * r
    xc = centred(x, se, sdt)
    dyw = jnp.astype(dy, xc.dtype)
    s3 = sample(x, lay, 2, sdt)  # x - s3 shared with no other pass (see sample)
    sum_dy, sum_dy_d = map(_unfused, sum_pair(dyw, dyw * centred(x, s3, sdt), lay, sdt))
    sum_dy_xc = sum_dy_d - ((se - s3) + de) * sum_dy  # sum(dy (x - mean))
    loc_dy, loc_dy_xc, n = sum_dy, sum_dy_xc, lay.count
    if spec.axis_name is not None:
        n = lay.count * _bound_size(spec.axis_name)
        sum_dy, sum_dy_xc = coll.ordered_sum([sum_dy, sum_dy_xc], spec.axis_name)
    k = inv if g_eff is None else g_eff * inv
    p = -(k * inv * inv) * (sum_dy_xc / n)
    q = -k * (sum_dy / n) - p * de
    dx = dyw * jnp.astype(k, xc.dtype) + (xc * jnp.astype(p, xc.dtype) + jnp.astype(q, xc.dtype))
    dg, db = inv * loc_dy_xc, loc_dy  # this participant's share
    if r is not None:
        dg = r * dg + d * db
    dg, db = (jnp.reshape(v, lay.fshape) for v in (dg, db))
    dx = jnp.astype(dx, x.dtype)
    return dx, _cast(dg, gamma), _cast(db, beta), _zeros(mu), _zeros(sigma), _zeros(lim)


def _bound_size(axis_name) -> int:
    """The size of ``axis_name`` in the backward pass, or a clear error where the axis is
    not bound there: ``jax.grad`` taken outside ``jax.vmap(..., axis_name=...)`` runs the
    backward pass after the vmap has ended (a JAX limitation of custom VJPs)."""
    try:
        return coll.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"batchnorm.jax with axis_name={axis_name!r}: the backward pass needs the axis "
            f"{axis_name!r}, which is not bound where jax.grad runs it. This happens with "
            "jax.grad outside jax.vmap(..., axis_name=...): take the gradient inside the "
            "vmap (jax.vmap(jax.grad(loss), axis_name=...), summing the parameter "
            "gradients over the mapped axis), or map with jax.pmap / jax.shard_map"
        ) from None


def _zeros(v):
    return None if v is None else jnp.zeros_like(v)


train.defvjp(_train_fwd, _train_bwd)


def _given(spec: Spec, x, mean, var, sdt):
    lay = layout(tuple(x.shape), spec.axes)
    m, v = _bcast(mean, lay, sdt), _bcast(var, lay, sdt)
    return lay, m, jax.lax.rsqrt(v + spec.eps)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def evaluate(spec: Spec, x, gamma, beta, mean, var):
    """Evaluation forward with given statistics: ``y = (x - mean) gamma inv + beta``
    (eps always added), one elementwise pass."""
    sdt = _sdt()
    lay, m, inv = _given(spec, x, mean, var, sdt)
    g, b = _bcast(gamma, lay, sdt), _bcast(beta, lay, sdt)
    a = inv if g is None else g * inv
    xc = centred(x, m, sdt)  # x - mean before scaling: no cancellation at a large offset
    y = xc * jnp.astype(a, xc.dtype)
    return jnp.astype(y if b is None else y + jnp.astype(b, xc.dtype), x.dtype)


def _eval_fwd(spec: Spec, x, gamma, beta, mean, var):
    return evaluate(spec, x, gamma, beta, mean, var), (x, gamma, beta, mean, var)


def _eval_bwd(spec: Spec, res, dy):
    r"""``dx = k dy`` (``k = gamma inv``), ``dgamma = inv sum(dy (x - mean))``,
    ``dbeta = sum(dy)``, and the given statistics' own gradients:
    :math:`\partial/\partial\mu = -k \sum dy`,
    :math:`\partial/\partial\sigma^2 = -\tfrac12 \gamma\, inv^2\, d\gamma`."""
    x, gamma, beta, mean, var = res
    sdt = _sdt()
    lay, m, inv = _given(spec, x, mean, var, sdt)
    g = 1.0 if gamma is None else _bcast(gamma, lay, sdt)
    k = g * inv
    xc = centred(x, m, sdt)
    dyw = jnp.astype(dy, xc.dtype)
    db = jnp.sum(dyw, axis=lay.red, keepdims=True, dtype=sdt)
    dg = inv * jnp.sum(dyw * xc, axis=lay.red, keepdims=True, dtype=sdt)
    dx = jnp.astype(dyw * jnp.astype(k, dyw.dtype), x.dtype)
    dmean, dvar = -k * db, -0.5 * g * inv * inv * dg
    dg, db, dmean, dvar = (jnp.reshape(v, lay.fshape) for v in (dg, db, dmean, dvar))
    return dx, _cast(dg, gamma), _cast(db, beta), _cast(dmean, mean), _cast(dvar, var)


evaluate.defvjp(_eval_fwd, _eval_bwd)
