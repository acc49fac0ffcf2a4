"""Reducers: how statistics and gradient sums of one call are combined across participants.

A norm layer (or a functional call) never talks to other processes itself; it holds a
reducer and hands it what it computed locally. The protocol, for every synchronized step:

1. every participant does its local work through :func:`attempt` (``value, error =
   attempt(reducer, fn, *args)``): the single-process reducer raises an error at once,
   a distributed one hands it back instead of raising it; a call with a fused
   single-process pass hands both of its implementations to :meth:`Reducer.dispatch`,
   which runs the one the reducer needs (the single-process reducer the fused pass, a
   distributed one the pass that merges in between);
2. :meth:`Reducer.agree` (or :meth:`Reducer.merge` / :meth:`Reducer.sum`, which agree
   first) with that error: if any participant failed, or they disagree about the call,
   the same error is raised on every participant before any data moves;
3. otherwise the O(C) payload is combined in participant order, so every participant gets
   bit-identical results.

So no caller catches errors or asks whether it is distributed: agreeing on an error is
the reducer's business. The :class:`Call` record a distributed reducer sends may be given
as a function that builds it (:func:`resolve`): the single-process reducer never builds
it. :class:`LocalReducer` is the single-process reducer (an error is simply raised). The
MPI reducer lives in :mod:`batchnorm._sync`; framework reducers (torch.distributed) derive
from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from .stats import BatchStats

__all__ = [
    "KIND_NAMES",
    "LOCAL",
    "Call",
    "LocalReducer",
    "Reducer",
    "SyncBatchStats",
    "attempt",
    "check_reducer",
    "resolve",
]

T = TypeVar("T")

KIND_TRAIN, KIND_EVAL, KIND_BACKWARD, KIND_MOMENTS, KIND_RECAL, KIND_GRADS = 1, 2, 3, 4, 5, 6
KIND_METRICS, KIND_BCAST = 7, 8
KIND_NAMES = {
    KIND_TRAIN: "a training forward (batch statistics)",
    KIND_EVAL: "an evaluation forward (running statistics)",
    KIND_BACKWARD: "a backward pass",
    KIND_MOMENTS: "moments()",
    KIND_RECAL: "recalibrate()",
    KIND_GRADS: "allreduce_gradients()",
    KIND_METRICS: "gather_metrics()",
    KIND_BCAST: "broadcast_parameters()",
}


@dataclass(frozen=True)
class Call:
    """What one synchronized call tells the other participants about itself.

    Attributes
    ----------
    label : str
        Names the call in error messages ("BatchNorm(3,) training forward"); participants
        whose labels' first words differ are in different layers or functions.
    kind : int
        One of the ``KIND_*`` constants.
    training, update : bool
        The mode of a forward, and whether it updates the running statistics.
    args : int
        A hash of the arguments every participant must share (a layer's eps, momentum,
        convention, ...); 0 when the call has none.
    """

    label: str
    kind: int
    training: bool = True
    update: bool = False
    args: int = 0


@dataclass(frozen=True, eq=False)
class SyncBatchStats(BatchStats):
    """Merged statistics of a batch split over participants (``count``, ``mean``, ``var``:
    global).

    Attributes
    ----------
    counts : tuple of int
        Values per feature on each participant, in order.
    nonfinite_ranks : tuple of int
        Participants whose local statistics were not finite.
    """

    counts: tuple[int, ...] = ()
    nonfinite_ranks: tuple[int, ...] = ()


@runtime_checkable
class Reducer(Protocol):
    """The operations a cross-process reducer provides (see the module docstring).

    ``call`` arguments are a :class:`Call` or a function without arguments returning one.
    """

    #: False for the single-process reducer (read only by the reducers and the checks of
    #: a reducer assignment; callers use :meth:`dispatch`).
    distributed: bool

    def attempt(
        self, fn: Callable[..., T], /, *args, **kwargs
    ) -> tuple[T | None, BaseException | None]:
        """This participant's local step: ``(fn(*args, **kwargs), None)``; an error is
        raised at once (single process) or returned as ``(None, error)``."""

    def dispatch(
        self, local: Callable[..., T], synchronized: Callable[..., T], call, error, /, *args
    ) -> T:
        """``local(*args)`` for the single process (``error`` raised), else
        ``synchronized(self, call, error, *args)`` with ``call`` built."""

    def agree(self, call: Call, error: BaseException | None, **fields: int) -> object:
        """Raise on every participant if any failed or the participants disagree."""

    def merge(
        self, call: Call, local: BatchStats | None, error: BaseException | None, dtype: object
    ) -> SyncBatchStats:
        """Agree, then the statistics of the union of every participant's batch."""

    def sum(self, call: Call, arrays: list, error: BaseException | None = None) -> list:
        """Agree, then the elementwise sums over participants of per-feature arrays."""

    def gather(
        self, call: Call, vector: object, error: BaseException | None = None, **fields: int
    ) -> tuple[list[int], list]:
        """Agree, then every participant's ``count`` field and 1-D float64 ``vector``."""


_MEMBERS = ("distributed", "attempt", "dispatch", "agree", "merge", "sum", "gather")


def check_reducer(value: object) -> Reducer:
    """``value`` when it implements :class:`Reducer`; else a TypeError naming what it lacks
    (a reducer written for the earlier four-method protocol lacks ``attempt`` and
    ``dispatch``: derive it from :class:`LocalReducer` or implement them as documented)."""
    if isinstance(value, Reducer) and not isinstance(value, type):
        return value
    missing = [m for m in _MEMBERS if not hasattr(value, m)]
    raise TypeError(
        f"reducer must implement batchnorm.core.reduce.Reducer; {value!r} lacks "
        f"{', '.join(missing) or 'nothing, but is a class: pass an instance'}"
    )


class LocalReducer:
    """The reducer of a single process: local results are already global.

    An error is raised as it is (there is nobody to tell); :meth:`merge` returns the local
    statistics, :meth:`sum` the arrays themselves.
    """

    distributed = False
    comm = None
    timeout = None

    def attempt(self, fn: Callable[..., T], /, *args, **kwargs) -> tuple[T | None, object]:
        """``(fn(*args, **kwargs), None)``; an error is raised at once. A subclass that
        sets ``distributed = True`` gets ``(None, error)`` instead (:func:`collect`), for
        its own :meth:`agree` / :meth:`merge` / :meth:`sum` to raise everywhere."""
        if self.distributed:
            return collect(fn, *args, **kwargs)
        return fn(*args, **kwargs), None

    def dispatch(self, local: Callable[..., T], synchronized, call, error, /, *args) -> T:
        """``local(*args)``: the fused single-process pass (``error`` raised; ``call`` and
        ``synchronized`` unused). A subclass that sets ``distributed = True`` (and
        overrides :meth:`merge` and the others) gets ``synchronized(self, call, error,
        *args)`` with ``call`` built: the pass that merges through its methods."""
        if self.distributed:
            return synchronized(self, resolve(call), error, *args)
        if error is not None:
            raise error
        return local(*args)

    def agree(self, call: Call, error: BaseException | None, **fields: int) -> None:
        """Raise ``error`` if there is one (nothing to agree on)."""
        if error is not None:
            raise error

    def merge(
        self, call: Call, local: BatchStats | None, error: BaseException | None, dtype: object
    ) -> SyncBatchStats:
        """``local`` as merged statistics of one participant."""
        if error is not None:
            raise error
        return SyncBatchStats(local.count, local.mean, local.var, (local.count,), ())

    def sum(self, call: Call, arrays: list, error: BaseException | None = None) -> list:
        """The arrays themselves."""
        if error is not None:
            raise error
        return list(arrays)

    def gather(
        self, call: Call, vector: object, error: BaseException | None = None, **fields: int
    ) -> tuple[list[int], list]:
        """``([count], [vector])``."""
        if error is not None:
            raise error
        return [int(fields.get("count", 0))], [vector]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def collect(fn: Callable[..., T], /, *args, **kwargs) -> tuple[T | None, BaseException | None]:
    """``(fn(*args, **kwargs), None)``, or ``(None, error)`` when it raised: a distributed
    reducer's :func:`attempt` (the error then travels to every participant)."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - every error must reach every participant
        return None, exc


def attempt(
    reducer: Reducer, fn: Callable[..., T], /, *args, **kwargs
) -> tuple[T | None, BaseException | None]:
    """This participant's local step of a collective call: ``(value, None)``, or with a
    distributed reducer ``(None, error)`` when ``fn`` failed, for ``reducer.merge`` /
    ``sum`` / ``agree`` to raise on every participant (``reducer.attempt``)."""
    if reducer is LOCAL:  # the common case, without a lookup
        return fn(*args, **kwargs), None
    return reducer.attempt(fn, *args, **kwargs)


def resolve(call: Call | Callable[[], Call]) -> Call:
    """The :class:`Call` record itself (a distributed reducer builds a lazy one here)."""
    return call if isinstance(call, Call) else call()


#: The shared single-process reducer (it holds no state).
LOCAL = LocalReducer()
