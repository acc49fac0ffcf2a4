r"""The layers that train with batch statistics: :class:`BatchStatsLayer`, the base of
:class:`~batchnorm.BatchNorm`, :class:`~batchnorm.GhostBatchNorm` and
:class:`~batchnorm.BatchRenorm`.

In training mode such a layer normalizes with batch statistics and updates its running
statistics by exponential smoothing,

.. math::

    \text{running} \leftarrow (1-w)\,\text{running} + w\,\text{batch},

with the weight ``w`` of the new value read from ``momentum`` (the one implementation is
:func:`batchnorm.conventions.update_running`). In evaluation mode it normalizes with the
running statistics and changes no state.

The forward template: check the input once, the layer's batch maths (local statistics,
``reducer.merge``, the output), then the running update and the commit under the lock. A
rejected call leaves the layer exactly as it was, on every participant; no non-finite value
reaches the running statistics. Threads: the update (read, smooth, write, count) is atomic,
so training forwards from several threads never lose an update; a forward/backward pair
belongs to one thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .. import _xp
from .._compose import Inputs
from ..conventions import BatchStats, NonFiniteStatisticsError, RunningStats, check_momentum
from ..core.reduce import KIND_BACKWARD, KIND_TRAIN, LOCAL, Call, check_reducer
from .args import Argument, Constant, by_value
from .base import NormLayer
from .checks import check_nonfinite
from .state import ReadOnly, StateCount
from .sync import args_hash


class BatchStatsLayer(NormLayer):
    """Base of the layers that normalize with batch statistics in training (see the module
    docstring). Subclasses implement :meth:`_forward_batch` and :meth:`_running_update`.

    Attributes
    ----------
    momentum : float or None
    nonfinite : {"raise", "skip"}
    skipped_updates : int
        Training forwards whose update was skipped (``nonfinite="skip"``).
    last_batch_stats : BatchStats or None
        Count, mean and biased variance of the last batch normalized with batch statistics.
    dgamma, dbeta : array or None
        Gradients from the last :meth:`backward` (read-only).
    gradients_reduced : bool
        Whether ``dgamma``/``dbeta`` are already sums over every participant.
    reducer : Reducer
        How batch statistics and gradient sums are combined across processes.
    comm : mpi4py communicator or None
        Setting it installs an MPI reducer over ``comm`` (None: local).
    timeout : float or None
    """

    uses_batch_stats = Constant(True, "Whether the layer ever uses batch statistics.")
    synchronizable = Constant(True, "Whether the layer can merge statistics across processes.")

    momentum = Argument(by_value(check_momentum), doc="Smoothing of the running statistics.")
    nonfinite = Argument(
        by_value(check_nonfinite), doc="What a batch with non-finite statistics does."
    )
    skipped_updates = StateCount()
    dgamma = ReadOnly()
    dbeta = ReadOnly()
    gradients_reduced = ReadOnly()

    def __init__(
        self, num_features, *, momentum, nonfinite, comm, timeout, reducer, **base: Any
    ) -> None:
        momentum, nonfinite = check_momentum(momentum), check_nonfinite(nonfinite)
        super().__init__(num_features, **base)
        self._args.add("momentum", momentum)
        self._args.add("nonfinite", nonfinite)
        if reducer is not None:
            # the checks of the functional calls (reducer_of): a reducer keeps its own timeout
            check_reducer(reducer)
            if comm is not None:
                raise TypeError("pass comm= or reducer=, not both")
            if timeout is not None:
                raise TypeError(
                    f"timeout={timeout!r} applies to comm=; a reducer carries its own timeout "
                    "(e.g. batchnorm.distributed.MpiReducer(comm, timeout))"
                )
            self._sync.set_reducer(reducer)
        else:  # (set_comm(None) would replace an MPI reducer passed as reducer= by LOCAL)
            self._sync.set_timeout(timeout)  # checked before the layer is numbered
            self._sync.set_comm(comm)

    # ------------------------------------------------------------------ synchronization
    @property
    def reducer(self):
        """The reducer batch statistics and gradient sums go through."""
        return self._sync.reducer

    @reducer.setter
    def reducer(self, value) -> None:
        self._sync.set_reducer(value)

    @property
    def comm(self) -> object:
        """The communicator of the layer's MPI reducer (None: local)."""
        return getattr(self._sync.reducer, "comm", None)

    @comm.setter
    def comm(self, value: object) -> None:
        self._sync.set_comm(value)

    @property
    def timeout(self) -> float | None:
        """Seconds a synchronized call waits for missing ranks before aborting (None: never):
        the distributed reducer's own; assigning it sets the reducer's (refused, with
        nothing changed, when the reducer does not let it be set)."""
        return self._sync.get_timeout()

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._sync.set_timeout(value)

    @property
    def sync_position(self) -> int:
        """The layer's position among the synchronized layers of its process: drawn the
        first time it gets a distributed reducer (``comm=``, ``reducer=`` or an assignment),
        kept afterwards; :func:`batchnorm.distributed.convert_sync` sets model order."""
        return self._sync.tag

    @sync_position.setter
    def sync_position(self, value: int) -> None:
        self._sync.set_tag(value)

    # ------------------------------------------------------------------ forward
    def _check_count(self, inp: Inputs, minimum: int = 2) -> None:
        """Batch statistics need at least ``minimum`` values per feature (local check)."""
        if inp.lay.count < minimum:
            raise ValueError(
                f"expected more than 1 value per feature when using batch statistics; x has "
                f"shape {tuple(inp.x.shape)} and feature axis {self.axis!r}, giving "
                f"{inp.lay.count} value(s) per feature"
            )

    def _forward(self, x, training: bool, update_stats: bool):
        """The template (see the module docstring)."""
        if not (training or not self.track_running_stats):
            return super()._forward(x, training, update_stats)
        update = bool(training and update_stats and self.track_running_stats)

        def call() -> Call:  # built only by a distributed reducer
            label = f"{self._label()} training forward"
            return Call(label, KIND_TRAIN, training, update, args_hash(self.config()))

        red = self._sync.reducer
        y, cache, stats = red.dispatch(self._train_local, self._train_synced, call, None, x)
        with self._lock:  # read-smooth-write of the running statistics is atomic
            if update:
                self._commit_running(self._new_running(stats))
            self._commit_forward(cache, stats)
            synced = getattr(getattr(cache, "bn", cache), "synchronized", False)
            if self._state.cache is cache and synced:
                self._sync.forward_reducer = red  # the backward sums through the same one
        return y

    def _train_local(self, x) -> tuple:
        """The training maths of a single process: ``(y, cache, stats)``."""
        return self._forward_batch(self._inputs(x))

    def _train_synced(self, reducer, call: Call, error, x) -> tuple:
        """Every participant checks, agrees and merges together: ``(y, cache, stats)``."""
        inp, error = reducer.attempt(self._inputs, x)
        y, cache, stats = self._forward_merged(inp, reducer, call, error)
        if stats.count < 2 and not (stats.count == 0 and self.nonfinite == "skip"):
            from .._sync.protocol import DistributedError

            counts = list(getattr(stats, "counts", ()))
            raise DistributedError(
                f"{call.label}: batch statistics need at least 2 values per feature over "
                f"all ranks; the ranks hold {counts} (total {stats.count}); "
                "raised on every rank, nothing changed"
            )
        return y, cache, stats

    def _forward_batch(self, inp: Inputs) -> tuple:
        """Training maths of a single process: ``(y, cache, stats)``."""
        raise NotImplementedError

    def _forward_merged(self, inp: Inputs | None, reducer, call: Call, error) -> tuple:
        """Training maths whose local statistics go through ``reducer.merge`` (which raises
        ``error`` everywhere): ``(y, cache, stats)``."""
        raise NotImplementedError(f"{type(self).__name__} cannot synchronize its statistics")

    # ------------------------------------------------------------------ running statistics
    def _running_update(self, running: RunningStats, stats: BatchStats) -> RunningStats:
        """The layer's running update (raises NonFiniteStatisticsError or ValueError)."""
        raise NotImplementedError

    def running_stats(self) -> RunningStats:
        """Copies of the running statistics and the batch count."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} keeps no running statistics")
        st = self._state
        host = self.place.host
        return RunningStats(
            host(st.running_mean), host(st.running_var), int(st.num_batches_tracked)
        )

    def _new_running(self, stats: BatchStats) -> RunningStats | None:
        """The running statistics after ``stats``, or None to skip; raises before any change."""
        st = self._state
        running = RunningStats(st.running_mean, st.running_var, st.num_batches_tracked)
        try:
            return self._running_update(running, stats)
        except NonFiniteStatisticsError as exc:
            if self.nonfinite == "skip":
                return None
            bad = getattr(stats, "nonfinite_ranks", None)
            if bad is not None:  # merged statistics: identical on every rank
                where = (
                    f"non-finite local statistics on {'rank' if len(bad) == 1 else 'ranks'} "
                    f"{bad[0] if len(bad) == 1 else list(bad)}"
                    if bad
                    else "the merged statistics overflowed"
                )
                raise NonFiniteStatisticsError(
                    f"{self._label()} training forward: {where} (raised on every rank): {exc}"
                ) from None
            raise NonFiniteStatisticsError(
                f"{exc}; running statistics left unchanged. Pass nonfinite='skip' to skip such "
                "updates instead."
            ) from None

    def _commit_running(self, new: RunningStats | None) -> None:
        """Store the new running statistics (the caller holds the lock); None: skipped."""
        st = self._state
        if new is None:
            st.skipped_updates += 1
            return
        if self.place.xp is None:
            st.running_mean[...] = new.mean
            st.running_var[...] = new.var
        else:
            st.running_mean, st.running_var = new.mean, new.var
        st.num_batches_tracked = new.num_batches_tracked

    @contextmanager
    def recording(self) -> Iterator[list[BatchStats]]:
        """Collect the batch statistics of this thread's forwards inside the block.

        Inside the block, forwards run by the calling thread leave the layer's backward
        cache and ``last_batch_stats`` alone (running statistics still follow
        ``update_stats``), and each one that used batch statistics appends its
        :class:`BatchStats` to the yielded list. Other threads' forwards are not recorded.
        Used by :func:`batchnorm.recalibrate`.
        """
        key = threading.get_ident()
        if key in self._recorders:
            raise ValueError(f"{type(self).__name__}.recording() is already open in this thread")
        rec: list[BatchStats] = []
        self._recorders[key] = rec
        try:
            yield rec
        finally:
            del self._recorders[key]

    # ------------------------------------------------------------------ backward
    def backward(self, dy):
        """Gradient with respect to the last forward input; sets ``dgamma`` and ``dbeta``.

        In evaluation mode (running statistics) the statistics are constants. After a
        synchronized training forward the gradient sums are reduced over every participant
        (all of them must call backward).

        Parameters
        ----------
        dy : array, same shape and library as the last forward input

        Returns
        -------
        dx : array, same shape and dtype as the last forward input
        """
        cache = self._need_cache(self._state.cache)
        dx, dgamma, dbeta = self._backward(dy, cache)
        bn = getattr(cache, "bn", cache)
        st = self._state
        st.gradients_reduced = bool(getattr(bn, "synchronized", False))
        if self.affine:
            st.dgamma, st.dbeta = self._param_dtype(dgamma), self._param_dtype(dbeta)
        return dx

    def _param_dtype(self, v):
        if isinstance(v, np.ndarray):
            return v.astype(self.dtype, copy=False)
        return _xp.astype_like(v, self._state.gamma)

    def _backward(self, dy, cache) -> tuple:
        """``(dx, dgamma, dbeta)``: check ``dy`` once, gradient sums, ``reducer.sum`` (after
        a synchronized forward), input gradient."""
        red = self._sync.backward_reducer() if getattr(cache, "synchronized", False) else LOCAL
        call = lambda: Call(f"{self._label()} backward", KIND_BACKWARD)  # noqa: E731
        return red.dispatch(self._backward_local, self._backward_synced, call, None, dy, cache)

    def _backward_local(self, dy, cache) -> tuple:
        from .._compose import backward_local, check_backward

        dy, _ = check_backward(dy, cache, None)
        return backward_local(dy, cache, self.backend, self._dx_buffer(cache, dy))

    def _backward_synced(self, red, call: Call, error, dy, cache) -> tuple:
        from .._compose import backward_synced

        args, error = red.attempt(self._backward_args, dy, cache)
        dy, out = args if args is not None else (dy, None)
        return backward_synced(red, call, error, dy, cache, self.backend, out)

    def _backward_args(self, dy, cache) -> tuple:
        """``(dy, dx buffer)`` after the one check of ``dy`` against the forward's cache."""
        from .._compose import check_backward

        dy, _ = check_backward(dy, cache, None)
        return dy, self._dx_buffer(cache, dy)

    def _dx_buffer(self, cache, dy):
        """Where ``dx`` goes (None: a fresh array); :class:`BatchNorm` reuses buffers."""
        return None

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict:
        """Learnable parameters by name (the arrays themselves, for in-place updates)."""
        st = self._state
        return {"gamma": st.gamma, "beta": st.beta} if self.affine else {}

    def gradients(self) -> dict:
        """Gradients of :meth:`parameters` from the last backward pass."""
        st = self._state
        return {"gamma": st.dgamma, "beta": st.dbeta} if self.affine else {}
