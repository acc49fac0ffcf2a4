"""The reductions of :mod:`batchnorm.adapters.jax._kernel`'s forward: the plain sums XLA
CPU runs fastest, the shifted sums that keep a mean far from zero out of the result, and the
check that picks between them (the module notes of ``_kernel`` say why and when).

Where the reduced axes are one contiguous block of ``n`` rows (``x`` of shape ``(lead, n,
trail)``: batch norm's leading axes, ghost batch norm's middle ones) and ``n`` splits into
4 to 32 blocks of at most 32 rows and 2^15 values, both sums are one variadic
``jax.lax.reduce`` over the rows of each block, ``(lead, q, n/q, trail)``, followed by the
adds of the ``q`` partial sums (:func:`_blocks`, :func:`sum_pair`): it reads ``x`` once
where YNNPACK's two sums read it twice. Measured against the two sums on one pinned core
(CPU time per call, ratio to ``flax.linen.BatchNorm``, load 3-5): forward 64x256
1.04-1.07x -> 0.78-0.85x, 256x1024 1.03-1.06x -> 0.85-0.89x, 1024x256 1.02x -> 0.84x;
larger blocks or one variadic reduction of the whole axis were slower (2x at 1024x256
with blocks of 128 rows). The backward's sums take at most 8 blocks: XLA adds the
partial sums again inside the elementwise pass that uses them, and 16 or 32 blocks made
the gradient 1.1-2.4x slower.

Ghost batch norm's plain sums reduce the middle axis of ``(groups, n, C)`` (the groups
are a leading feature axis), which XLA CPU's YNNPACK does at about half the speed of a
leading axis on large inputs (it finds less parallel work; at 32x56x56x64 the forward took
1.45x Flax's time) and with more overhead on small ones. So from ``_SPLIT_MIN`` values the
reduced block is split into ``q`` (about ``_PARTS``) parts, ``(groups, q, n/q, C)``, summed
over ``n/q`` and then over ``q``, which XLA keeps in one YNNPACK kernel (:func:`_split`);
up to ``_FUSED_MAX`` values both sums, and the backward's two, are one variadic
``jax.lax.reduce`` each, a single loop that reads the data once (:func:`sum_pair`; slower
than YNNPACK above a few ten thousand values). All of these only regroup the additions.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..._validation import Layout
from ..._xp import work_dtype
from ...core.sums import RANGE_LIMIT, RANGE_UP, TINY_VAR, in_range, range_scale

__all__ = [
    "WELL",
    "centred",
    "nonnegative",
    "plain_scale",
    "plain_sums",
    "rescaled_sums",
    "sample",
    "shifted_sums",
    "sum_pair",
    "well_conditioned",
]


def centred(x, s, sdt):
    """``x - s`` in the working dtype (``s`` in the broadcast shape; None: ``x``)."""
    xw = jnp.astype(x, work_dtype(jnp, x.dtype))
    if sdt == jnp.float64:
        xw = jnp.astype(xw, sdt)
    return xw if s is None else xw - jnp.astype(s, xw.dtype)


def sample(x, lay: Layout, which: int, sdt):
    """One value of each feature of ``x`` (broadcast shape, dtype ``sdt``): at flat
    position 0, n-1, n/2 or n/4 of the reduced axes for ``which`` 0, 1, 2, 3.

    Each reduction over ``x - s`` gets its own sample (0 and 1 the forward's, 2 the
    backward's, 3 the elementwise passes'): XLA CPU writes an ``x - s`` that two
    consumers share out in full, since its YNNPACK reductions do not recompute a shared
    producer; with distinct samples every reduction recomputes ``x - s`` as it reads
    ``x``, and a pass over ``x`` stays one pass. (With fewer than four values per feature
    samples coincide: the results are the same, only a copy is made.)
    """
    red_shape = [x.shape[i] for i in lay.red]
    pos = (0, lay.count - 1, lay.count // 2, lay.count // 4)[which]
    index = dict(zip(lay.red, np.unravel_index(pos, red_shape), strict=True))
    sl = tuple(
        slice(int(index[i]), int(index[i]) + 1) if i in index else slice(None)
        for i in range(x.ndim)
    )
    return jnp.astype(jnp.astype(x[sl], work_dtype(jnp, x.dtype)), sdt)


def shifted_sums(x, lay: Layout, sdt, per_value: bool = False, checked: bool = True):
    """``(s, delta, m2)`` per feature in the broadcast shape, dtype ``sdt``: a sample
    ``s`` of the batch, ``delta = mean - s`` and ``m2 = sum((x - mean)**2)``, from two
    reductions over ``x`` shifted by two samples ``s`` and ``s2``:
    ``delta = sum(x - s)/n`` and ``m2 = sum((x - s2)**2) - n (mean - s2)**2`` with
    ``mean - s2 = (s - s2) + delta``. ``per_value``: ``m2 / n`` (the variance) in place
    of ``m2``, which may overflow where the variance does not.

    Range (``checked``): where the differences are formed in float32 (float32 data
    without x64) or float64 (float64 data), an O(C) check
    (:func:`batchnorm.core.sums.in_range`) finds a sum that is not finite (a difference
    or a square overflowed) or, in float32, squares lost to underflow, and a
    ``jax.lax.cond`` then takes :func:`rescaled_sums`. Half-precision data in float32,
    and float32 data in float64 (x64), can do neither. (The local kernel checks the
    plain sums instead, :func:`plain_scale`: a cond nested in its own, or a third branch,
    made the plain path 6-14% slower at 64x256.)

    Parameters
    ----------
    x : jax.Array, any shape
    lay : Layout
        The layout of ``x`` (feature and reduced axes).
    sdt : dtype
        The statistics dtype.
    """
    s, delta, m2 = _shifted(x, lay, sdt)
    out = (s, delta, m2 / lay.count if per_value else m2)
    if not checked or not _ranged(x.dtype, sdt):
        return out
    ok = _all_instances(in_range(jnp, delta, m2, lay.count, _wt(x.dtype, sdt)))
    return jax.lax.cond(ok, lambda: out, lambda: rescaled_sums(x, lay, sdt, per_value))


def rescaled_sums(x, lay: Layout, sdt, per_value: bool = False, h=None):
    """:func:`shifted_sums` with the squares formed on ``(x - s2) h``, ``h`` a per-feature
    power of two (exact): from :func:`batchnorm.core.sums.range_scale` (``max|x h|``
    about ``2^40`` in float32; a NaN counts as infinite, ``h = 1``), one more pass over
    ``x``, or given (:func:`plain_scale`). ``m2 = m2_h / h**2`` is infinite only where the
    variance itself overflows ``sdt``. The differences ``x - s`` are not scaled: they
    overflow only where the variance does (a spread beyond ``finfo.max``), and their sum
    only for ``n`` beyond 1e12."""
    if h is None:
        h = range_scale(jnp, x, lay.red, sdt)
    h = jnp.astype(h, sdt)
    s, delta, m2h = _shifted(x, lay, sdt, h)
    # times 1/h (exact): XLA turns (v / h) / h into v / (h * h), inf for h = 2^100
    ih = 1.0 / h
    return s, delta, ((m2h / lay.count if per_value else m2h) * ih) * ih


def _wt(dtype, sdt):
    """The dtype the shifted sums form their differences in."""
    return jnp.dtype(sdt) if jnp.dtype(sdt) == jnp.float64 else work_dtype(jnp, dtype)


def _ranged(dtype, sdt) -> bool:
    """Whether sums of ``dtype`` data formed in :func:`_wt` can overflow or underflow
    (not half precision in float32, nor float32 in float64)."""
    return jnp.dtype(dtype).itemsize >= jnp.dtype(_wt(dtype, sdt)).itemsize


def _shifted(x, lay: Layout, sdt, h=None):
    """The sums of :func:`shifted_sums` as they come (no range check); given a power of
    two ``h``, ``m2`` of ``x h`` (the squares of ``(x - s2) h``)."""
    s, s2 = sample(x, lay, 0, sdt), sample(x, lay, 1, sdt)
    d2 = centred(x, s2, sdt)
    if h is not None:
        d2 = d2 * jnp.astype(h, d2.dtype)
    n = lay.count
    delta = jnp.sum(centred(x, s, sdt), axis=lay.red, keepdims=True, dtype=sdt) / n
    t2 = jnp.sum(d2 * d2, axis=lay.red, keepdims=True, dtype=sdt)
    delta2 = (s - s2) + delta
    if h is not None:
        delta2 = delta2 * h
    return s, delta, nonnegative(t2 - n * (delta2 * delta2))


def nonnegative(v):
    """``max(v, 0)`` that keeps a NaN (an inf in the data makes ``inf - inf``): XLA CPU's
    fused maximum can return 0 for a NaN operand, which gave -inf outputs (``x - inf``
    scaled by ``1/sqrt(eps)``) where the statistics are NaN."""
    return jnp.where(v < 0.0, jnp.zeros_like(v), v)


# A feature is well conditioned for the plain sums when mean**2 <= WELL * var: then
# sum(x**2)/n - mean**2 loses at most a factor 1 + WELL of relative accuracy (about 1e-6 in
# float32), the same order as the shifted sums' own factor (module notes).
WELL = 4.0


def plain_sums(x, lay: Layout, sdt=None):
    """``(sum(x), sum(x * x))`` per feature in the broadcast shape, in ``x``'s dtype: the
    two reductions XLA CPU emits as its fastest kernels (no elementwise work before the
    sum), as Flax's ``BatchNorm`` does. With a wider ``sdt`` (float32 data under x64):
    ``x`` converted to it and summed there."""
    if sdt is not None and sdt != x.dtype:
        x = jnp.astype(x, sdt)
    if _fused(lay) or _blocks(lay, _BLOCKS_MAX) is not None:
        return sum_pair(x, x * x, lay, x.dtype, _BLOCKS_MAX)
    split = _split(lay)
    if split is None:
        s1 = jnp.sum(x, axis=lay.red, keepdims=True)
        return s1, jnp.sum(x * x, axis=lay.red, keepdims=True)
    shape, inner = split
    xs = jnp.reshape(x, shape)
    # the barrier: XLA would merge the two sums back into one middle-axis reduction
    p1, p2 = jax.lax.optimization_barrier((jnp.sum(xs, axis=inner), jnp.sum(xs * xs, axis=inner)))
    s1, s2 = jnp.sum(p1, axis=inner - 1), jnp.sum(p2, axis=inner - 1)
    return jnp.reshape(s1, lay.bshape), jnp.reshape(s2, lay.bshape)


# Middle-axis reductions (ghost batch norm's (groups, n, C) view) are split into _PARTS
# partial sums when x has at least _SPLIT_MIN values (module notes).
_PARTS = 64
_SPLIT_MIN = 1 << 20
# Up to _FUSED_MAX values, both middle-axis sums are one variadic reduction (module notes).
_FUSED_MAX = 1 << 14
# Blocked variadic sums (:func:`_blocks`): blocks of at most _ROWS rows and _BLOCK values,
# _BLOCKS_MIN to _BLOCKS_MAX blocks for the forward's sums and to _PAIR_BLOCKS_MAX for the
# backward's, whose partial sums XLA adds again inside the elementwise pass that uses them.
_ROWS = 32
_BLOCK = 1 << 15
_BLOCKS_MIN = 4
_BLOCKS_MAX = 32
_PAIR_BLOCKS_MAX = 8


def _middle(lay: Layout) -> bool:
    """Whether the reduced axes are one contiguous block after a feature axis."""
    return lay.red[0] > 0 and lay.red[-1] - lay.red[0] == len(lay.red) - 1


def _fused(lay: Layout) -> bool:
    return _middle(lay) and math.prod(lay.shape) <= _FUSED_MAX


def sum_pair(a, b, lay: Layout, sdt, most: int = _PAIR_BLOCKS_MAX):
    """``sum(a)`` and ``sum(b)`` over the reduced axes in ``sdt`` (broadcast shape): one
    variadic reduction that reads both once where :func:`_fused`, or over at most
    ``most`` blocks of rows where :func:`_blocks` (the blocks' partial sums then added),
    else two sums."""
    zero = jnp.zeros((), sdt)
    pair = (jnp.astype(a, sdt), jnp.astype(b, sdt))
    if _fused(lay):
        sums = jax.lax.reduce(pair, (zero, zero), _add2, lay.red)
        return tuple(jnp.reshape(v, lay.bshape) for v in sums)
    blocks = _blocks(lay, most)
    if blocks is None:
        kw = {"axis": lay.red, "keepdims": True, "dtype": sdt}
        return jnp.sum(a, **kw), jnp.sum(b, **kw)
    view, ax = blocks
    pair = tuple(jnp.reshape(v, view) for v in pair)
    parts = jax.lax.reduce(pair, (zero, zero), _add2, (ax + 1,))
    sums = []
    for p in parts:  # (lead, q, trail): the q partial sums, added in order
        rows = [jax.lax.index_in_dim(p, i, ax, keepdims=False) for i in range(view[ax])]
        sums.append(functools.reduce(jnp.add, rows))
    return tuple(jnp.reshape(v, lay.bshape) for v in sums)


def _blocks(lay: Layout, most: int):
    """The view ``(lead, q, n/q, trail)`` of ``x`` and the axis of ``q`` for sums over
    reduced axes that are one contiguous block, in ``q`` blocks of at most ``_ROWS`` rows
    and ``_BLOCK`` values (``_BLOCKS_MIN <= q <= most``, the fewest that fit): a variadic
    reduction over the rows of each block reads ``x`` once for both sums (module notes).
    None: the reduced axes are apart, or no such ``q`` divides ``n``."""
    red, shape = lay.red, lay.shape
    if red[-1] - red[0] != len(red) - 1:
        return None
    n, row = lay.count, math.prod(shape[red[-1] + 1 :])
    for q in range(_BLOCKS_MIN, most + 1):
        m = n // q
        if n % q == 0 and m <= _ROWS and m * row <= _BLOCK:
            return (*shape[: red[0]], q, m, *shape[red[-1] + 1 :]), red[0]
    return None


def _add2(a, b):
    return a[0] + b[0], a[1] + b[1]


def _split(lay: Layout):
    """The view ``(lead, q, n/q, trail)`` of ``x`` and the axis of ``n/q`` for plain sums
    over reduced axes that are one contiguous block after a feature axis (ghost batch
    norm's groups): XLA CPU's YNNPACK reduces the middle axis of ``(lead, n, trail)`` on
    fewer threads than a leading axis (about half the speed on this project's 2-core
    machine), and ``(lead * q)`` output rows give it the parallel work back; the ``q``
    partial sums are then added (a small reduction). None: no split (a leading reduced
    block, reduced axes apart, fewer than ``_SPLIT_MIN`` values or no divisor ``q`` of
    ``n`` in ``[_PARTS / 2, _PARTS]``)."""
    red, shape = lay.red, lay.shape
    if not _middle(lay) or math.prod(shape) < _SPLIT_MIN:
        return None
    n = lay.count
    q = next((q for q in range(_PARTS, _PARTS // 2 - 1, -1) if n % q == 0), None)
    if q is None:
        return None
    view = (*shape[: red[0]], q, n // q, *shape[red[-1] + 1 :])
    return view, red[0] + 1


def well_conditioned(s1, s2, n: int):
    """True (a 0-d array) when every feature has ``mean**2 <= WELL * var`` by the plain
    sums, so that they give its statistics to float accuracy; False when any feature
    does not, or when a sum is NaN or infinite (``s2 - s2`` is NaN then), or float32
    squares were lost to underflow (data of scale 1e-19 and below)."""
    q = _margin(s1, s2, n)
    if s2.dtype == jnp.float32:  # squares lost to underflow: the shifted sums rescale
        q = jnp.where(_tiny(s1, s2, n), 1.0, q)
    return _all_instances(_all_features(q))


def _margin(s1, s2, n: int):
    return (1.0 + WELL) * (s1 * s1) - (WELL * n) * s2 + (s2 - s2)  # n**2 (mean**2 - WELL var)


def plain_scale(s1, s2, n: int):
    """Per feature, the power of two ``h`` (``s2``'s dtype) of the shifted squares
    ``((x - s') h)**2`` (:func:`rescaled_sums`), from the plain sums in ``x``'s dtype: 1
    where ``sum((x - s)**2) <= 2 sum(x**2) + 2 n max(x**2) <= (2n + 2) s2`` stays finite
    and, for float32, the
    squares were not lost to underflow; else the one that brings ``max|x|`` (at most
    ``sqrt(s2)``, or ``finfo.max`` where ``s2`` is infinite, or in float32 at least
    ``2^-63``, below which a square flushes to 0) to about ``2^40`` (``2^400`` for
    float64), at most :data:`~batchnorm.core.sums.RANGE_UP`. 1 where ``s2`` is NaN."""
    fi = jnp.finfo(s2.dtype)
    need = ~(s2 <= float(fi.max) / (2 * n + 2))
    limit = RANGE_LIMIT[fi.bits // 8]
    top = jnp.where(s2 < jnp.inf, jnp.sqrt(jnp.abs(s2)), float(fi.max))
    if s2.dtype == jnp.float32:
        need = need | _tiny(s1, s2, n)
        top = jnp.maximum(top, 2.0**-63)
    h = 2.0 ** (math.log2(limit) - jnp.ceil(jnp.log2(top)))  # exact (XLA's exp2 is not)
    return jnp.where(need & (s2 == s2), jnp.minimum(h, RANGE_UP), 1.0).astype(s2.dtype)


def _tiny(s1, s2, n: int):
    """Float32 squares lost to underflow: ``s2`` below ``n TINY_VAR``, feature not all 0."""
    return (s2 < TINY_VAR * n) & ((s2 != 0.0) | (s1 != 0.0))


def _all_features(q):
    """``all(q <= 0)`` as one small kernel (:func:`_worst` of 0 where ``q <= 0`` and 1
    else, NaN included: XLA CPU's YNNPACK maximum drops NaNs, so a NaN margin must not
    reach it)."""
    return _worst(jnp.where(q <= 0.0, 0.0, 1.0).astype(q.dtype), jnp.sum) <= 0.0


def _worst(q, final=jnp.max):
    """``max(q)`` of values ``q >= 0`` (no NaN), as one small kernel where ``q`` has at
    most ``_TREE**3`` values. More than ``_TREE**2`` values are folded to ``_TREE**2`` by
    elementwise maxima of up to ``_TREE`` rows (fused into the same kernel; a reduction
    over the rows became a YNNPACK kernel of its own, 4 us for ghost batch norm's 4 x
    1024), then a max over blocks of ``_TREE`` (or ``_TREE**k``) values and ``final``
    (``jnp.sum``: 0 exactly where the max is) over at most ``_TREE`` blocks (XLA CPU
    splits a longer reduction to a scalar into two kernels)."""
    q = jnp.ravel(q)
    block = _TREE * _TREE
    if block < q.size <= block * _TREE:
        rows = -(-q.size // block)
        q = jnp.reshape(jnp.pad(q, (0, rows * block - q.size)), (rows, block))
        q = functools.reduce(jnp.maximum, [q[i] for i in range(rows)])
    inner = _TREE
    while q.size > inner * _TREE:
        inner *= _TREE
    rows = -(-q.size // inner)
    q = jnp.pad(q, (0, rows * inner - q.size))
    q = jnp.reshape(q, (rows, *[_TREE] * round(np.log(inner) / np.log(_TREE))))
    return final(jnp.max(q, axis=tuple(range(1, q.ndim))))


@jax.custom_batching.custom_vmap
def _all_instances(ok):
    """``ok``, and under ``jax.vmap`` the AND over the mapped instances, unbatched: the
    ``cond`` on it stays a conditional (a batched predicate would turn it into a select
    that computes both branches)."""
    return ok


@_all_instances.def_vmap
def _all_instances_vmap(axis_size, in_batched, ok):
    return (jnp.all(ok) if in_batched[0] else ok), False


_TREE = 32
