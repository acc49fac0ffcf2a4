"""How an array maps onto the kernels, and when they may run: plans and the thread guard.

Every layout is viewed as ``(O, C, I)``: O = the axes before the feature axis (or adjacent
feature axes, merged), C = the features, I = the axes after, in *memory* order: an array
that is a transpose of a C-contiguous one (a channels-last view of NCHW memory, or the
NCHW view of a channels-last tensor) is read in place through its memory-order view
(:func:`to_memory`), never gathered into a C-contiguous copy. A :class:`Plan` holds that
view for one shape, how the work is chunked over the threads, and whether the fused
("one trip to memory") kernels apply; below :data:`SERIAL_MAX` elements the serial kernels
run in the calling thread.

Threads: under numba's ``workqueue`` threading layer (the fallback without TBB or OpenMP)
parallel kernels must not be entered from two Python threads at once (numba aborts the
process), so calls are then serialized with a lock.
"""

from __future__ import annotations

import functools
import math
import threading

import numba
import numpy as np

# Below this many elements the kernels run serially in the calling thread: a parallel
# launch costs tens of microseconds, more than a small array's whole pass.
SERIAL_MAX = 1 << 15
WIDE_INNER = 32
# Bytes of one array a fused task keeps in cache (a channel block or a strip of columns).
# L2 is 1-2 MB per core; the fused kernels re-read the block right after summing it, so a
# block that spills to the (shared) L3 still avoids DRAM. Measured on 2 cores with a 32 MB
# L3: 4 MB blocks keep the fused passes at DRAM speed.
FUSE_BYTES = 4 << 20
# Most rows a fused strip of columns may span (see Plan).
ROWS_FUSE_MAX = 2048


# --------------------------------------------------------------------------- threads
_LOCK = threading.RLock()
_serialize: bool | None = None  # None until the threading layer is known


class _Guard:
    """Serializes kernel calls when numba's threading layer is not thread-safe.

    The layer is only known after the first parallel call, so calls are serialized until
    then; afterwards only the ``workqueue`` layer (which aborts the process when entered
    concurrently) takes the lock.
    """

    __slots__ = ("held",)

    def __enter__(self):
        self.held = _serialize is not False
        if self.held:
            _LOCK.acquire()
        return self

    def __exit__(self, *exc):
        global _serialize
        if self.held:
            if _serialize is None:
                try:
                    _serialize = numba.threading_layer() == "workqueue"
                except ValueError:  # no parallel kernel has run yet
                    pass
            _LOCK.release()
        return False


def guard() -> _Guard:
    """A context manager around one kernel call: it holds the module's lock while numba's
    threading layer is unknown or not thread-safe (``workqueue``), else nothing."""
    return _Guard()


# --------------------------------------------------------------------------- plans
@functools.lru_cache(maxsize=1)
def threads() -> int:
    """Threads to plan work for (numba.get_num_threads costs ~9 us a call, so it is read
    once; a later numba.set_num_threads only changes how work is chunked, never results)."""
    return numba.get_num_threads()


@functools.lru_cache(maxsize=256)
def plan_for(shape: tuple[int, ...], axes: tuple[int, ...], threads: int, itemsize: int) -> Plan:
    """The (cached) plan for one shape, feature axes, thread count and item size."""
    return Plan(shape, axes, threads, itemsize)


class Plan:
    """How an array of a given shape and feature axes maps onto the kernels' views.

    ``fused`` says whether one feature's data (wide layouts: a channel block; ``I == 1``
    rows: a strip of ``width`` columns) fit in :data:`FUSE_BYTES` with work for every
    thread, so that the one-trip kernels apply.
    """

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], threads: int, itemsize: int):
        first, last = axes[0], axes[-1]
        self.shape = shape
        self.O = math.prod(shape[:first])
        self.C = math.prod(shape[first : last + 1])
        self.I = math.prod(shape[last + 1 :])
        self.wide = self.I >= WIDE_INNER
        self.count = self.O * self.I
        self.width = 0
        if self.wide:  # tasks are (chunk of O, feature): split O only if too few features
            self.nchunks = max(1, min(self.O, -(-4 * threads // self.C)))
            block = self.O * self.I * itemsize
            self.fused = self.C >= threads and block <= FUSE_BYTES
        else:  # tasks are chunks of rows, one per thread (measured best)
            self.nchunks = max(1, min(self.O, threads))
            self.fused = False
            if self.I == 1:
                per_col = self.O * itemsize
                # strips of whole cache lines (16 float32), one per thread at least
                most = max(1, FUSE_BYTES // per_col)
                share = -(-self.C // threads)
                width = min(most, share)
                if width < self.C:
                    width = max(16, width - width % 16) if width >= 16 else width
                self.width = max(1, min(width, self.C))
                # Only the serial kernels (small arrays) fuse strips: in parallel, strided
                # strips measured slower than the two passes (1.5-2x at (256, 1024) and
                # (1024, 4096) float32; 3x at (8192, 4096), where they thrash the TLB).
                self.fused = (
                    threads == 1
                    and self.O <= ROWS_FUSE_MAX
                    and per_col * min(16, self.C) <= FUSE_BYTES
                )
        self.kshape = (self.O, self.C, self.I) if self.wide else (self.O, self.C * self.I)

    def view(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (C-contiguous) in the kernels' 3-D or 2-D view; float16 as its bits."""
        if arr.dtype == np.float16:
            arr = arr.view(np.uint16)
        return arr.reshape(self.kshape)

    def per_column(self, v: np.ndarray) -> np.ndarray:
        """Expand per-feature values (last axis) to the kernel's columns."""
        if self.wide or self.I == 1:
            return np.ascontiguousarray(v)
        return np.ascontiguousarray(np.repeat(v, self.I, axis=-1))


# --------------------------------------------------------------------------- memory order
def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` itself when C-contiguous, else a C-contiguous copy (float16 stays float16:
    the kernels read its bits). Every copy the backend makes of an input goes through here."""
    return np.ascontiguousarray(a)


def memory_perm(a: np.ndarray) -> tuple[int, ...] | None:
    """The axes of ``a`` outermost first in memory when ``a`` is a transpose of a
    C-contiguous array (``a.transpose(perm)`` is then C-contiguous); None when ``a`` is
    C-contiguous itself or is no such transpose (strided slices, negative strides)."""
    if a.flags.c_contiguous:
        return None
    perm = tuple(sorted(range(a.ndim), key=lambda i: (-a.strides[i], i)))
    return perm if a.transpose(perm).flags.c_contiguous else None


def memory_axes(perm, axes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The feature axes in the memory-order view of ``perm``, when they stay adjacent and in
    order there (so the flat per-feature vectors keep their order); None otherwise."""
    if perm is None:
        return None
    m = tuple(perm.index(a) for a in axes)
    return m if m == tuple(range(m[0], m[0] + len(m))) else None


def to_memory(axes: tuple[int, ...], x: np.ndarray, *others: np.ndarray):
    """``(perm, axes, arrays)``: ``x`` and ``others`` (same shape) as the kernels read them.

    Where ``x`` is a transpose of a C-contiguous array with the feature axes adjacent in
    memory, the arrays are its memory-order views (``perm``: the logical axis of each
    view axis; ``others`` of another layout are copied into it); otherwise ``perm`` is None
    and the arrays are C-contiguous (copies only where they were not).
    """
    if x.flags.c_contiguous:  # the common case, first (small arrays pay for every call)
        return None, axes, [x, *map(contiguous, others)]
    perm = memory_perm(x)
    maxes = memory_axes(perm, axes)
    if maxes is None:
        return None, axes, [contiguous(a) for a in (x, *others)]
    return perm, maxes, [contiguous(a.transpose(perm)) for a in (x, *others)]


def from_memory(perm, arr: np.ndarray) -> np.ndarray:
    """A result in the kernels' memory-order view, back in the logical axis order (a view
    laid out in memory like the input)."""
    return arr if perm is None else arr.transpose(np.argsort(perm))


def memory_shape(x: np.ndarray, axes: tuple[int, ...]):
    """``(shape, axes)`` of the layout the kernels will see for ``x`` (see :func:`to_memory`)."""
    if x.flags.c_contiguous:
        return x.shape, axes
    perm = memory_perm(x)
    maxes = memory_axes(perm, axes)
    if maxes is None:
        return x.shape, axes
    return tuple(x.shape[i] for i in perm), maxes


def supported(axes: tuple[int, ...]) -> bool:
    """The compiled kernels need the feature axes to be adjacent (one block in memory)."""
    return axes[-1] - axes[0] == len(axes) - 1


def small_fused(shape: tuple[int, ...], axes: tuple[int, ...]) -> bool:
    """Whether the serial kernels do a small array of this layout in one pass (channel
    blocks, or columns with one feature each); other small layouts are left to NumPy."""
    return plan_for(shape, axes, 1, 8).fused
