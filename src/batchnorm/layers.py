r"""The stateful BatchNorm layer: a thin wrapper around the pure kernels.

In training mode the layer normalizes with batch statistics and updates its running
statistics by exponential smoothing,

.. math::

    \text{running} \leftarrow (1-w)\,\text{running} + w\,\text{batch},

with the weight ``w`` of the new value read from ``momentum`` in the direction of the chosen
convention (see :mod:`batchnorm.conventions`). In evaluation mode it normalizes with the
running statistics and changes no state.

Every call validates first and commits last: a rejected call leaves the layer exactly as it
was, and no non-finite value ever reaches the running statistics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np

from . import checkpoint
from ._validation import as_input, check_eps, feature_shape, normalize_axes, reduce_axes
from .conventions import check_momentum, get_convention, new_value_weight, update_running
from .functional import (
    BACKENDS,
    BatchNormCache,
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
)

__all__ = ["BatchNorm"]

_DEFAULT = object()


def _as_feature_shape(num_features: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(num_features, (int, np.integer)) and not isinstance(num_features, bool):
        shape = (int(num_features),)
    else:
        try:
            shape = tuple(int(n) for n in num_features)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(
                f"num_features must be a positive int or a tuple of them; got {num_features!r}"
            ) from None
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"num_features must be positive; got {num_features!r}")
    return shape


class BatchNorm:
    """Batch normalization layer with train/eval modes and running statistics.

    Parameters
    ----------
    num_features : int or tuple of int
        Size of the feature axis (a tuple when ``axis`` names several axes).
    convention : {"seed", "torch", "keras", "flax"}
        Preset for the defaults of ``axis``, ``momentum``, ``eps`` and ``unbiased``, and the
        direction in which ``momentum`` is read.
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

    Attributes
    ----------
    gamma, beta : ndarray, shape (*features), or None
    running_mean, running_var : ndarray, shape (*features), or None
    num_batches_tracked : int
        Number of training forwards that updated the running statistics.
    dgamma, dbeta : ndarray or None
        Gradients from the last :meth:`backward`.
    training : bool
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        convention: str = "seed",
        axis: int | Sequence[int] | None = None,
        momentum: float | None = _DEFAULT,  # type: ignore[assignment]
        eps: float | None = None,
        unbiased: bool | None = None,
        affine: bool = True,
        track_running_stats: bool = True,
        nonfinite: Literal["raise", "skip"] = "raise",
        dtype: np.dtype | type = np.float64,
        backend: str = "auto",
    ) -> None:
        conv = get_convention(convention)
        self.feature_shape = _as_feature_shape(num_features)
        self.convention = conv
        self.axis = conv.axis if axis is None else axis
        if isinstance(self.axis, (int, np.integer)):
            n_axes = 1
        else:
            self.axis = tuple(self.axis)
            n_axes = len(self.axis)
        if n_axes != len(self.feature_shape):
            raise ValueError(
                f"axis={self.axis!r} names {n_axes} feature axes but num_features="
                f"{num_features!r} gives {len(self.feature_shape)}"
            )
        self.momentum = conv.momentum if momentum is _DEFAULT else check_momentum(momentum)
        self.eps = conv.eps if eps is None else check_eps(eps)
        self.unbiased = conv.unbiased if unbiased is None else bool(unbiased)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip'; got {nonfinite!r}")
        self.nonfinite = nonfinite
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        self.backend = backend
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise TypeError(f"dtype must be a floating dtype; got {self.dtype}")
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)

        fs = self.feature_shape
        self.gamma = np.ones(fs, self.dtype) if self.affine else None
        self.beta = np.zeros(fs, self.dtype) if self.affine else None
        self.running_mean = np.zeros(fs, self.dtype) if self.track_running_stats else None
        self.running_var = np.ones(fs, self.dtype) if self.track_running_stats else None
        self.num_batches_tracked = 0
        self.skipped_updates = 0
        self.dgamma: np.ndarray | None = None
        self.dbeta: np.ndarray | None = None
        self.training = True
        self._cache: BatchNormCache | None = None

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> BatchNorm:
        """Switch to training mode (or evaluation mode with ``mode=False``); return self."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Switch to evaluation mode; return self."""
        return self.train(False)

    # ------------------------------------------------------------------ forward / backward
    def _check_input(self, x: object) -> tuple[np.ndarray, tuple[int, ...]]:
        x = as_input(x)
        axes = normalize_axes(self.axis, x.ndim)
        got = feature_shape(x.shape, axes)
        if got != self.feature_shape:
            raise ValueError(
                f"x with shape {x.shape} has {got} features along axis {self.axis!r}, but the "
                f"layer was built for num_features={self.feature_shape}"
            )
        return x, axes

    def _require_two_values(self, x: np.ndarray, axes: tuple[int, ...]) -> int:
        """Values per feature in ``x``; batch statistics need at least two."""
        m = int(np.prod([x.shape[i] for i in reduce_axes(x.ndim, axes)]))
        if m < 2:
            raise ValueError(
                f"expected more than 1 value per feature when using batch statistics; x has "
                f"shape {x.shape} and feature axis {self.axis!r}, giving {m} value(s) per feature"
            )
        return m

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
        training = self.training if training is None else bool(training)
        x, axes = self._check_input(x)
        use_batch_stats = training or not self.track_running_stats
        if not use_batch_stats:
            y, cache = batch_norm_eval(
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
            self._cache = cache
            return y

        m = self._require_two_values(x, axes)
        y, cache = batch_norm_train(
            x, self.gamma, self.beta, axis=axes, eps=self.eps, backend=self.backend
        )
        if training and self.track_running_stats and update_stats:
            self._update_running_stats(
                cache.mean, cache.var, self._batch_targets(cache.mean, cache.var, m)
            )
        self._cache = cache
        return y

    __call__ = forward

    def _batch_targets(self, mean: np.ndarray, var: np.ndarray, m: int) -> dict[str, np.ndarray]:
        """The batch values each running statistic is smoothed towards."""
        return {
            "running_mean": mean,
            "running_var": var * (m / (m - 1)) if self.unbiased else var,
        }

    def _running_update(
        self, mean: np.ndarray, var: np.ndarray, targets: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray] | None:
        """New running statistics, or None to skip; raises without touching state."""
        w = new_value_weight(
            self.momentum, self.convention.momentum_weights, self.num_batches_tracked + 1
        )
        new = {
            key: update_running(getattr(self, key).astype(np.float64), value, w)
            for key, value in targets.items()
        }
        with np.errstate(over="ignore", invalid="ignore"):
            finite = (
                np.all(np.isfinite(mean))
                and np.all(np.isfinite(var))
                and all(np.all(np.isfinite(v.astype(self.dtype))) for v in new.values())
            )
        if finite:
            return new
        if self.nonfinite == "skip":
            return None
        bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
        raise ValueError(
            f"training batch has non-finite statistics (features {bad[:8].tolist()} of "
            f"{mean.size}; first mean={mean.ravel()[bad[:1]].tolist()}, "
            f"var={var.ravel()[bad[:1]].tolist()}); running statistics left unchanged. "
            f"Pass nonfinite='skip' to skip such updates instead."
            if bad.size
            else "updating the running statistics would overflow the layer dtype "
            f"{self.dtype}; running statistics left unchanged"
        )

    def _update_running_stats(
        self, mean: np.ndarray, var: np.ndarray, targets: dict[str, np.ndarray]
    ) -> None:
        """Check, then commit (or skip) one update of the running statistics."""
        new = self._running_update(mean, var, targets)
        if new is None:
            self.skipped_updates += 1
            return
        for key, value in new.items():
            getattr(self, key)[...] = value
        self.num_batches_tracked += 1

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
        if self._cache is None:
            raise RuntimeError("backward() called before any forward pass")
        dx, dgamma, dbeta = batch_norm_backward(dy, self._cache, backend=self.backend)
        if self.affine:
            self.dgamma = dgamma.astype(self.dtype, copy=False)
            self.dbeta = dbeta.astype(self.dtype, copy=False)
        return dx

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict[str, np.ndarray]:
        """Learnable parameters by name (the arrays themselves, for in-place updates)."""
        return {"gamma": self.gamma, "beta": self.beta} if self.affine else {}

    def gradients(self) -> dict[str, np.ndarray | None]:
        """Gradients of :meth:`parameters` from the last backward pass."""
        return {"gamma": self.dgamma, "beta": self.dbeta} if self.affine else {}

    # ------------------------------------------------------------------ state
    _running_keys: tuple[str, ...] = ("running_mean", "running_var")
    _nonnegative_keys: tuple[str, ...] = ("running_var",)

    def _expected_keys(self) -> list[str]:
        keys = ["gamma", "beta"] if self.affine else []
        if self.track_running_stats:
            keys += [*self._running_keys, "num_batches_tracked"]
        return keys

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Copies of the parameters and running statistics as a plain dict."""
        return {
            key: int(self.num_batches_tracked)
            if key == "num_batches_tracked"
            else getattr(self, key).copy()
            for key in self._expected_keys()
        }

    def load_state_dict(self, state: dict) -> BatchNorm:
        """Replace parameters and running statistics; all-or-nothing.

        Checks that the keys are exactly those of :meth:`state_dict`, that arrays have the
        layer's per-feature shape and a floating dtype and are finite, that the running
        variance is >= 0 and that ``num_batches_tracked`` is a non-negative integer. On any
        failure the layer is unchanged.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict; got {type(state).__name__}")
        expected = set(self._expected_keys())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"state dict keys do not match: missing {sorted(missing)}, unexpected "
                f"{sorted(unexpected)} (expected {sorted(expected)})"
            )
        new: dict[str, np.ndarray | int] = {}
        for key in sorted(expected - {"num_batches_tracked"}):
            arr = np.asarray(state[key])
            if arr.dtype.kind != "f":
                raise TypeError(f"state[{key!r}] must be a floating array; got dtype {arr.dtype}")
            if arr.shape != self.feature_shape:
                raise ValueError(
                    f"state[{key!r}] has shape {arr.shape}; the layer expects {self.feature_shape}"
                )
            converted = arr.astype(self.dtype)
            if not np.all(np.isfinite(converted)):
                raise ValueError(f"state[{key!r}] has non-finite values: {arr.ravel()[:8]}")
            new[key] = converted
        for key in self._nonnegative_keys:
            if key in new and np.any(new[key] < 0):
                raise ValueError(f"state[{key!r}] has negative values (min {new[key].min()!r})")
        if "num_batches_tracked" in expected:
            nbt = state["num_batches_tracked"]
            nbt_arr = np.asarray(nbt)
            if nbt_arr.shape != () or nbt_arr.dtype.kind not in "iu" or int(nbt_arr) < 0:
                raise ValueError(
                    f"state['num_batches_tracked'] must be a non-negative integer; got {nbt!r}"
                )
            new["num_batches_tracked"] = int(nbt_arr)
        # Every check passed: commit.
        for key, value in new.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                getattr(self, key)[...] = value
        return self

    def config(self) -> dict:
        """The constructor arguments, as JSON-friendly values."""
        return {
            "class": type(self).__name__,
            "num_features": list(self.feature_shape),
            "convention": self.convention.name,
            "axis": self.axis if isinstance(self.axis, int) else list(self.axis),
            "momentum": self.momentum,
            "eps": self.eps,
            "unbiased": self.unbiased,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "dtype": self.dtype.name,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the state and configuration atomically: ``.safetensors`` by suffix, else npz."""
        checkpoint.save_state(path, self.state_dict(), meta={"batchnorm": self.config()})

    def load(self, path: str | os.PathLike) -> BatchNorm:
        """Load state written by :meth:`save`; validated like :meth:`load_state_dict`."""
        state, _ = checkpoint.load_state(path)
        return self.load_state_dict(state)

    def __repr__(self) -> str:
        mom = "None" if self.momentum is None else f"{self.momentum:g}"
        fs = self.feature_shape
        return (
            f"BatchNorm({fs if len(fs) > 1 else fs[0]}, "
            f"convention={self.convention.name!r}, axis={self.axis!r}, momentum={mom}, "
            f"eps={self.eps:g}, unbiased={self.unbiased}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, training={self.training})"
        )
