r"""The custom-VJP kernels of :mod:`batchnorm.jax`: the library's passes
(:mod:`batchnorm.core.passes`) for the forward pass and its hand-written backward pass, so
``jax.grad`` never differentiates the small operations of the forward pass.

Two training routes, chosen by the static :class:`Spec`:

* *fused* (local batch norm): :func:`batchnorm.core.passes.train` forms the statistics and
  the output in one pass; the backward pass is :func:`batchnorm.core.passes.backward`;
* *split* (statistics merged over ``axis_name``, or batch renorm, whose ``r`` and ``d``
  need the statistics before the output): per feature one sample ``s`` of the data is
  subtracted, :func:`batchnorm.core.passes.moments` gives ``delta = mean - s`` and the
  variance, the participants' statistics are merged exactly
  (:func:`batchnorm.adapters.jax._collective.merge_stats`), and the output is
  :func:`batchnorm.core.passes.normalize` of ``x - s`` with mean ``delta``. Working relative
  to ``s`` keeps the mean's float32 rounding (without x64, up to ``u |mean|``) out of ``y``
  and the gradients, as the fused route does. The backward pass sums
  :func:`batchnorm.core.passes.grad_sums` over the participants in order and forms ``dx``
  with :func:`batchnorm.core.passes.input_grad`; ``dgamma``/``dbeta`` stay this
  participant's share (JAX adds the shares of a replicated parameter itself).

With renorm, ``y = (gamma r) x_hat + (beta + gamma d)`` and ``r``, ``d`` are constants of
the backward pass: ``dgamma = r sum(dy x_hat) + d sum(dy)`` (:mod:`batchnorm.renorm`).
The batch statistics returned by :func:`train` carry no gradient (their cotangents are
ignored; the public functions stop their gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from ..._validation import layout
from ..._xp import stats_dtype, work_dtype
from ...core import coef, passes
from . import _collective as coll

__all__ = ["Spec", "evaluate", "train"]


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
    limits : (float, float) or None
        ``(rmax, dmax)`` for batch renorm.
    """

    axes: tuple[int, ...]
    eps: float
    axis_name: object = None
    limits: tuple[float, float] | None = None

    @property
    def fused(self) -> bool:
        """Whether the one-pass local route applies."""
        return self.axis_name is None and self.limits is None


def _sdt():
    return stats_dtype(jnp, None)


def _cast(v, like):
    return None if like is None else jnp.astype(v, like.dtype)


def _bcast(v, bshape, sdt):
    return None if v is None else jnp.reshape(jnp.astype(v, sdt), bshape)


def _clip(v, lo, hi):
    return jnp.where(v < lo, lo, jnp.where(v > hi, hi, v))  # NaN stays NaN


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def train(spec: Spec, x, gamma, beta, mu, sigma):
    """Training forward: ``(y, mean, var)`` (statistics of the feature shape, in the
    statistics dtype); ``mu``/``sigma`` are renorm's running mean and std (else None)."""
    return _train_fwd(spec, x, gamma, beta, mu, sigma)[0]


def _train_fwd(spec: Spec, x, gamma, beta, mu, sigma):
    sdt = _sdt()
    if spec.fused:
        y, mean, var, inv = passes.train(jnp, x, spec.axes, gamma, beta, spec.eps, sdt)
        return (y, mean, var), (x, mean, var, inv, gamma, beta)
    lay = layout(tuple(x.shape), spec.axes)
    xw = jnp.astype(x, work_dtype(jnp, x.dtype))
    s = xw[tuple(slice(0, 1) if i in lay.red else slice(None) for i in range(x.ndim))]
    delta, var = passes.moments(jnp, xw - s, lay.red, sdt)
    s, n = jnp.astype(s, sdt), lay.count
    if spec.axis_name is not None:
        s, delta, var, n = coll.merge_stats(s, delta, var * n, n, spec.axis_name)
    inv = coef.inv_std(var, spec.eps)
    g, b = _bcast(gamma, lay.bshape, sdt), _bcast(beta, lay.bshape, sdt)
    r = d = None
    if spec.limits is not None:
        r, d = _renorm_rd(spec, s, delta, var, _bcast(mu, lay.bshape, sdt), sigma, lay, sdt)
        b = (0.0 if b is None else b) + (d if g is None else g * d)
        g = r if g is None else g * r
    y = passes.normalize(jnp, xw - jnp.astype(s, xw.dtype), delta, var, inv, g, b, n, x.dtype)
    mean, var_f = (jnp.reshape(v, lay.fshape) for v in (s + delta, var))
    if spec.axis_name is not None:
        mean, var_f = coll.invariant(mean, spec.axis_name), coll.invariant(var_f, spec.axis_name)
    return (y, mean, var_f), (x, s, delta, inv, g, gamma, beta, mu, sigma, r, d)


def _renorm_rd(spec: Spec, s, delta, var, mu, sigma, lay, sdt):
    """``r = clip(sigma_B / sigma, 1/rmax, rmax)``, ``d = clip((mu_B - mu)/sigma, +-dmax)``,
    with ``mu_B - mu`` formed as ``(s - mu) + delta`` (no float32 rounding of the mean)."""
    rmax, dmax = spec.limits
    sig = _bcast(sigma, lay.bshape, sdt)
    r = _clip(jnp.sqrt(var + spec.eps) / sig, 1.0 / rmax, rmax)
    d = _clip(((s - mu) + delta) / sig, -dmax, dmax)
    return r, d


def _train_bwd(spec: Spec, res, cts):
    dy = cts[0]  # the statistics' cotangents: no gradient flows through them (module notes)
    sdt = _sdt()
    if spec.fused:
        x, mean, var, inv, gamma, beta = res
        dx, dg, db = passes.backward(jnp, x, dy, spec.axes, mean, var, inv, gamma, True, None, sdt)
        return dx, _cast(dg, gamma), _cast(db, beta), None, None
    x, s, delta, inv, g_eff, gamma, beta, mu, sigma, r, d = res
    lay = layout(tuple(x.shape), spec.axes)
    xw = jnp.astype(x, work_dtype(jnp, x.dtype))
    xc = xw - jnp.astype(s, xw.dtype)
    ones = jnp.ones(lay.bshape, sdt)
    local = passes.grad_sums(jnp, xc, dy, delta, lay.red, sdt, ones)
    sum_dy, sum_dy_xc, n = local[0], local[1], lay.count
    if spec.axis_name is not None:
        sum_dy, sum_dy_xc = coll.ordered_sum(list(local), spec.axis_name)
        n = lay.count * coll.axis_size(spec.axis_name)
    k = inv if g_eff is None else inv * g_eff
    p, q = coef.backward_coef(sum_dy, sum_dy_xc, inv, k, n)
    dx = passes.input_grad(jnp, xc, dy, delta, k, p, q, x.dtype, ones)
    dg, db = inv * local[1], local[0]  # this participant's share
    if r is not None:
        dg = r * dg + d * db
    dg, db = (jnp.reshape(v, lay.fshape) for v in (dg, db))
    return dx, _cast(dg, gamma), _cast(db, beta), _zeros(mu), _zeros(sigma)


def _zeros(v):
    return None if v is None else jnp.zeros_like(v)


train.defvjp(_train_fwd, _train_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def evaluate(spec: Spec, x, gamma, beta, mean, var):
    """Evaluation forward with given statistics: ``y`` (eps always added)."""
    return passes.evaluate(jnp, x, spec.axes, gamma, beta, mean, var, spec.eps, _sdt())


def _eval_fwd(spec: Spec, x, gamma, beta, mean, var):
    return evaluate(spec, x, gamma, beta, mean, var), (x, gamma, beta, mean, var)


def _eval_bwd(spec: Spec, res, dy):
    r"""``dx = k dy`` (``k = gamma inv``), ``dgamma = inv sum(dy (x - mean))``,
    ``dbeta = sum(dy)``, and the given statistics' own gradients:
    :math:`\partial/\partial\mu = -k \sum dy`,
    :math:`\partial/\partial\sigma^2 = -\tfrac12 \gamma\, inv^2\, d\gamma`."""
    x, gamma, beta, mean, var = res
    sdt = _sdt()
    inv = coef.inv_std(jnp.astype(var, sdt), spec.eps)
    dx, dg, db = passes.backward(jnp, x, dy, spec.axes, mean, var, inv, gamma, False, None, sdt)
    g = 1.0 if gamma is None else jnp.astype(gamma, sdt)
    dmean = -(g * inv) * db
    dvar = -0.5 * g * inv * inv * dg
    return dx, _cast(dg, gamma), _cast(db, beta), _cast(dmean, mean), _cast(dvar, var)


evaluate.defvjp(_eval_fwd, _eval_bwd)
