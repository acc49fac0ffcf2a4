"""The running statistics of a layer: the update (one pure function of
:mod:`batchnorm.conventions`), the atomic commit, and the recording of batch statistics."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..conventions import BatchStats, NonFiniteStatisticsError, RunningStats, _update_running
from ..core.reduce import Call


class RunningStatistics:
    """Mixin: the running update, the commit of one forward, :meth:`recording`."""

    def _running_update(self, running: RunningStats, stats: BatchStats) -> RunningStats:
        """The layer's running update (raises NonFiniteStatisticsError or ValueError)."""
        # the layer's arguments were validated when set: the unchecked entry of the same maths
        return _update_running(
            running,
            stats,
            self.momentum,
            self.convention.momentum_weights,
            unbiased=self.unbiased,
        )

    def running_stats(self) -> RunningStats:
        """Copies of the running statistics and the batch count."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} keeps no running statistics")
        return RunningStats(
            self._host(self.running_mean),
            self._host(self.running_var),
            int(self.num_batches_tracked),
        )

    def _new_running(self, stats: BatchStats, call: Call | None = None) -> RunningStats | None:
        """The running statistics after ``stats``, or None to skip; raises before any change."""
        running = RunningStats(self.running_mean, self.running_var, self.num_batches_tracked)
        try:
            return self._running_update(running, stats)
        except NonFiniteStatisticsError as exc:
            if self.nonfinite == "skip":
                return None
            if call is not None:  # the merged statistics are identical on every rank
                bad = getattr(stats, "nonfinite_ranks", ())
                where = (
                    f"non-finite local statistics on {'rank' if len(bad) == 1 else 'ranks'} "
                    f"{bad[0] if len(bad) == 1 else list(bad)}"
                    if bad
                    else "the merged statistics overflowed"
                )
                raise NonFiniteStatisticsError(
                    f"{call.label}: {where} (raised on every rank): {exc}"
                ) from None
            raise NonFiniteStatisticsError(
                f"{exc}; running statistics left unchanged. Pass nonfinite='skip' to skip such "
                "updates instead."
            ) from None

    def _commit(
        self, cache: object, stats: BatchStats | None, new: RunningStats | None, update: bool
    ) -> None:
        """Every check has passed: store the results of one forward."""
        rec = self._recorders.get(threading.get_ident()) if self._recorders else None
        d = self.__dict__  # results, not constructor arguments: no validation hook
        if update:
            if new is None:
                self.skipped_updates += 1
            elif self._xp is None:
                self.running_mean[...] = new.mean
                self.running_var[...] = new.var
                d["num_batches_tracked"] = new.num_batches_tracked
            else:
                object.__setattr__(self, "running_mean", new.mean)
                object.__setattr__(self, "running_var", new.var)
                d["num_batches_tracked"] = new.num_batches_tracked
        if rec is not None:  # inside recording(): collect, leave cache and record alone
            if stats is not None:
                rec.append(stats)
            return
        if stats is not None:
            d["last_batch_stats"] = stats
        d["_cache"] = cache

    @contextmanager
    def recording(self) -> Iterator[list[BatchStats]]:
        """Collect the batch statistics of this thread's forwards inside the block.

        Inside the block, forwards run by the calling thread leave the layer's backward
        cache and ``last_batch_stats`` alone (running statistics still follow
        ``update_stats``), and each one that used batch statistics appends its
        :class:`BatchStats` to the yielded list. Other threads' forwards are not recorded
        and behave as usual. Used by :func:`batchnorm.recalibrate`.
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
