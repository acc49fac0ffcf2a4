r"""The base of the stateful norm layers: modes, parameters, one forward and one backward
template, the atomic commit of the running statistics.

In training mode a layer normalizes with batch statistics and updates its running
statistics by exponential smoothing,

.. math::

    \text{running} \leftarrow (1-w)\,\text{running} + w\,\text{batch},

with the weight ``w`` of the new value read from ``momentum`` in the direction of the chosen
convention (:func:`batchnorm.conventions.update_running`, the one place this happens). In
evaluation mode it normalizes with the running statistics and changes no state.

The forward template (:meth:`NormLayer.forward`): check the input once, the subclass's
batch maths (local statistics, ``reducer.merge``, the output), then the running update and
the commit under the lock. A rejected call leaves the layer exactly as it was, on every
participant; no non-finite value ever reaches the running statistics. Synchronization is a
reducer object the layer holds (:attr:`NormLayer.reducer`): the single-process
:class:`~batchnorm.core.reduce.LocalReducer`, or the MPI one (``comm=``).

Threads: the update of the running statistics (read, smooth, write, count) is atomic, so
training forwards from several threads never lose an update. The backward pass uses the
last forward's cache, so a forward/backward pair belongs to one thread.

Arrays: a layer keeps its state in one array namespace and on one device: NumPy by
default; a layer that has not run yet moves its state to the namespace and device of its
first batch (or explicitly with :meth:`NormLayer.to`); afterwards an input of another
library or device is refused with an error naming both.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from .. import _xp
from .._compose import Inputs
from .._validation import SUPPORTED_DTYPES, as_input, check_axis, check_eps, layout
from ..backends import check_backend, select
from ..conventions import (
    BatchStats,
    check_momentum,
    convention_config,
    get_convention,
)
from ..core.reduce import KIND_BACKWARD, KIND_EVAL, KIND_TRAIN, LOCAL, Call
from ..module import Module
from .args import ArgumentRecord, as_feature_shape, check_dtype, check_flag, check_nonfinite
from .arrays import ArrayPlacement
from .running import RunningStatistics
from .state import StateMixin
from .sync import Synchronized

_DEFAULT: Any = object()
_SUPPORTED = frozenset(SUPPORTED_DTYPES)


class NormLayer(
    ArgumentRecord, StateMixin, Synchronized, ArrayPlacement, RunningStatistics, Module
):
    """Base of the stateful norm layers (see the module docstring).

    Subclasses implement :meth:`_forward_batch` (the training maths: it returns the
    output, a backward cache and the batch statistics) and may override
    :meth:`_forward_running`, :meth:`_backward` and :meth:`_running_update`.

    Attributes
    ----------
    feature_shape : tuple of int
    axis : int or tuple of int
    eps : float
    gamma, beta : array, shape (*features), or None
        Learnable scale and shift (None when ``affine=False``).
    running_mean, running_var : array, shape (*features), or None
        Running statistics (None when ``track_running_stats=False``).
    num_batches_tracked : int
        Training forwards that updated the running statistics.
    skipped_updates : int
        Training forwards whose update was skipped (``nonfinite="skip"``).
    last_batch_stats : BatchStats or None
        Count, mean and biased variance of the last batch normalized with batch statistics.
    dgamma, dbeta : array or None
        Gradients from the last :meth:`backward`.
    gradients_reduced : bool
        Whether ``dgamma``/``dbeta`` of the last backward are already sums over every
        participant (after a synchronized training forward); the gradient all-reduce of
        :mod:`batchnorm.distributed` leaves them alone.
    training : bool
    reducer : Reducer
        How batch statistics and gradient sums are combined across processes
        (:class:`~batchnorm.core.reduce.LocalReducer` by default).
    comm : mpi4py communicator or None
        Shorthand: setting it installs an MPI reducer over ``comm`` (None: local).
    timeout : float or None
        With ``comm``: seconds after which a rank waiting for missing ranks aborts the job.
    """

    _abstract = True
    forward_state = ("_cache", "last_batch_stats")
    #: The running statistics every layer keeps (a mean and a variance per feature).
    running_stat_names: ClassVar[tuple[str, ...]] = ("running_mean", "running_var")
    #: Whether the layer ever uses batch statistics (FrozenBatchNorm does not).
    uses_batch_stats: ClassVar[bool] = True
    #: Whether the layer can merge its batch statistics across processes (a reducer).
    synchronizable: ClassVar[bool] = True

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
        reducer: object = None,
    ) -> None:
        conv = get_convention(convention)
        fshape = as_feature_shape(num_features)
        axis = conv.axis if axis is None else check_axis(axis)
        if not isinstance(axis, int) and len(set(axis)) != len(axis):
            raise ValueError(f"axis={axis!r} names the same axis twice")
        n_axes = 1 if isinstance(axis, int) else len(axis)
        if n_axes != len(fshape):
            raise ValueError(
                f"axis={axis!r} names {n_axes} feature axes but num_features="
                f"{num_features!r} gives {len(fshape)}"
            )
        check_nonfinite(nonfinite)
        self.feature_shape = fshape
        self.convention = conv
        self.axis = axis
        self.momentum = conv.momentum if momentum is _DEFAULT else check_momentum(momentum)
        self.eps = conv.eps if eps is None else check_eps(eps)
        self.unbiased = conv.unbiased if unbiased is None else check_flag(unbiased, "unbiased")
        self.affine = check_flag(affine, "affine")
        self.track_running_stats = check_flag(track_running_stats, "track_running_stats")
        self.nonfinite = nonfinite
        self.dtype = check_dtype(dtype)
        self.backend = check_backend(backend)
        self._args: dict[str, object] = {
            "num_features": fshape,
            "convention": convention_config(conv),
            "axis": axis,
            "momentum": self.momentum,
            "eps": self.eps,
            "unbiased": self.unbiased,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "nonfinite": nonfinite,
            "dtype": self.dtype.name,
            "backend": self.backend,
        }
        self.gamma = np.ones(fshape, self.dtype) if self.affine else None
        self.beta = np.zeros(fshape, self.dtype) if self.affine else None
        self.running_mean = np.zeros(fshape, self.dtype) if self.track_running_stats else None
        self.running_var = np.ones(fshape, self.dtype) if self.track_running_stats else None
        self.num_batches_tracked = 0
        self.skipped_updates = 0
        self.last_batch_stats: BatchStats | None = None
        self.dgamma = None
        self.dbeta = None
        self.gradients_reduced = False
        self.training = True
        self._cache: object = None
        self._recorders: dict[int, list[BatchStats]] = {}
        self._lock = threading.Lock()
        self._xp = None  # the state's namespace: None is NumPy
        self._device = None
        self._placed = False  # True once the state's namespace/device is settled
        self._reducer = LOCAL
        if reducer is not None:
            if comm is not None:
                raise TypeError("pass comm= or reducer=, not both")
            self.reducer = reducer
        self._timeout = None
        self._sync_tag = 0
        self.comm = comm
        self.timeout = timeout
        self._built = True  # from here on, reassigned arguments are validated

    def _arg_validators(self) -> dict[str, Any]:
        return {
            "momentum": check_momentum,
            "eps": check_eps,
            "unbiased": lambda v: check_flag(v, "unbiased"),
            "nonfinite": check_nonfinite,
            "backend": check_backend,
        }

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_recorders"] = {}  # a copy does not inherit an open recording() block
        if state["_xp"] is not None:  # modules and device handles are not copied
            state["_xp"], state["_device"] = "placed", None
        if state["_reducer"] is not LOCAL:
            raise TypeError(
                f"a synchronized {type(self).__name__} (reducer {state['_reducer']!r}) cannot "
                "be copied; copy it with comm=None and set comm on the copy"
            )
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_reducer", LOCAL)
        if state.get("_xp") == "placed":  # namespace and device are read off the arrays
            arr = next(
                getattr(self, k)
                for k in ("gamma", *self.running_stat_names)
                if getattr(self, k) is not None
            )
            self.__dict__["_xp"] = _xp.namespace(arr)
            self.__dict__["_device"] = _xp.device(arr)

    # ------------------------------------------------------------------ input checks
    def _inputs(self, x: object) -> Inputs:
        """Validate ``x`` for this layer once: its layout and backend, the parameters."""
        if type(x) is not np.ndarray or x.dtype not in _SUPPORTED or x.ndim < 2:
            x = as_input(x)
        self._check_namespace(x)
        lay = layout(x.shape, self.axis)
        if lay.fshape != self.feature_shape:
            raise ValueError(
                f"x with shape {tuple(x.shape)} has {lay.fshape} features along axis "
                f"{self.axis!r}, but the layer was built for num_features={self.feature_shape}"
            )
        be = select(self.backend, x, lay)
        return Inputs(x, lay, be, be.param(self.gamma), be.param(self.beta), self.eps)

    def check_input(self, x: object) -> tuple[object, tuple[int, ...]]:
        """Validate ``x`` for this layer; return it as an array and its feature axes."""
        inp = self._inputs(x)
        return inp.x, inp.lay.axes

    def _check_count(self, inp: Inputs, minimum: int = 2) -> None:
        """Batch statistics need at least ``minimum`` values per feature (local check)."""
        if inp.lay.count < minimum:
            raise ValueError(
                f"expected more than 1 value per feature when using batch statistics; x has "
                f"shape {tuple(inp.x.shape)} and feature axis {self.axis!r}, giving "
                f"{inp.lay.count} value(s) per feature"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, x, *, training: bool | None = None, update_stats: bool = True):
        """Normalize ``x``; in training mode also update the running statistics.

        Parameters
        ----------
        x : array, shape (N, C, *spatial) (or the layout ``axis`` names), float16/32/64
        training : bool, optional
            Overrides the layer's mode for this call only.
        update_stats : bool
            False: a training-mode forward (batch statistics) that leaves the running
            statistics and ``num_batches_tracked`` alone, e.g. to probe activations.

        Returns
        -------
        y : array, same shape, dtype, library and device as ``x``
        """
        training = self._mode(training)
        update_stats = check_flag(update_stats, "update_stats")
        try:
            y = self._forward(x, training, update_stats)
        except BaseException:
            self._settle_placement(False)
            raise
        self._settle_placement(True)
        return y

    def _forward(self, x, training: bool, update_stats: bool):
        """The template (see :meth:`forward`)."""
        batch = self.uses_batch_stats and (training or not self.track_running_stats)
        update = bool(batch and training and update_stats and self.track_running_stats)
        red = self._reducer
        call = inp = error = None
        if red.distributed:  # every participant checks, agrees and merges together
            what = "training forward" if batch else "evaluation forward"
            kind = KIND_TRAIN if batch else KIND_EVAL
            call = Call(f"{self._label()} {what}", kind, training, update, self._args_hash())
            try:
                inp = self._inputs(x)
            except Exception as exc:  # noqa: BLE001 - every error must reach every rank
                error = exc
        else:
            inp = self._inputs(x)
        if batch:
            y, cache, stats = self._forward_batch(inp, red, call, error)
            if red.distributed:
                self._check_merged_count(stats, call)
        else:
            if red.distributed:
                red.agree(call, error, nfeat=int(np.prod(self.feature_shape)))
            y, cache = self._forward_running(inp)
            stats = None
        with self._lock:  # read-smooth-write of the running statistics is atomic
            new = self._new_running(stats, call) if update else None
            self._commit(cache, stats, new, update)
        return y

    def _forward_batch(
        self, inp: Inputs, reducer, call, error
    ) -> tuple[object, object, BatchStats]:
        """Training maths: ``(y, cache, stats)``; with a distributed ``reducer`` the local
        statistics go through ``reducer.merge(call, local, error, dtype)`` (which raises
        ``error`` on every participant)."""
        raise NotImplementedError

    def _forward_running(self, inp: Inputs) -> tuple[object, object]:
        """Evaluation mode: normalize with the running statistics (constants)."""
        from .._compose import eval_pass

        be = inp.be
        return eval_pass(inp, be.param(self.running_mean), be.param(self.running_var))

    def _check_merged_count(self, stats: BatchStats, call: Call) -> None:
        if stats.count < 2 and not (stats.count == 0 and self.nonfinite == "skip"):
            from .._sync.protocol import DistributedError

            counts = list(getattr(stats, "counts", ()))
            raise DistributedError(
                f"{call.label}: batch statistics need at least 2 values per feature over "
                f"all ranks; the ranks hold {counts} (total {stats.count}); "
                "raised on every rank, nothing changed"
            )

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
        cache = self._need_cache(self._cache)
        dx, dgamma, dbeta = self._backward(dy, cache)
        bn = getattr(cache, "bn", cache)
        d = self.__dict__  # results, not constructor arguments: no validation hook
        d["gradients_reduced"] = bool(getattr(bn, "synchronized", False))
        if self.affine:
            d["dgamma"] = self._param_dtype(dgamma)
            d["dbeta"] = self._param_dtype(dbeta)
        return dx

    def _param_dtype(self, v):
        if isinstance(v, np.ndarray):
            return v.astype(self.dtype, copy=False)
        return _xp.astype_like(v, self.gamma)

    def _backward(self, dy, cache) -> tuple:
        """``(dx, dgamma, dbeta)``: check ``dy`` once, gradient sums, ``reducer.sum`` (after
        a synchronized forward), input gradient."""
        from .._compose import backward_pass, check_backward

        red = self._reducer if getattr(cache, "synchronized", False) else LOCAL
        if not red.distributed:
            dy, out = check_backward(dy, cache, None)
            return backward_pass(dy, cache, self.backend, self._dx_buffer(cache, dy))
        call = Call(f"{self._label()} backward", KIND_BACKWARD)
        error = out = None
        try:
            dy, out = check_backward(dy, cache, None)
            out = self._dx_buffer(cache, dy)
        except Exception as exc:  # noqa: BLE001 - every error must reach every rank
            error = exc
        return backward_pass(dy, cache, self.backend, out, red, call, error)

    def _dx_buffer(self, cache, dy):
        """Where ``dx`` goes (None: a fresh array); :class:`BatchNorm` reuses buffers."""
        return None

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict:
        """Learnable parameters by name (the arrays themselves, for in-place updates)."""
        return {"gamma": self.gamma, "beta": self.beta} if self.affine else {}

    def gradients(self) -> dict:
        """Gradients of :meth:`parameters` from the last backward pass."""
        return {"gamma": self.dgamma, "beta": self.dbeta} if self.affine else {}
