r"""Pure batch-norm functions for JAX, in Flax's conventions.

``batch_norm(x, gamma, beta, running_mean, running_var, *, training, axis=-1,
momentum=0.99, eps=1e-5, axis_name=None) -> (y, (new_running_mean, new_running_var))``

Training mode normalizes with the batch statistics (biased variance) and moves the running
statistics towards them,

.. math::

    m \leftarrow \text{momentum}\cdot m + (1-\text{momentum})\,\mu_B,

    v \leftarrow \text{momentum}\cdot v + (1-\text{momentum})\,\sigma^2_B,

Flax's direction (``momentum`` weighs the old value; the variance is the biased one, as
Flax's ``BatchNorm`` uses). Evaluation mode normalizes with the running statistics and
returns them unchanged. ``jax.grad`` goes through the library's hand-written backward pass
(a ``jax.custom_vjp``); the new running statistics carry no gradient (like Flax's
``batch_stats``). With ``axis_name`` (inside ``pmap``, ``shard_map`` or a named ``vmap``)
the statistics and the backward pass's gradient sums are merged over that axis exactly and
in participant order, so every participant gets bit-identical statistics.

Everything static (``training``, ``axis``, ``momentum``, ``eps``, ``axis_name``, the ghost
batch size) is a Python value: under ``jax.jit`` mark such arguments static. Renorm's limits
may be either (a schedule computes them from a step count under ``jit``). Running
statistics in float16 are refused (a variance above 65504 would be stored as inf).

Under ``jax.jit`` each direction compiles to the passes over ``x`` of Flax's own
``BatchNorm`` or fewer: forward, two reductions (``sum(x)`` and ``sum(x * x)``, kept where
every feature's mean is within two standard deviations of zero; elsewhere a ``jax.lax.cond``
takes the shifted sums ``sum(x - s)`` and ``sum((x - s')**2)`` with samples ``s``, ``s'``
of the batch, two more reductions) and one elementwise pass; backward, two reductions
(``sum(dy)``, ``sum(dy (x - s''))``) and one elementwise pass (see the kernel module).

A feature whose batch statistics are not finite keeps its running statistics (a
traced function cannot raise on data); its outputs show the NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..._xp import stats_dtype
from ...variants import ghost_slices
from . import _args
from . import _collective as coll
from ._kernel import Spec, evaluate, train

__all__ = ["batch_norm", "batch_renorm", "ghost_batch_norm"]


def moving_update(old_mean, mean, old_var, var, momentum: object):
    """The running statistics moved towards the batch's: ``momentum * old + (1 - momentum)
    * batch`` for each of the pair, formed in the statistics dtype and returned in the old
    values' dtypes. A feature keeps both its old values unless both batch values and both
    results are finite there: a NaN/Inf batch, and a batch statistic finite in float64
    (JAX's x64) that overflows the running statistics' float32, never reach them.
    ``momentum`` is checked here (a Python float in [0, 1]), so no caller can skip it."""
    momentum = _args.momentum(momentum)
    sdt = stats_dtype(jnp, None)
    news, keep = [], None
    for old, batch in ((old_mean, mean), (old_var, var)):
        b = jnp.astype(jax.lax.stop_gradient(batch), sdt)
        new = jnp.astype(momentum * jnp.astype(old, sdt) + (1.0 - momentum) * b, old.dtype)
        ok = jnp.isfinite(b) & jnp.isfinite(new)
        keep = ok if keep is None else keep & ok
        news.append(new)
    return tuple(jnp.where(keep, n, o) for n, o in zip(news, (old_mean, old_var), strict=True))


def _prepare(x, axis, eps, axis_name, training, **arrays):
    """Checked ``(training, x, layout, spec, per-feature arrays)``."""
    training = _args.mode(training)
    x = _args.as_x(x)
    lay = _args.data_layout(x, axis)
    eps = _args.static_eps(eps)
    if training:
        _args.check_axis_name(axis_name)
    feats = _args.features(lay, axis, **arrays)
    spec = Spec(lay.axes, eps, axis_name if training else None)
    return training, x, lay, spec, feats


def _share(x, *arrays):
    """Per-feature arrays typed as varying wherever ``x`` is (``shard_map``), so that their
    gradients inside the kernels are this participant's share."""
    return [coll.varying_like(v, x) for v in arrays]


def _start(x, gamma, beta, running_mean, running_var, axis, eps, axis_name, training, momentum):
    """The checks shared by the functions that keep a running mean and variance; in evaluation
    mode also their result (``done``: y and the unchanged running statistics), else None."""
    _args.running("running_mean", running_mean)
    _args.running("running_var", running_var)
    momentum = _args.momentum(momentum)
    training, x, lay, spec, f = _prepare(
        x, axis, eps, axis_name, training, gamma=gamma, beta=beta,
        running_mean=running_mean, running_var=running_var,
    )  # fmt: skip
    done = None
    if not training:
        y = evaluate(
            spec, x, *_share(x, f["gamma"], f["beta"], f["running_mean"], f["running_var"])
        )
        done = (y, (f["running_mean"], f["running_var"]))
    return momentum, x, lay, spec, f, done


def batch_norm(
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    *,
    training: bool,
    axis=-1,
    momentum: float = 0.99,
    eps: float = 1e-5,
    axis_name=None,
):
    """Batch normalization as a pure function (see the module docstring).

    Parameters
    ----------
    x : jax.Array, any shape, float16/bfloat16/float32/float64
    gamma, beta : jax.Array of the per-feature shape, or None (1 and 0)
    running_mean, running_var : jax.Array of the per-feature shape
    training : bool
        Batch statistics (True) or the running statistics (False).
    axis : int or tuple of int
        Feature axes (default -1, Flax's).
    momentum : float
        Weight of the old running value (default 0.99, Flax's).
    eps : float
        Added to the variance (default 1e-5, Flax's).
    axis_name : hashable, optional
        Merge the batch statistics over this named axis (training only).

    Returns
    -------
    y : jax.Array, shape and dtype of ``x``
    (new_running_mean, new_running_var) : jax.Array, shapes and dtypes of the inputs
        Unchanged in evaluation mode.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import batchnorm.jax as bnj
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, (mean, var) = bnj.batch_norm(x, jnp.ones(2), jnp.zeros(2), jnp.zeros(2),
    ...                                 jnp.ones(2), training=True, eps=0.0)
    >>> y
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> [round(float(v), 4) for v in (*mean, *var)]  # 0.99 * old + 0.01 * batch
    [0.02, 0.2, 1.0, 1.99]
    """
    momentum, x, _, spec, f, done = _start(
        x, gamma, beta, running_mean, running_var, axis, eps, axis_name, training, momentum
    )
    if done is not None:
        return done
    y, mean, var = train(spec, x, *_share(x, f["gamma"], f["beta"]), None, None, None)
    return y, moving_update(f["running_mean"], mean, f["running_var"], var, momentum)


def batch_renorm(
    x,
    gamma,
    beta,
    running_mean,
    running_std,
    *,
    training: bool,
    rmax: float,
    dmax: float,
    axis=-1,
    momentum: float = 0.99,
    eps: float = 1e-5,
    axis_name=None,
):
    r"""Batch renormalization (Ioffe 2017) as a pure function, as :mod:`batchnorm.renorm`.

    Training: :math:`r = \mathrm{clip}(\sigma_B/\sigma, 1/r_{max}, r_{max})`,
    :math:`d = \mathrm{clip}((\mu_B - \mu)/\sigma, -d_{max}, d_{max})` with
    :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}`, both constants of the backward pass,
    and :math:`y = \gamma\,(\hat x\,r + d) + \beta`; the running mean and the running
    *standard deviation* move towards :math:`\mu_B` and :math:`\sigma_B` (``momentum``
    weighs the old value, as Keras 2's ``renorm_momentum``). Evaluation:
    :math:`y = \gamma (x - \mu)/\sigma + \beta`. With ``rmax=1, dmax=0`` it is batch norm.

    Parameters
    ----------
    x : jax.Array, any shape, floating
    gamma, beta : jax.Array of the per-feature shape, or None (1 and 0)
    running_mean, running_std : jax.Array of the per-feature shape
        ``running_std`` must be > 0 (not checked: values are not inspected under ``jit``).
    training : bool
    rmax, dmax : float, or 0-d jax.Array
        Clipping limits, ``rmax >= 1``, ``dmax >= 0`` (checked when Python numbers; arrays,
        e.g. a warm-up schedule's values computed under ``jit``, are used as given).
    axis : int or tuple of int
    momentum : float
    eps : float
    axis_name : hashable, optional
        Merge the batch statistics over this named axis (training only).

    Returns
    -------
    y : jax.Array, shape and dtype of ``x``
    (new_running_mean, new_running_std) : jax.Array, shapes and dtypes of the inputs
    """
    _args.running("running_mean", running_mean)
    _args.running("running_std", running_std)
    momentum = _args.momentum(momentum)
    out = renorm_batch(x, gamma, beta, running_mean, running_std, training, rmax, dmax,
                       axis, eps, axis_name)  # fmt: skip
    if not training:
        return out[0], (out[1], out[2])
    y, mean, var = out
    sigma_b = jnp.sqrt(var + _args.static_eps(eps))
    return y, moving_update(running_mean, mean, running_std, sigma_b, momentum)


def renorm_batch(x, gamma, beta, mean, std, training, rmax, dmax, axis, eps, axis_name):
    """Batch renorm's output and, in training, the batch statistics: ``(y, batch mean,
    biased batch variance)`` (the statistics dtype, no gradient); in evaluation
    ``(y, mean, std)`` as given. The shared core of :func:`batch_renorm` and the Flax
    ``BatchRenorm`` modules, which keep running statistics their own way."""
    lim = _args.renorm_limits(rmax, dmax)
    training, x, _, spec, f = _prepare(
        x, axis, eps, axis_name, training, gamma=gamma, beta=beta, mean=mean, std=std
    )
    if not training:
        g, b, m, s = _share(x, f["gamma"], f["beta"], f["mean"], f["std"])
        return evaluate(Spec(spec.axes, 0.0), x, g, b, m, s * s), f["mean"], f["std"]
    rspec = Spec(spec.axes, spec.eps, spec.axis_name, renorm=True)
    shared = _share(x, f["gamma"], f["beta"], f["mean"], f["std"], lim)
    y, m, v = train(rspec, x, *shared)
    return y, jax.lax.stop_gradient(m), jax.lax.stop_gradient(v)


def ghost_batch_norm(
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    *,
    training: bool,
    virtual_batch_size: int,
    axis=-1,
    momentum: float = 0.99,
    eps: float = 1e-5,
):
    """Ghost batch norm (Hoffer et al. 2017) as a pure function, as
    :class:`batchnorm.GhostBatchNorm`: each virtual batch of ``virtual_batch_size``
    consecutive samples along axis 0 is normalized with its own statistics (a last virtual
    batch of one value per feature joins the one before, see
    :func:`batchnorm.variants.ghost_slices`); the running statistics move once, towards the
    size-weighted average of the virtual batches' mean and biased variance. Evaluation is
    :func:`batch_norm`'s. Under ``pmap``/``shard_map`` the virtual batches are per device
    (there is no ``axis_name``).

    Parameters
    ----------
    x : jax.Array, shape (N, ...), floating; axis 0 must not be a feature axis
    gamma, beta : jax.Array of the per-feature shape, or None (1 and 0)
    running_mean, running_var : jax.Array of the per-feature shape
    training : bool
    virtual_batch_size : int
        Samples per virtual batch (a static Python int).
    axis : int or tuple of int
    momentum : float
    eps : float

    Returns
    -------
    y : jax.Array, shape and dtype of ``x``
    (new_running_mean, new_running_var) : jax.Array, shapes and dtypes of the inputs
    """
    momentum, x, lay, spec, f, done = _start(
        x, gamma, beta, running_mean, running_var, axis, eps, None, training, momentum
    )
    if done is not None:
        return done
    vbs = _args.virtual_batch(virtual_batch_size, lay)
    g, b = _share(x, f["gamma"], f["beta"])
    parts = ghost_slices(x.shape[0], vbs, lay.count // x.shape[0])
    equal = [sl for sl in parts if sl.stop - sl.start == vbs]  # leading, equal parts
    outs, mean, var = [], 0.0, 0.0
    if equal:
        y, m, v = _ghost_equal(spec, x[: len(equal) * vbs], g, b, len(equal), lay)
        w = len(equal) * vbs / x.shape[0]
        outs.append(y)
        mean, var = w * m, w * v
    for sl in parts[len(equal) :]:  # a last part of another size
        y, m, v = train(spec, x[sl], g, b, None, None, None)
        w = (sl.stop - sl.start) / x.shape[0]  # each part's share of the values
        outs.append(y)
        mean, var = mean + w * m, var + w * v
    y = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return y, moving_update(f["running_mean"], mean, f["running_var"], var, momentum)


def _ghost_equal(spec: Spec, x, gamma, beta, groups: int, lay):
    """``groups`` virtual batches of equal size in one kernel call: ``x`` seen as
    ``(groups, size, ...)`` with the group axis as one more feature axis. Returns ``y``
    (shape of ``x``) and the mean over the groups of their means and variances."""
    xg = jnp.reshape(x, (groups, x.shape[0] // groups, *x.shape[1:]))
    gspec = Spec((0, *(a + 1 for a in spec.axes)), spec.eps)
    y, m, v = train(gspec, xg, gamma, beta, None, None, None)  # gamma, beta shared by groups
    if groups <= 8:  # a few adds, fused where the means are used (no reduction kernel)
        m, v = (sum(u[i] for i in range(1, groups)) + u[0] for u in (m, v))
        return jnp.reshape(y, x.shape), m / groups, v / groups
    mv = jnp.mean(jnp.stack([m, v]), axis=1)  # one reduction for both
    return jnp.reshape(y, x.shape), mv[0], mv[1]
