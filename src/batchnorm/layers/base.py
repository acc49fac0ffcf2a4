r"""The small base every norm layer shares: arguments, state and placement as records the
layer owns, the evaluation forward, the input gradient, state dicts and files.

Every layer normalizes per feature with a mean and a variance,

.. math::

    y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta;

in evaluation mode :math:`\mu, \sigma^2` are the running statistics (constants). The layers
that differ in how they get their statistics are siblings: ``BatchStatsLayer``
(``batchnorm.layers.training``) adds training with batch statistics, the running update, learnable
parameters and synchronization, for :class:`~batchnorm.BatchNorm`,
:class:`~batchnorm.GhostBatchNorm` and :class:`~batchnorm.BatchRenorm`;
:class:`~batchnorm.FrozenBatchNorm` uses only what this base promises.

What a layer owns:

* ``_args``: an ``Arguments`` record of its constructor arguments; each is an
  attribute validated like the constructor argument when assigned, or fixed (read-only);
* ``_state``: a ``LayerState`` record (parameters, running statistics,
  counters, mode, the last forward's cache); its public attributes validate what is assigned
  (``layer.running_var = -1`` is refused) or are read-only results;
* ``place``: a ``Placement`` record of the namespace and device of its arrays.

A rejected call leaves the layer exactly as it was.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from .._compose import Inputs, eval_pass
from .._validation import SUPPORTED_DTYPES, as_input, check_eps
from ..backends import check_backend, plan
from ..core.reduce import KIND_EVAL, Call
from ..module import Module
from . import state as state_io
from .args import Argument, Arguments, Constant, build, by_value, config_name
from .arrays import Placement
from .checks import as_feature_shape, check_dtype, check_flag, feature_axis
from .state import LayerState, ReadOnly, StateArray, StateCount, StateFlag
from .sync import Sync, args_hash

_SUPPORTED = frozenset(SUPPORTED_DTYPES)


class NormLayer(Module):
    """Base of the norm layers (see the module docstring); not built directly.

    Attributes
    ----------
    feature_shape : tuple of int
        Read-only.
    axis : int or tuple of int
        Read-only.
    eps : float
    dtype : numpy.dtype
        Read-only: the dtype of the parameters and running statistics.
    affine, track_running_stats : bool
        Read-only.
    backend : {"auto", "numpy", "numba"}
    gamma, beta : array, shape (*features), or None
    running_mean, running_var : array, shape (*features), or None
    num_batches_tracked : int
    training : bool
    place : Placement
        The namespace and device of the layer's arrays.
    """

    forward_state = Constant(("_cache", "last_batch_stats"), "What a forward leaves for backward.")
    running_stat_names = Constant(("running_mean", "running_var"), "The running statistics.")
    uses_batch_stats = Constant(False, "Whether the layer ever uses batch statistics.")
    synchronizable = Constant(False, "Whether the layer can merge statistics across processes.")

    axis = Argument(doc="Feature axis (fixed).")
    eps = Argument(by_value(check_eps), doc="Added to the variance.")
    affine = Argument(doc="Whether the layer has gamma and beta (fixed).")
    dtype = Argument(doc="Dtype of the parameters and running statistics (fixed).")
    backend = Argument(by_value(check_backend), doc="Kernels for NumPy arrays.")
    gamma = StateArray()
    beta = StateArray()
    running_mean = StateArray()
    running_var = StateArray()
    num_batches_tracked = StateCount()
    training = StateFlag()
    last_batch_stats = ReadOnly()

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        axis: int | Sequence[int],
        eps: float,
        affine: bool,
        dtype: object,
        backend: str,
        track_running_stats: bool,
    ) -> None:
        fshape = as_feature_shape(num_features)
        axis = feature_axis(axis, fshape, num_features)
        eps, dtype = check_eps(eps), check_dtype(dtype)
        affine = check_flag(affine, "affine")
        tracking = check_flag(track_running_stats, "track_running_stats")
        self._args = Arguments()
        self._args.add("num_features", fshape)
        self._args.add("axis", axis)
        self._args.add("eps", eps)
        self._args.add("affine", affine)
        self._args.add("dtype", dtype)
        self._args.add("backend", check_backend(backend))
        self._tracking = tracking
        self._state = LayerState(
            gamma=np.ones(fshape, dtype) if affine else None,
            beta=np.zeros(fshape, dtype) if affine else None,
            running_mean=np.zeros(fshape, dtype) if tracking else None,
            running_var=np.ones(fshape, dtype) if tracking else None,
        )
        self._place = Placement()
        self._sync = Sync(type(self).__name__, self.synchronizable)
        self._lock = threading.Lock()
        self._recorders: dict[int, list] = {}

    # ------------------------------------------------------------------ read-only facts
    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The per-feature shape (fixed at construction)."""
        return self._args["num_features"]

    @property
    def track_running_stats(self) -> bool:
        """Whether the layer keeps running statistics (fixed at construction)."""
        return self._tracking

    @property
    def place(self) -> Placement:
        """The namespace and device of the layer's arrays (read-only; move with :meth:`to`)."""
        return self._place

    @property
    def _cache(self) -> object:
        """What the last forward left for :meth:`backward`."""
        return self._state.cache

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict:
        out = self.__dict__.copy()
        del out["_lock"]
        out["_recorders"] = {}  # a copy does not inherit an open recording() block
        return out

    def __setstate__(self, saved: dict) -> None:
        self.__dict__.update(saved)
        self._lock = threading.Lock()
        if getattr(self.place, "moved", False):  # namespace and device read off the arrays
            arrays = self._state.arrays().values()
            self.place.adopt(next(a for a in arrays if a is not None))

    def save_forward_state(self) -> dict:
        """What the last forward left for :meth:`backward`."""
        return {"_cache": self._state.cache, "last_batch_stats": self._state.last_batch_stats}

    def restore_forward_state(self, saved: dict) -> None:
        """Put back what :meth:`save_forward_state` returned."""
        self._state.cache = saved.get("_cache")
        self._state.last_batch_stats = saved.get("last_batch_stats")

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """The constructor arguments (and the class name), as JSON-friendly values."""
        return {"class": config_name(type(self)), **self._args.config()}

    @classmethod
    def from_config(cls, config: dict) -> NormLayer:
        """Build a layer from :meth:`config`: only a class the library (or
        :func:`~batchnorm.layers.register_layer`) registered, and a subclass of ``cls``."""
        return build(cls, config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._args.describe()}, training={self.training})"

    # ------------------------------------------------------------------ arrays
    def host(self, name: str) -> np.ndarray | None:
        """A NumPy copy of the layer's array ``name`` ("gamma", "running_mean", ...), in the
        layer's dtype, wherever the layer keeps it (None for an absent array)."""
        if name not in self._state.arrays():
            raise AttributeError(f"{type(self).__name__} has no array {name!r}")
        v = getattr(self._state, name)
        return None if v is None else self.place.host(v)

    def to(self, like: object, device: object = None) -> NormLayer:
        """Move the state to the namespace (and device) of the array ``like``, or to a
        namespace module with ``device``; returns self."""
        with self._lock:
            moved = self.place.move(self._state.arrays(), like, device, self.dtype)
            for key, value in moved.items():
                setattr(self._state, key, value)
            self._state.cache = None
        return self

    def _check_namespace(self, x: object) -> None:
        """``x`` must be in the layer's namespace and device (a fresh layer moves to it)."""
        if not self.place.check(x, type(self).__name__, self._state.fresh()):
            self.place.undo = {**self._state.arrays(), "cache": self._state.cache}
            self.to(x)

    # ------------------------------------------------------------------ input checks
    def _inputs(self, x: object) -> Inputs:
        """Validate ``x`` for this layer once: its layout and backend, the parameters."""
        if type(x) is not np.ndarray or x.dtype not in _SUPPORTED or x.ndim < 2:
            x = as_input(x)
        self._check_namespace(x)
        p = plan(self.backend, x, self.axis)
        lay = p.layout
        if lay.fshape != self.feature_shape:
            raise ValueError(
                f"x with shape {tuple(x.shape)} has {lay.fshape} features along axis "
                f"{self.axis!r}, but the layer was built for num_features={self.feature_shape}"
            )
        be, st = p.backend, self._state
        return Inputs(x, lay, be, be.param(st.gamma), be.param(st.beta), self.eps)

    def check_input(self, x: object) -> tuple[object, tuple[int, ...]]:
        """Validate ``x`` for this layer; return it as an array and its feature axes."""
        inp = self._inputs(x)
        return inp.x, inp.lay.axes

    # ------------------------------------------------------------------ forward
    def forward(self, x, *, training: bool | None = None, update_stats: bool = True):
        """Normalize ``x``.

        Parameters
        ----------
        x : array, shape (N, C, *spatial) (or the layout ``axis`` names), float16/32/64
        training : bool, optional
            Overrides the layer's mode for this call only.
        update_stats : bool
            False: a training-mode forward that leaves the running statistics alone.

        Returns
        -------
        y : array, same shape, dtype, library and device as ``x``
        """
        training = self._mode(training)
        update_stats = check_flag(update_stats, "update_stats")
        try:
            y = self._forward(x, training, update_stats)
        except BaseException:
            self.place.settle(False, self._state)
            raise
        self.place.settle(True, self._state)
        return y

    def _forward(self, x, training: bool, update_stats: bool):
        """Evaluation with the running statistics (every participant agrees first)."""

        def call() -> Call:  # built only by a distributed reducer
            label = f"{self._label()} evaluation forward"
            return Call(label, KIND_EVAL, training, False, args_hash(self.config()))

        y, cache = self._sync.reducer.dispatch(self._eval_local, self._eval_synced, call, None, x)
        self._commit_forward(cache, None)
        return y

    def _eval_local(self, x) -> tuple[object, object]:
        return self._forward_running(self._inputs(x))

    def _eval_synced(self, red, call: Call, error, x) -> tuple[object, object]:
        inp, error = red.attempt(self._inputs, x)
        red.agree(call, error, nfeat=int(np.prod(self.feature_shape)))
        return self._forward_running(inp)

    def _forward_running(self, inp: Inputs) -> tuple[object, object]:
        """Evaluation mode: normalize with the running statistics (constants)."""
        be, st = inp.be, self._state
        return eval_pass(inp, be.param(st.running_mean), be.param(st.running_var))

    def _commit_forward(self, cache: object, stats: object) -> None:
        """Keep what the backward pass needs (not inside this thread's ``recording()``)."""
        rec = self._recorders.get(threading.get_ident()) if self._recorders else None
        if rec is not None:
            if stats is not None:
                rec.append(stats)
            return
        if stats is not None:
            self._state.last_batch_stats = stats
        self._state.cache = cache

    def _label(self) -> str:
        """The layer's name in synchronized calls: class, features and position."""
        return f"{type(self).__name__}{self.feature_shape}#{self._sync.tag}"

    # ------------------------------------------------------------------ backward
    def backward(self, dy):
        """Gradient with respect to the last forward input.

        Parameters
        ----------
        dy : array, same shape and library as the last forward input

        Returns
        -------
        dx : array, same shape and dtype as the last forward input
        """
        cache = self._need_cache(self._state.cache)
        return self._backward(dy, cache)[0]

    def _backward(self, dy, cache) -> tuple:
        """``(dx, dgamma, dbeta)`` of the last forward."""
        from .._compose import backward_local, check_backward

        dy, _ = check_backward(dy, cache, None)
        return backward_local(dy, cache, self.backend, None)

    # ------------------------------------------------------------------ state
    def state_keys(self) -> list[str]:
        """The keys of :meth:`state_dict`, in order."""
        return state_io.state_keys(self)

    def state_dict(self) -> state_io.StateDict:
        """Copies of the parameters and running statistics (NumPy arrays), with the format
        version in ``.version``."""
        return state_io.collect(self)

    def check_state(self, state: dict, *, version: int | None = None) -> dict:
        """Validate ``state`` for :meth:`load_state_dict` without changing anything; return
        the values it would store (in the layer's dtype)."""
        return state_io.checked(self, state, version)

    def load_state_dict(self, state: dict, *, version: int | None = None) -> NormLayer:
        """Replace parameters and running statistics; all-or-nothing.

        The keys must be exactly those of :meth:`state_dict`; arrays must have the layer's
        per-feature shape, a real floating dtype, finite values (also in the layer's dtype)
        and a running variance >= 0; ``num_batches_tracked`` a non-negative integer.
        ``version`` (default: ``state.version`` for a :class:`StateDict`, else the current
        one) selects the migration. Arrays are stored in the layer's namespace and device.
        """
        new = self.check_state(state, version=version)
        with self._lock:
            state_io.store(self, new)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the state and configuration atomically: ``.safetensors`` by suffix, else npz.

        The metadata record the class and constructor arguments, the state version and the
        library version; what cannot be rebuilt from a file is refused before writing.
        """
        state_io.save(self, path)

    def unsavable_reason(self) -> str | None:
        """Why a file could not rebuild this layer (None: :meth:`save` can write it)."""
        return None

    def load(self, path: str | os.PathLike) -> NormLayer:
        """Load state written by :meth:`save` (any version); validated like
        :meth:`load_state_dict`.

        The file's configuration is checked, not restored: every field must pass the
        constructor's own checks (garbage is refused naming the field), and the fields that
        decide what the state means or how it evolves (``eps``, ``momentum``,
        ``convention``, ``unbiased``, ``affine``, ``track_running_stats``, ``nonfinite``,
        a variant's own arguments) must equal this layer's; ``backend``, ``dtype``,
        ``axis``, ``reuse_buffers`` and ``schedule`` may differ (the arrays are stored in
        this layer's dtype). A field an older file lacks counts as the constructor's
        default. A file without a configuration (not written by :meth:`save`) is refused:
        load its arrays with ``load_state_dict(batchnorm.checkpoint.load_state(path)[0])``.
        A refused load changes nothing; to take the file's configuration, build the layer
        with :func:`batchnorm.diagnostics.layer_from_checkpoint`."""
        return state_io.load(self, path)
