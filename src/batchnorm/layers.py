r"""The stateful norm layers: one small base, and :class:`BatchNorm`.

In training mode a layer normalizes with batch statistics and updates its running
statistics by exponential smoothing,

.. math::

    \text{running} \leftarrow (1-w)\,\text{running} + w\,\text{batch},

with the weight ``w`` of the new value read from ``momentum`` in the direction of the chosen
convention (:func:`batchnorm.conventions.update_running`, the one place this happens). In
evaluation mode it normalizes with the running statistics and changes no state.

:class:`NormLayer` holds everything the layers share: modes, parameters, the declared
running-statistic names, ``state_dict``/``load_state_dict``/``save``/``load``, ``config``
and ``repr`` built from one record of the constructor arguments, the public record of the
last training batch's statistics, and the validate-then-commit discipline: every call
checks first and commits last, so a rejected call leaves the layer exactly as it was, and no
non-finite value ever reaches the running statistics. The siblings (:class:`BatchNorm`,
:class:`batchnorm.BatchRenorm`, :class:`batchnorm.GhostBatchNorm`,
:class:`batchnorm.FrozenBatchNorm`) add only their maths.

Threads: the update of the running statistics (read, smooth, write, count) is atomic, so
training forwards from several threads never lose an update. The backward pass uses the
last forward's cache, so a forward/backward pair belongs to one thread.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import numpy as np

from . import checkpoint, distributed
from .backends import check_backend
from ._validation import (
    SUPPORTED_DTYPES,
    as_float_array,
    as_input,
    check_axis,
    check_count,
    check_eps,
    check_real,
    feature_shape,
    normalize_axes,
    reduce_axes,
)
from .checkpoint import check_state_dict
from .conventions import (
    BatchStats,
    NonFiniteStatisticsError,
    RunningStats,
    _update_running,
    check_momentum,
    convention_config,
    get_convention,
)
from .functional import (
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    eval_checked,
    train_checked,
)
from .module import Module

__all__ = ["BatchNorm", "NormLayer"]

_DEFAULT: Any = object()
# Validated layouts: (shape, dtype, axis, feature_shape) -> (feature axes, values per feature).
_LAYOUTS: dict[tuple, tuple[tuple[int, ...], int]] = {}
_LAYER_CLASSES: dict[str, type[NormLayer]] = {}


def as_feature_shape(num_features: object) -> tuple[int, ...]:
    """``num_features`` (a positive int or a non-empty sequence of them) as a shape tuple.

    At most ``checkpoint.MAX_FEATURES`` features in all (a larger layer is refused before
    anything is allocated).
    """
    if isinstance(num_features, (list, tuple)):
        if not num_features:
            raise ValueError("num_features must name at least one feature size; got ()")
        shape = tuple(check_count(n, "num_features") for n in num_features)
    else:
        shape = (check_count(num_features, "num_features"),)
    if math.prod(shape) > checkpoint.MAX_FEATURES:
        raise ValueError(
            f"num_features={num_features!r} gives {math.prod(shape)} features; at most "
            f"{checkpoint.MAX_FEATURES} are supported"
        )
    return shape


def check_dtype(dtype: object) -> np.dtype:
    """A parameter dtype: float16, float32 or float64 (any byte order, stored native)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float16, float32 or float64; got {dtype!r}") from exc
    if dt.kind == "f" and not dt.isnative:
        dt = dt.newbyteorder("=")
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float16, float32 or float64; got {dt} ({dtype!r})")
    return dt


def check_flag(value: object, name: str) -> bool:
    """A bool (Python or NumPy); strings such as "False" and numbers are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def _check_nonfinite(value: object) -> str:
    if value not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip'; got {value!r}")
    return str(value)


def _json_value(v: object) -> object:
    if isinstance(v, tuple):
        return [_json_value(i) for i in v]
    if isinstance(v, np.dtype):
        return v.name
    return v


class NormLayer(Module):
    """Base of the stateful norm layers (see the module docstring).

    Subclasses implement :meth:`_forward_batch` (the training maths; it returns the
    output, a backward cache and the batch statistics) and may override
    :meth:`_forward_running`, :meth:`_backward` and :meth:`_running_update`.

    Attributes
    ----------
    feature_shape : tuple of int
    axis : int or tuple of int
    eps : float
    gamma, beta : ndarray, shape (*features), or None
        Learnable scale and shift (None when ``affine=False``).
    running_mean, running_var : ndarray, shape (*features), or None
        Running statistics (None when ``track_running_stats=False``).
    num_batches_tracked : int
        Training forwards that updated the running statistics.
    skipped_updates : int
        Training forwards whose update was skipped (``nonfinite="skip"``).
    last_batch_stats : BatchStats or None
        Count, mean and biased variance of the last batch normalized with batch statistics.
    dgamma, dbeta : ndarray or None
        Gradients from the last :meth:`backward`.
    training : bool
    comm : mpi4py communicator or None
        Synchronized batch norm: training statistics over every rank of ``comm``
        (:mod:`batchnorm.distributed`); None (default) is a single process.
    timeout : float or None
        With ``comm``: seconds after which a rank waiting for missing ranks aborts the job.
    """

    #: The running statistics every layer keeps (a mean and a variance per feature).
    running_stat_names: ClassVar[tuple[str, ...]] = ("running_mean", "running_var")
    #: Whether the layer ever uses batch statistics (FrozenBatchNorm does not).
    uses_batch_stats: ClassVar[bool] = True
    #: Whether the layer can merge its batch statistics across ranks (``comm``).
    synchronizable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _LAYER_CLASSES[cls.__name__] = cls

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
    ) -> None:
        conv = get_convention(convention)
        fshape = as_feature_shape(num_features)
        axis = conv.axis if axis is None else check_axis(axis)
        n_axes = 1 if isinstance(axis, int) else len(axis)
        if n_axes != len(fshape):
            raise ValueError(
                f"axis={axis!r} names {n_axes} feature axes but num_features="
                f"{num_features!r} gives {len(fshape)}"
            )
        _check_nonfinite(nonfinite)
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
        self.dgamma: np.ndarray | None = None
        self.dbeta: np.ndarray | None = None
        self.training = True
        self._cache: object = None
        self._recorders: dict[int, list[BatchStats]] = {}
        self._lock = threading.Lock()
        self.comm = comm
        self.timeout = timeout
        self._built = True  # from here on, reassigned arguments are validated

    @property
    def comm(self) -> object:
        """The communicator the batch statistics are merged over (None: this process only)."""
        return self._comm

    @comm.setter
    def comm(self, value: object) -> None:
        if value is not None and not self.synchronizable:
            raise ValueError(f"{type(self).__name__} cannot synchronize its statistics (comm=)")
        self._comm = distributed._check_comm(value)

    @property
    def timeout(self) -> float | None:
        """Seconds a synchronized call waits for missing ranks before aborting (None: never)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        if value is not None and (check_real(value, "timeout") <= 0):
            raise ValueError(f"timeout must be > 0 seconds or None; got {value!r}")
        self._timeout = None if value is None else float(value)

    # ------------------------------------------------------------------ arguments
    def _arg_validators(self) -> dict[str, Any]:
        """Constructor arguments that may be reassigned later, with their validators.

        Every other recorded argument (features, axis, dtype, affine, ...) is fixed at
        construction. Subclasses add their own (e.g. ``virtual_batch_size``).
        """
        return {
            "momentum": check_momentum,
            "eps": check_eps,
            "unbiased": lambda v: check_flag(v, "unbiased"),
            "nonfinite": _check_nonfinite,
            "backend": check_backend,
        }

    def __setattr__(self, name: str, value: object) -> None:
        # Reassigning a constructor argument validates it and updates the record behind
        # config(), repr() and save(), so a rebuilt layer behaves like this one.
        args = self.__dict__.get("_args")
        if args is not None and name in args and self.__dict__.get("_built", False):
            validate = self._arg_validators().get(name)
            if validate is None:
                raise AttributeError(
                    f"{type(self).__name__}.{name} is fixed at construction; build a new layer "
                    f"(e.g. from a modified config())"
                )
            value = validate(value)
            args[name] = value
        object.__setattr__(self, name, value)

    def _record_args(self, **extra: object) -> None:
        """Add subclass constructor arguments to the record behind config() and repr()."""
        self._args.update(extra)

    def _forget_args(self, *names: str) -> None:
        """Drop base arguments a subclass does not take (they stay as fixed attributes)."""
        for name in names:
            del self._args[name]

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_recorders"] = {}  # a copy does not inherit an open recording() block
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_lock", threading.Lock())

    # ------------------------------------------------------------------ input checks
    def check_input(self, x: object) -> tuple[np.ndarray, tuple[int, ...]]:
        """Validate ``x`` for this layer; return it as an array and its feature axes.

        The checks of a layout (shape, dtype, axes, feature sizes) run once per distinct
        layout; later calls with an ndarray of a known layout look the result up.
        """
        if type(x) is np.ndarray:
            hit = _LAYOUTS.get((x.shape, x.dtype, self.axis, self.feature_shape))
            if hit is not None:
                return x, hit[0]
        arr = as_input(x)
        axes = normalize_axes(self.axis, arr.ndim)
        got = feature_shape(arr.shape, axes)
        if got != self.feature_shape:
            raise ValueError(
                f"x with shape {arr.shape} has {got} features along axis {self.axis!r}, but "
                f"the layer was built for num_features={self.feature_shape}"
            )
        if arr is x:  # remember the layout (a converted input is checked every time)
            if len(_LAYOUTS) >= 4096:
                _LAYOUTS.clear()
            m = math.prod(arr.shape[i] for i in reduce_axes(arr.ndim, axes))
            _LAYOUTS[(arr.shape, arr.dtype, self.axis, self.feature_shape)] = (axes, m)
        return arr, axes

    def _values_per_feature(self, x: np.ndarray, axes: tuple[int, ...], minimum: int = 2) -> int:
        """Values per feature in ``x``; batch statistics need at least ``minimum``."""
        hit = _LAYOUTS.get((x.shape, x.dtype, self.axis, self.feature_shape))
        if hit is not None and hit[0] == axes:
            m = hit[1]
        else:
            m = math.prod(x.shape[i] for i in reduce_axes(x.ndim, axes))
        if m < minimum and self.comm is None:  # with comm: the global count, after the merge
            raise ValueError(
                f"expected more than 1 value per feature when using batch statistics; x has "
                f"shape {x.shape} and feature axis {self.axis!r}, giving {m} value(s) per feature"
            )
        return m

    # ------------------------------------------------------------------ forward / backward
    def forward(
        self, x: np.ndarray, *, training: bool | None = None, update_stats: bool = True
    ) -> np.ndarray:
        """Normalize ``x``; in training mode also update the running statistics.

        Parameters
        ----------
        x : ndarray, shape (N, C, *spatial) (or the layout ``axis`` names), float16/32/64
        training : bool, optional
            Overrides the layer's mode for this call only.
        update_stats : bool
            False: a training-mode forward (batch statistics) that leaves the running
            statistics and ``num_batches_tracked`` alone, e.g. to probe activations.

        Returns
        -------
        y : ndarray, same shape and dtype as ``x``
        """
        training = self._mode(training)
        update_stats = check_flag(update_stats, "update_stats")
        if self.comm is not None:  # every rank checks, agrees and merges together
            return distributed.layer_forward(self, x, training, update_stats)
        x, axes = self.check_input(x)
        if self.uses_batch_stats and (training or not self.track_running_stats):
            y, cache, stats = self._forward_batch(x, axes)
            update = training and update_stats and self.track_running_stats
        else:
            y, cache = self._forward_running(x, axes)
            stats, update = None, False
        with self._lock:  # read-smooth-write of the running statistics is atomic
            new = self._new_running(stats) if update else None
            self._commit(cache, stats, new, update)
        return y

    def _forward_batch(
        self, x: np.ndarray, axes: tuple[int, ...]
    ) -> tuple[np.ndarray, object, BatchStats]:
        raise NotImplementedError

    def _forward_running(self, x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, object]:
        """Evaluation mode: normalize with the running statistics (constants)."""
        return batch_norm_eval(
            x,
            self.gamma,
            self.beta,
            self.running_mean,
            self.running_var,
            axis=axes,
            eps=self.eps,
            return_cache=True,
            backend=self.backend,
        )

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
        """Copies of the running statistics and the batch count (None if not tracked)."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} keeps no running statistics")
        return RunningStats(
            self.running_mean.copy(), self.running_var.copy(), int(self.num_batches_tracked)
        )

    def _new_running(self, stats: BatchStats) -> RunningStats | None:
        """The running statistics after ``stats``, or None to skip; raises before any change."""
        # update_running never modifies its inputs: the live arrays need no copies here
        running = RunningStats(self.running_mean, self.running_var, self.num_batches_tracked)
        try:
            return self._running_update(running, stats)
        except NonFiniteStatisticsError as exc:
            if self.nonfinite == "skip":
                return None
            raise NonFiniteStatisticsError(
                f"{exc}; running statistics left unchanged. Pass nonfinite='skip' to skip such "
                "updates instead."
            ) from None

    def _commit(
        self, cache: object, stats: BatchStats | None, new: RunningStats | None, update: bool
    ) -> None:
        """Every check has passed: store the results of one forward."""
        rec = self._recorders.get(threading.get_ident()) if self._recorders else None
        if update:
            if new is None:
                self.skipped_updates += 1
            else:
                self.running_mean[...] = new.mean
                self.running_var[...] = new.var
                self.num_batches_tracked = new.num_batches_tracked
        if rec is not None:  # inside recording(): collect, leave cache and record alone
            if stats is not None:
                rec.append(stats)
            return
        if stats is not None:
            self.last_batch_stats = stats
        self._cache = cache

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

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient with respect to the last forward input; sets ``dgamma`` and ``dbeta``.

        In evaluation mode (running statistics) the statistics are constants.

        Parameters
        ----------
        dy : ndarray, same shape as the last forward input

        Returns
        -------
        dx : ndarray, same shape and dtype as the last forward input
        """
        cache = self._need_cache(self._cache)
        with distributed.layer_call(self, "backward"):
            dx, dgamma, dbeta = self._backward(dy, cache)
        if self.affine:
            self.dgamma = np.asarray(dgamma).astype(self.dtype, copy=False)
            self.dbeta = np.asarray(dbeta).astype(self.dtype, copy=False)
        return dx

    def _backward(self, dy: np.ndarray, cache: object) -> tuple:
        return batch_norm_backward(dy, cache, backend=self.backend)

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict[str, np.ndarray]:
        """Learnable parameters by name (the arrays themselves, for in-place updates)."""
        return {"gamma": self.gamma, "beta": self.beta} if self.affine else {}

    def gradients(self) -> dict[str, np.ndarray | None]:
        """Gradients of :meth:`parameters` from the last backward pass."""
        return {"gamma": self.dgamma, "beta": self.dbeta} if self.affine else {}

    # ------------------------------------------------------------------ state
    def state_keys(self) -> list[str]:
        """The keys of :meth:`state_dict`, in order."""
        keys = ["gamma", "beta"] if self.affine else []
        if self.track_running_stats:
            keys += [*self.running_stat_names, "num_batches_tracked"]
        return keys

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Copies of the parameters and running statistics as a plain dict."""
        return {
            key: int(self.num_batches_tracked)
            if key == "num_batches_tracked"
            else getattr(self, key).copy()
            for key in self.state_keys()
        }

    def _check_state(self, new: dict) -> None:
        """Layer-specific checks of a validated state (override to add some)."""

    def check_state(self, state: dict) -> dict:
        """Validate ``state`` for :meth:`load_state_dict` without changing anything.

        Returns
        -------
        dict
            The values :meth:`load_state_dict` would store (converted to the layer's dtype).
        """
        new = check_state_dict(
            state, self.state_keys(), self.feature_shape, self.dtype, nonnegative=("running_var",)
        )
        self._check_state(new)
        return new

    def load_state_dict(self, state: dict) -> NormLayer:
        """Replace parameters and running statistics; all-or-nothing.

        Checks that the keys are exactly those of :meth:`state_dict`, that arrays have the
        layer's per-feature shape and a floating dtype and are finite (also in the layer's
        dtype), that the running variance is >= 0 and that ``num_batches_tracked`` is a
        non-negative integer. On any failure the layer is unchanged.
        """
        new = self.check_state(state)
        with self._lock:
            for key, value in new.items():
                if key == "num_batches_tracked":
                    self.num_batches_tracked = value
                else:
                    getattr(self, key)[...] = value
        return self

    def config(self) -> dict:
        """The constructor arguments (and the class name), as JSON-friendly values."""
        return {"class": type(self).__name__, **{k: _json_value(v) for k, v in self._args.items()}}

    @classmethod
    def from_config(cls, config: dict) -> NormLayer:
        """Build a layer from :meth:`config` (the class is looked up by its name)."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict; got {type(config).__name__}")
        args = dict(config)
        name = args.pop("class", cls.__name__)
        target = _LAYER_CLASSES.get(name) if isinstance(name, str) else None
        if target is None:
            raise ValueError(
                f"unknown layer class {name!r}; expected one of {sorted(_LAYER_CLASSES)}"
            )
        if not issubclass(target, cls):
            raise ValueError(f"the config describes a {name}, which is not a {cls.__name__}")
        for key in ("num_features", "axis"):
            if isinstance(args.get(key), list):
                args[key] = tuple(args[key])
        try:
            return target(**args)
        except TypeError as exc:
            raise ValueError(f"config does not fit {name}: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the state and configuration atomically: ``.safetensors`` by suffix, else npz."""
        checkpoint.save_state(path, self.state_dict(), meta={"batchnorm": self.config()})

    def load(self, path: str | os.PathLike) -> NormLayer:
        """Load state written by :meth:`save`; validated like :meth:`load_state_dict`."""
        state, _ = checkpoint.load_state(path)
        return self.load_state_dict(state)

    def __repr__(self) -> str:
        parts = []
        for key, value in self._args.items():
            if key == "num_features":
                parts.append(repr(value[0] if len(value) == 1 else value))
            elif isinstance(value, float):
                parts.append(f"{key}={value:g}")
            else:
                parts.append(f"{key}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)}, training={self.training})"


class BatchNorm(NormLayer):
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
        Kernels to run (see :func:`batchnorm.batch_norm_train`).
    comm : mpi4py communicator, optional
        Synchronized batch norm over the ranks of ``comm`` (see :mod:`batchnorm.distributed`).
    timeout : float, optional
        With ``comm``: abort the job when ranks are missing for this many seconds.
    reuse_buffers : bool
        Write every output (``y`` of :meth:`forward`, ``dx`` of :meth:`backward`) into one
        array per role kept by the layer instead of a fresh one, so a training loop stops
        allocating (and page-faulting) a new array per call. The returned array is then
        **overwritten by the next call** (also by a call that raises): copy it if you need
        it longer. A new input shape or dtype gets a new buffer. Each thread gets its own
        buffers, so threads sharing a layer never overwrite each other's outputs.
    """

    def __init__(
        self, num_features: int | Sequence[int], *, reuse_buffers: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(num_features, **kwargs)
        if not isinstance(reuse_buffers, (bool, np.bool_)):
            raise TypeError(f"reuse_buffers must be True or False; got {reuse_buffers!r}")
        self.reuse_buffers = bool(reuse_buffers)
        if self.reuse_buffers:  # recorded only when set, so default configs stay as they were
            self._record_args(reuse_buffers=True)
        # one buffer per role and thread: threads sharing a layer never write into each
        # other's outputs
        self._buffers: dict[tuple[str, int], np.ndarray] = {}

    def _buffer(self, role: str, like: np.ndarray) -> np.ndarray | None:
        """The reusable output array for ``role`` ("y" or "dx"), or None when not reusing."""
        if not self.reuse_buffers:
            return None
        key = (role, threading.get_ident())
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._buffers[key] = np.empty(like.shape, like.dtype)
        elif np.may_share_memory(buf, like):  # the caller fed a returned buffer back in
            buf = self._buffers[key] = np.empty(like.shape, like.dtype)
        return buf

    def _forward_batch(self, x, axes):
        m = self._values_per_feature(x, axes)
        if self.comm is not None:  # statistics merged over the ranks; the global count
            y, cache = batch_norm_train(
                x,
                self.gamma,
                self.beta,
                axis=axes,
                eps=self.eps,
                backend=self.backend,
                out=self._buffer("y", x),
                comm=self.comm,
            )
            return y, cache, BatchStats(cache.count, cache.mean, cache.var)
        y, cache = train_checked(
            x,
            axes,
            _as_f64(self.gamma),
            _as_f64(self.beta),
            self.eps,
            self.backend,
            self._buffer("y", x),
        )
        return y, cache, BatchStats(m, cache.mean, cache.var)

    def _forward_running(self, x, axes):
        return eval_checked(
            x,
            axes,
            _as_f64(self.gamma),
            _as_f64(self.beta),
            _as_f64(self.running_mean),
            _as_f64(self.running_var),
            self.eps,
            self.backend,
            self._buffer("y", x),
            True,
        )

    def _backward(self, dy, cache):
        if not self.reuse_buffers:
            return batch_norm_backward(dy, cache, backend=self.backend)
        dy = as_float_array(dy, "dy")
        out = self._buffer("dx", cache.x)
        if np.may_share_memory(out, dy):
            out = self._buffers[("dx", threading.get_ident())] = np.empty_like(out)
        return batch_norm_backward(dy, cache, backend=self.backend, out=out)


def _as_f64(v: np.ndarray | None) -> np.ndarray | None:
    """A per-feature parameter as float64 (the array itself when it already is)."""
    return None if v is None else v.astype(np.float64, copy=False)
