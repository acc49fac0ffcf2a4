r"""Cross-device reduction for :mod:`batchnorm.jax`: the exact, ordered merge of batch
statistics and the ordered sum of gradient sums over a named JAX axis (``pmap``,
``shard_map``, or ``vmap`` with ``axis_name``).

Every participant gathers every participant's O(C) payload (``jax.lax.all_gather``, in axis
order) and reduces it itself in that order, so every participant computes the same
operations on the same values: the results are bit-identical everywhere, and do not depend
on how a collective happens to order its additions.

Statistics travel as ``(s, delta, M2)`` per participant: ``s`` one sample of each feature
(a data value, exact in the working dtype), ``delta`` the mean minus ``s`` and ``M2`` the
sum of squared deviations. The merge centres every part on participant 0's sample
``s_0`` (``s_i - s_0`` and ``delta_i`` are small next to an offset far from zero) and
applies the one Chan merge of :func:`batchnorm.core.stats.merge`, so the merged mean comes
back as ``s_0 + delta`` with ``delta`` accurate even when the statistics dtype is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...core.stats import merge

__all__ = ["axis_size", "invariant", "merge_stats", "ordered_sum", "varying_like"]


def axis_size(axis_name) -> int:
    """The number of participants along ``axis_name`` (a static Python int)."""
    return int(jax.lax.axis_size(axis_name))


def merge_stats(s, delta, m2, count: int, axis_name):
    """Merge per-participant ``(s, delta, M2)`` (each of ``count`` values per feature) over
    ``axis_name`` in participant order.

    Parameters
    ----------
    s, delta, m2 : arrays of one shape (per feature), in the statistics dtype
    count : int
        Values per feature on each participant (equal under SPMD).
    axis_name : hashable
        A bound axis name.

    Returns
    -------
    s0, delta, var, total : the reference sample (participant 0's ``s``), the merged mean
        minus ``s0``, the merged biased variance, and the total count (int)
    """
    gathered = jax.lax.all_gather(jnp.stack([s, delta, m2]), axis_name)  # (P, 3, ...)
    s0 = gathered[0, 0]
    n, mean, m2_t = count, gathered[0, 1], gathered[0, 2]
    for i in range(1, gathered.shape[0]):  # participant order, the same on every one
        part_mean = (gathered[i, 0] - s0) + gathered[i, 1]
        n, mean, m2_t = merge(n, mean, m2_t, count, part_mean, gathered[i, 2])
    return s0, mean, m2_t / n, n


def ordered_sum(arrays, axis_name):
    """Elementwise sums over ``axis_name`` of same-shaped arrays, added in participant
    order (identical on every participant)."""
    gathered = jax.lax.all_gather(jnp.stack(arrays), axis_name)
    total = gathered[0]
    for i in range(1, gathered.shape[0]):
        total = total + gathered[i]
    return [total[j] for j in range(len(arrays))]


def _vma(v) -> frozenset:
    """The manual axes ``v`` varies over (``shard_map`` with ``check_vma``); empty elsewhere."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return frozenset()
    aval = typeof(v)
    mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))  # JAX 0.6 - 0.9


def varying_like(v, like):
    """``v`` marked as varying over every manual axis ``like`` varies over.

    A replicated parameter used with sharded data must enter the custom-VJP kernel as
    varying: its cotangent there is this participant's share, and JAX then sums the shares
    over the axis itself (the transpose of the cast), as it does for its own operations.
    """
    if v is None:
        return None
    missing = tuple(sorted(_vma(like) - _vma(v), key=str))
    if not missing:
        return v
    cast = getattr(jax.lax, "pcast", None)
    if cast is not None:
        return cast(v, missing, to="varying")
    return jax.lax.pvary(v, missing)  # JAX releases before pcast


def invariant(v, axis_name):
    """``v`` (bit-identical on every participant) typed as invariant over ``axis_name``
    under ``shard_map``'s checks: participant 0's value plus exact zeros from the others.
    Unchanged where no check applies (``pmap``, ``vmap``)."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not set(names) & _vma(v):
        return v
    first = jax.lax.axis_index(axis_name) == 0
    return jax.lax.psum(jnp.where(first, v, jnp.zeros_like(v)), axis_name)
