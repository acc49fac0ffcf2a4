"""The cache record of a forward pass: :class:`BatchNormCache`, what its backward needs
(a small named, typed record of arrays and static metadata; never a communicator), and its
registration as a JAX pytree so a cache can leave ``jax.jit``."""

from __future__ import annotations

from dataclasses import dataclass

from ._xp import is_jax
from .backends import plan

__all__ = ["BatchNormCache", "ensure_pytree", "register_pytree"]


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
        p = plan("numpy", self.x, self.axis)
        return p.backend.x_hat(self.x, self.mean, self.inv_std, p.layout.bshape)


_PYTREE_DONE: list[bool] = []


def ensure_pytree(xp) -> None:
    """Register the cache as a JAX pytree the first time JAX arrays come through."""
    if not _PYTREE_DONE and is_jax(xp):
        register_pytree()


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
