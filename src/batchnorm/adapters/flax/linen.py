"""``flax.linen`` modules: :class:`BatchNorm`, a drop-in for ``flax.linen.BatchNorm``
(a subclass with the same fields, defaults and variables) that computes with
:func:`batchnorm.jax.batch_norm`, and :class:`BatchRenorm` (Ioffe 2017)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import module as _module

from ...renorm import RenormSchedule
from ..jax.functions import batch_norm, moving_update, renorm_batch
from . import _common

__all__ = ["BatchNorm", "BatchRenorm"]


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` with this library's numerics.

    The same fields and defaults as ``flax.linen.BatchNorm`` (``use_running_average``,
    ``axis=-1``, ``momentum=0.99``, ``epsilon=1e-5``, ``dtype``, ``param_dtype``,
    ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``, ...) and the
    same variables: ``params/scale``, ``params/bias`` (feature shape, ``param_dtype``) and
    ``batch_stats/mean``, ``batch_stats/var`` (feature shape, float32), so variables made
    by either class load into the other. It is a subclass: ``isinstance(m,
    flax.linen.BatchNorm)`` holds.

    What differs is what it computes: statistics by a shifted one-pass
    (:mod:`batchnorm.jax`), exact at a mean far from zero where Flax's
    ``E[x^2] - E[x]^2`` loses every digit; the hand-written backward pass; statistics
    merged over ``axis_name`` exactly and in device order; a feature whose batch statistics
    are not finite keeps its running statistics. ``use_fast_variance`` is accepted and
    ignored (there is one, exact, variance). Not supported (a clear error): ``mask`` and
    ``axis_index_groups``; running statistics in float16 (``force_float32_reductions=False``
    with ``param_dtype=float16``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from batchnorm.flax.linen import BatchNorm
    >>> bn = BatchNorm(use_running_average=False)
    >>> x = jnp.arange(12.0).reshape(4, 3) + 1e6
    >>> variables = bn.init(jax.random.key(0), x)
    >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> [round(float(v), 3) for v in y[:, 0]]
    [-1.342, -0.447, 0.447, 1.342]
    """

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalize ``x`` (any shape) over every axis but ``axis``.

        Parameters
        ----------
        x : jax.Array
        use_running_average : bool, optional
            Overrides the field (one of the two must be given).
        mask : None
            Not supported (must be None).

        Returns
        -------
        y : jax.Array, shape of ``x``; dtype ``dtype``, or the promotion of ``x`` and the
            parameters
        """
        use_running_average = _module.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        _common.unsupported(mask, self.axis_index_groups)
        x = jnp.asarray(x)
        axes = _common.feature_axes(x.ndim, self.axis)
        mean, var, scale, bias = _variables(self, x, axes)
        out = _common.out_dtype(x, scale, bias, self.dtype)
        training = not use_running_average
        initializing = self.is_initializing()
        y, (new_mean, new_var) = batch_norm(
            jnp.astype(x, out), scale, bias, mean.value, var.value, training=training,
            axis=axes, momentum=self.momentum, eps=self.epsilon,
            axis_name=None if initializing else self.axis_name,
        )  # fmt: skip
        if training and not initializing:
            mean.value, var.value = new_mean, new_var
        return jnp.astype(y, out)


def _variables(mdl, x, axes):
    """Flax's variables, in Flax's order: ``batch_stats`` mean and var, then the
    ``params`` scale and bias (None where unused)."""
    fshape = tuple(x.shape[a] for a in axes)
    sdt = jnp.float32 if mdl.force_float32_reductions else mdl.param_dtype
    mean = mdl.variable("batch_stats", "mean", lambda s: jnp.zeros(s, sdt), fshape)
    var = mdl.variable("batch_stats", "var", lambda s: jnp.ones(s, sdt), fshape)
    scale = mdl.param("scale", mdl.scale_init, fshape, mdl.param_dtype) if mdl.use_scale else None
    bias = mdl.param("bias", mdl.bias_init, fshape, mdl.param_dtype) if mdl.use_bias else None
    return mean, var, scale, bias


class BatchRenorm(BatchNorm):
    r"""Batch renormalization (Ioffe 2017) for ``flax.linen``.

    Training normalizes with the batch statistics and corrects towards the running ones,
    :math:`y = \gamma\,(\hat x\, r + d) + \beta` with
    :math:`r = \mathrm{clip}(\sigma_B/\sigma, 1/r_{max}, r_{max})`,
    :math:`d = \mathrm{clip}((\mu_B - \mu)/\sigma, -d_{max}, d_{max})`,
    :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}`, :math:`\sigma = \sqrt{v + \epsilon}`
    (``v`` the running variance), ``r`` and ``d`` constants of the backward pass
    (:func:`batchnorm.jax.batch_renorm`). Evaluation is :class:`BatchNorm`'s. The running
    mean and variance move as :class:`BatchNorm`'s do, so with ``r_max=1, d_max=0`` (or
    during the warm-up) it computes exactly what :class:`BatchNorm` computes.

    Fields: all of :class:`BatchNorm`'s, and

    r_max, d_max : float
        Clipping limits after the warm-up (``r_max >= 1``, ``d_max >= 0``; default 3, 5).
    warmup_steps : int
        Training steps of plain batch norm first (default 0). CrossQ uses 100k.
    schedule : batchnorm.RenormSchedule, optional
        Ioffe's linear relaxation instead of ``r_max``/``d_max``/``warmup_steps``.

    Variables: :class:`BatchNorm`'s, and ``batch_stats/steps`` (int32, the training steps
    taken, which the schedule reads).
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 0
    schedule: RenormSchedule | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalize ``x`` (see the class); the arguments are :class:`BatchNorm`'s."""
        use_running_average = _module.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        _common.unsupported(mask, self.axis_index_groups)
        momentum = _common.checked_momentum(self.momentum)
        x = jnp.asarray(x)
        axes = _common.feature_axes(x.ndim, self.axis)
        mean, var, scale, bias = _variables(self, x, axes)
        steps = self.variable("batch_stats", "steps", lambda: jnp.zeros((), jnp.int32))
        out = _common.out_dtype(x, scale, bias, self.dtype)
        r_max, d_max = _common.checked_limits(self.r_max, self.d_max)
        warmup = _common.checked_steps(self.warmup_steps)
        rmax, dmax = _common.renorm_limits(steps.value, r_max, d_max, warmup, self.schedule)
        training = not use_running_average
        if not training:  # evaluation is batch norm's, bit for bit
            y, _ = batch_norm(jnp.astype(x, out), scale, bias, mean.value, var.value,
                              training=False, axis=axes, eps=self.epsilon)  # fmt: skip
            return y
        initializing = self.is_initializing()
        sigma = jnp.sqrt(jnp.astype(var.value, jnp.float32) + self.epsilon)
        y, m_b, v_b = renorm_batch(
            jnp.astype(x, out), scale, bias, mean.value, sigma, training, rmax, dmax,
            axes, self.epsilon, None if initializing else self.axis_name,
        )  # fmt: skip
        if not initializing:
            mean.value, var.value = moving_update(mean.value, m_b, var.value, v_b, momentum)
            steps.value = steps.value + 1
        return jnp.astype(y, out)
