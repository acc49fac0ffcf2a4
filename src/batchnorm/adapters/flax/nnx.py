"""``flax.nnx`` modules: :class:`BatchNorm`, a drop-in for ``flax.nnx.BatchNorm`` (a
subclass with the same constructor, attributes and variables) that computes with
:func:`batchnorm.jax.batch_norm`, and :class:`BatchRenorm` (Ioffe 2017)."""

from __future__ import annotations

import threading

import jax.numpy as jnp
from flax import nnx

from ...renorm import RenormSchedule
from ..jax.functions import batch_norm, moving_update, renorm_batch
from . import _common

__all__ = ["BatchNorm", "BatchRenorm"]

# One lock for the read-compute-write of every module's running statistics: threads that
# call modules eagerly would otherwise read the same old values and lose updates. (An
# nnx module cannot hold a lock itself: its attributes must survive nnx.split/deepcopy.)
_UPDATE = threading.RLock()

_NO_MODE = (
    "No use_running_average was given to {name}: pass it to the constructor, to the call, "
    "or set the mode with model.train() / model.eval()"
)


def _mode(mdl, use_running_average):
    value = use_running_average if use_running_average is not None else mdl.use_running_average
    if value is None:
        raise ValueError(_NO_MODE.format(name=type(mdl).__name__))
    return bool(value)


def _inputs(mdl, x):
    """``(x, scale, bias)`` promoted as Flax promotes them, and the feature axes."""
    scale = mdl.scale[...] if mdl.scale is not None else None
    bias = mdl.bias[...] if mdl.bias is not None else None
    x, _, _, scale, bias = mdl.promote_dtype(
        (jnp.asarray(x), mdl.mean[...], mdl.var[...], scale, bias),
        dtype=_common.checked_dtype(mdl.dtype),
    )
    return x, scale, bias, _common.feature_axes(x.ndim, mdl.axis)


class BatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` with this library's numerics.

    The same constructor (``num_features``, ``use_running_average=False``, ``axis=-1``,
    ``momentum=0.99``, ``epsilon=1e-5``, ``dtype``, ``param_dtype``, ``use_bias``,
    ``use_scale``, the initializers, ``axis_name``, ..., ``rngs``), the same variables
    (``scale``/``bias`` ``nnx.Param``, ``mean``/``var`` ``nnx.BatchStat`` in float32) and
    the same modes (``model.train()`` / ``model.eval()``, ``nnx.view``). It is a subclass:
    ``isinstance(m, flax.nnx.BatchNorm)`` holds, and its state loads into Flax's class and
    back. What differs is what it computes, as :class:`batchnorm.flax.linen.BatchNorm`;
    ``mask`` and ``axis_index_groups`` are not supported (a clear error).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from batchnorm.flax.nnx import BatchNorm
    >>> bn = BatchNorm(3, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.arange(12.0).reshape(4, 3) + 1e6)
    >>> [round(float(v), 3) for v in y[:, 0]]
    [-1.342, -0.447, 0.447, 1.342]
    >>> round(float(bn.mean[...][0]), 1)  # 0.99 * 0 + 0.01 * (1e6 + 4.5)
    10000.0
    """

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalize ``x`` over every axis but ``axis``.

        Parameters
        ----------
        x : jax.Array
        use_running_average : bool, optional
            Overrides the attribute.
        mask : None
            Not supported (must be None).

        Returns
        -------
        y : jax.Array, shape of ``x``, in the promoted dtype (``dtype`` if given)
        """
        use_running_average = _mode(self, use_running_average)
        _common.unsupported(mask, self.axis_index_groups)
        with _UPDATE:  # the running statistics' read and write, atomic across threads
            x, scale, bias, axes = _inputs(self, x)
            training = not use_running_average
            y, (mean, var) = batch_norm(
                x, scale, bias, self.mean[...], self.var[...], training=training, axis=axes,
                momentum=self.momentum, eps=self.epsilon, axis_name=self.axis_name,
            )  # fmt: skip
            if training:
                self.mean[...], self.var[...] = mean, var
        return y


class BatchRenorm(BatchNorm):
    r"""Batch renormalization (Ioffe 2017) for ``flax.nnx``.

    :class:`BatchNorm`'s constructor and variables plus the keyword arguments ``r_max=3.0``,
    ``d_max=5.0``, ``warmup_steps=0`` and ``schedule=None`` (a
    :class:`batchnorm.RenormSchedule`), and one more variable, ``steps``
    (``nnx.BatchStat``, int32: the training steps taken). The maths and the running
    statistics are those of :class:`batchnorm.flax.linen.BatchRenorm`: with
    ``r_max=1, d_max=0`` (or during the warm-up) it computes what :class:`BatchNorm`
    computes.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from batchnorm.flax.nnx import BatchRenorm
    >>> bn = BatchRenorm(3, r_max=3.0, d_max=5.0, warmup_steps=1000, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.ones((8, 3)))
    >>> int(bn.steps[...])
    1
    """

    def __init__(
        self,
        num_features: int,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        schedule: RenormSchedule | None = None,
        **kwargs,
    ):
        super().__init__(num_features, **kwargs)
        self.r_max, self.d_max = _common.checked_limits(r_max, d_max)
        self.warmup_steps = _common.checked_steps(warmup_steps)
        self.schedule = schedule
        _common.renorm_limits(0, self.r_max, self.d_max, self.warmup_steps, schedule)
        self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalize ``x`` (see the class); the arguments are :class:`BatchNorm`'s."""
        use_running_average = _mode(self, use_running_average)
        _common.unsupported(mask, self.axis_index_groups)
        momentum = _common.checked_momentum(self.momentum)
        with _UPDATE:  # see BatchNorm.__call__
            x, scale, bias, axes = _inputs(self, x)
            if use_running_average:  # evaluation is batch norm's, bit for bit
                return super().__call__(x, True)
            step = self.steps[...]
            rmax, dmax = _common.renorm_limits(
                step, self.r_max, self.d_max, self.warmup_steps, self.schedule
            )
            sigma = jnp.sqrt(jnp.astype(self.var[...], jnp.float32) + self.epsilon)
            y, m_b, v_b = renorm_batch(
                x, scale, bias, self.mean[...], sigma, True, rmax, dmax, axes,
                self.epsilon, self.axis_name,
            )  # fmt: skip
            new_mean, new_var = moving_update(self.mean[...], m_b, self.var[...], v_b, momentum)
            self.mean[...], self.var[...] = new_mean, new_var
            self.steps[...] = step + 1
        return y
