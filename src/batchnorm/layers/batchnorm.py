""":class:`BatchNorm`, and :class:`ConventionLayer`, the part it shares with
:class:`batchnorm.GhostBatchNorm`: a framework convention's defaults and momentum direction."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .._compose import Inputs, train_local, train_synced
from .._validation import dense, same_layout
from ..conventions import (
    BatchStats,
    RunningStats,
    check_momentum,
    convention_config,
    get_convention,
    update_running_unchecked,
)
from ..core.reduce import Reducer
from .args import Argument, by_value, library_layer
from .checks import check_flag
from .training import BatchStatsLayer

__all__ = ["BatchNorm", "ConventionLayer"]

_DEFAULT: Any = object()
#: The constructor order of a convention layer's arguments (config and repr follow it).
ORDER = (
    "num_features", "convention", "axis", "momentum", "eps", "unbiased", "affine",
    "track_running_stats", "nonfinite", "dtype", "backend",
)  # fmt: skip


class ConventionLayer(BatchStatsLayer):
    """A batch-statistics layer configured by a convention (``"seed"``, ``"torch"``,
    ``"keras"``, ``"flax"`` or a :class:`~batchnorm.conventions.Convention`): its defaults
    of ``axis``, ``momentum``, ``eps`` and ``unbiased``, and the direction of ``momentum``.
    See :class:`BatchNorm` for the arguments."""

    convention = Argument(doc="The convention (fixed).")
    unbiased = Argument(
        by_value(check_flag, "unbiased"),
        doc="Feed the running variance the unbiased batch variance.",
    )
    track_running_stats = Argument(doc="Whether running statistics are kept (fixed).")

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        convention: str = "seed",
        axis: int | Sequence[int] | None = None,
        momentum: float | None = _DEFAULT,
        eps: float | None = None,
        unbiased: bool | None = None,
        affine: bool = True,
        track_running_stats: bool = True,
        nonfinite: Literal["raise", "skip"] = "raise",
        dtype: np.dtype | type | str = np.float64,
        backend: str = "auto",
        comm: object = None,
        timeout: float | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        conv = get_convention(convention)
        unbiased = conv.unbiased if unbiased is None else check_flag(unbiased, "unbiased")
        super().__init__(
            num_features,
            axis=conv.axis if axis is None else axis,
            momentum=conv.momentum if momentum is _DEFAULT else check_momentum(momentum),
            eps=conv.eps if eps is None else eps,
            affine=affine,
            track_running_stats=track_running_stats,
            nonfinite=nonfinite,
            dtype=dtype,
            backend=backend,
            comm=comm,
            timeout=timeout,
            reducer=reducer,
        )
        self._args.add("convention", conv, shown=convention_config(conv))
        self._args.add("unbiased", unbiased)
        self._args.add("track_running_stats", self._tracking)
        self._args.order(ORDER)

    def _running_update(self, running: RunningStats, stats: BatchStats) -> RunningStats:
        # the layer's arguments were validated when set: the unchecked entry of the same maths
        return update_running_unchecked(
            running,
            stats,
            self.momentum,
            self.convention.momentum_weights,
            unbiased=self.unbiased,
        )


@library_layer
class BatchNorm(ConventionLayer):
    """Batch normalization layer with train/eval modes and running statistics.

    Parameters
    ----------
    num_features : int or tuple of int
        Size of the feature axis (a tuple when ``axis`` names several axes).
    convention : {"seed", "torch", "keras", "flax"}
        Preset for the defaults of ``axis``, ``momentum``, ``eps`` and ``unbiased``, and the
        direction in which ``momentum`` is read (see :mod:`batchnorm.conventions`).
    axis : int or tuple of int, optional
        Feature axis; default from the preset.
    momentum : float or None, optional
        Default from the preset; None gives a cumulative average of all batch statistics.
    eps : float, optional
    unbiased : bool, optional
        Feed the running variance the unbiased batch variance ``m/(m-1) * var``.
    affine : bool
        Learn ``gamma`` (init 1) and ``beta`` (init 0); False sets both to None.
    track_running_stats : bool
        Keep running statistics. False: batch statistics are used in evaluation mode too.
    nonfinite : {"raise", "skip"}
        What a training batch with non-finite statistics does: raise ValueError (default), or
        return its (non-finite) output and skip the running-statistics update, counting it in
        ``skipped_updates`` (for mixed-precision loops that skip overflowed steps).
    dtype : float dtype
        Dtype of the parameters and running statistics (float64 by default).
    backend : {"auto", "numpy", "numba"}
        Kernels to run for NumPy arrays (see :func:`batchnorm.batch_norm_train`).
    comm : mpi4py communicator, optional
        Synchronized batch norm over the ranks of ``comm`` (see :mod:`batchnorm.distributed`).
    timeout : float, optional
        With ``comm``: abort the job when ranks are missing for this many seconds.
    reducer : Reducer, optional
        Any cross-process reducer instead of ``comm``.
    reuse_buffers : bool
        NumPy only: write every output (``y`` of :meth:`forward`, ``dx`` of :meth:`backward`)
        into one array per role kept by the layer instead of a fresh one, so a training loop
        stops allocating (and page-faulting) a new array per call. The returned array is then
        **overwritten by the next call** (also by a call that raises): copy it if you need
        it longer. A new input shape or dtype gets a new buffer. Each thread gets its own
        buffers, so threads sharing a layer never overwrite each other's outputs.

    Examples
    --------
    >>> import numpy as np
    >>> import batchnorm as bn
    >>> layer = bn.BatchNorm(3)
    >>> x = np.random.default_rng(0).standard_normal((8, 3)) + 5
    >>> y = layer(x)
    >>> bool(np.allclose(y.mean(axis=0), 0.0)), layer.num_batches_tracked
    (True, 1)
    >>> layer.running_mean.round(2)  # 0.9 * 0 + 0.1 * batch mean
    array([0.49, 0.49, 0.49])
    >>> y_eval = layer.eval()(x)  # the running statistics; no state changes
    """

    reuse_buffers = Argument(
        by_value(check_flag, "reuse_buffers"), doc="Write outputs into buffers the layer keeps."
    )

    def __init__(
        self, num_features: int | Sequence[int], *, reuse_buffers: bool = False, **kwargs: Any
    ) -> None:
        reuse_buffers = check_flag(reuse_buffers, "reuse_buffers")
        super().__init__(num_features, **kwargs)
        # recorded in config() only when True, so default configs stay as they were
        self._args.add("reuse_buffers", reuse_buffers, omit_if=False)
        # one buffer per role and thread: threads sharing a layer never write into each
        # other's outputs
        self._buffers: dict[tuple[str, int], np.ndarray] = {}

    def _buffer(self, role: str, like, avoid=None) -> np.ndarray | None:
        """The reusable output array for ``role`` ("y" or "dx"), or None when not reusing
        (or for arrays other than NumPy's); never one that overlaps ``like`` or ``avoid``."""
        if not self.reuse_buffers or not isinstance(like, np.ndarray):
            return None
        key = (role, threading.get_ident())
        buf = self._buffers.get(key)
        if (
            buf is None
            or buf.shape != like.shape
            or buf.dtype != like.dtype
            or (dense(like) and not same_layout(buf, like))  # laid out unlike the input
            or np.may_share_memory(buf, like)  # the caller fed a returned buffer back in
            or (isinstance(avoid, np.ndarray) and np.may_share_memory(buf, avoid))
        ):
            # laid out in memory like the input (a channels-last view of NCHW memory too:
            # the kernels then write it in place); C order for a strided slice
            buf = np.empty_like(like) if dense(like) else np.empty(like.shape, like.dtype)
            self._buffers[key] = buf
        return buf

    def _forward_batch(self, inp: Inputs):
        self._check_count(inp)
        inp.out = self._buffer("y", inp.x)
        return train_local(inp)

    def _forward_merged(self, inp: Inputs | None, reducer, call, error):
        if inp is not None:
            inp.out = self._buffer("y", inp.x)
        return train_synced(reducer, call, error, inp)

    def _forward_running(self, inp: Inputs):
        inp.out = self._buffer("y", inp.x)
        return super()._forward_running(inp)

    def _dx_buffer(self, cache, dy):
        return self._buffer("dx", cache.x, dy)
