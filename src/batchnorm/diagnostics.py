r"""Diagnostics: how far a layer's running statistics are from a batch, and how long they
remember.

Train/eval gap. For a batch with statistics :math:`\mu_B, \sigma^2_B` and running estimates
:math:`\mu, \sigma^2`, per feature: the mean shift in running-std units
:math:`(\mu_B - \mu)/\sqrt{\sigma^2 + \epsilon}` and the variance ratio
:math:`\sigma^2_B / \sigma^2`. Large values mean evaluation mode normalizes this batch very
differently from training mode.

Averaging window. An exponential average with new-value weight :math:`w` gives the batch
:math:`k` steps back the weight :math:`w(1-w)^k`. Its *effective window*
:math:`(2-w)/w` is the size of a plain average with the same variance reduction, its
half-life is :math:`\ln 2 / -\ln(1-w)` batches, and after :math:`t` batches the initial value
(0 for the mean, 1 for the variance) still weighs :math:`(1-w)^t`. With ``momentum=None``
(cumulative average) the window is all :math:`t` batches.
"""

from __future__ import annotations

import math
import os

import numpy as np

from . import checkpoint
from .conventions import new_value_weight
from .functional import moments
from .layers import NormLayer

__all__ = [
    "averaging_window",
    "describe_checkpoint",
    "json_safe",
    "layer_from_checkpoint",
    "train_eval_gap",
]


def _need_running(layer: object) -> NormLayer:
    if not isinstance(layer, NormLayer):
        raise TypeError(f"expected a norm layer; got {type(layer).__name__}")
    if not layer.track_running_stats:
        raise ValueError(f"{type(layer).__name__} keeps no running statistics")
    return layer


def averaging_window(layer: NormLayer) -> dict:
    """Effective window, half-life and remaining weight of the initial value.

    Returns
    -------
    dict with ``kind`` ("exponential", "cumulative" or "frozen"), ``new_value_weight``,
    ``effective_batches``, ``half_life_batches``, ``initial_value_weight`` and
    ``batches_tracked``.
    """
    _need_running(layer)
    t = int(layer.num_batches_tracked)
    # a frozen layer, or momentum that never takes in a new value: the window never moves
    w = (
        new_value_weight(layer.momentum, layer.convention.momentum_weights, 1)
        if (layer.uses_batch_stats and layer.momentum is not None)
        else None
    )
    if not layer.uses_batch_stats or (w is not None and w <= 0.0):
        return {
            "kind": "frozen",
            "new_value_weight": 0.0,
            "effective_batches": math.inf,
            "half_life_batches": math.inf,
            "initial_value_weight": 1.0,
            "batches_tracked": t,
        }
    if layer.momentum is None:
        return {
            "kind": "cumulative",
            "new_value_weight": 1.0 / max(t, 1),
            "effective_batches": float(t),
            "half_life_batches": None,
            "initial_value_weight": 0.0 if t else 1.0,
            "batches_tracked": t,
        }
    half_life = math.log(2.0) / -math.log1p(-w) if w < 1.0 else 0.0
    return {
        "kind": "exponential",
        "new_value_weight": w,
        "effective_batches": (2.0 - w) / w,
        "half_life_batches": half_life,
        "initial_value_weight": (1.0 - w) ** t,
        "batches_tracked": t,
    }


def train_eval_gap(layer: NormLayer, x: np.ndarray | None = None) -> dict:
    """Per-feature distance between the batch statistics of ``x`` and the running ones.

    Returns
    -------
    dict with per-feature lists ``mean_shift_in_std`` and ``var_ratio`` and their summaries
    ``max_abs_mean_shift_in_std``, ``max_log_var_ratio`` (|log| of the ratio). No state
    changes. Without ``x``, the statistics of the layer's last training batch
    (``layer.last_batch_stats``) are used.
    """
    _need_running(layer)
    if x is None:
        if layer.last_batch_stats is None:
            raise ValueError(f"{type(layer).__name__} has seen no training batch; pass x")
        mean_b, var_b = layer.last_batch_stats.mean, layer.last_batch_stats.var
    else:
        x, axes = layer.check_input(x)
        mean_b, var_b = moments(x, axis=axes, backend=layer.backend)
    mean_b, var_b = _numpy(mean_b), _numpy(var_b)
    rm = layer.host("running_mean").astype(np.float64)
    rv = layer.host("running_var").astype(np.float64)
    shift = (mean_b - rm) / np.sqrt(rv + layer.eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = var_b / rv
        log_ratio = np.abs(np.log(ratio))
    return {
        "mean_shift_in_std": shift.ravel().tolist(),
        "var_ratio": ratio.ravel().tolist(),
        "max_abs_mean_shift_in_std": float(np.max(np.abs(shift))),
        "max_log_var_ratio": float(np.max(log_ratio)),
    }


def _numpy(v) -> np.ndarray:
    """Statistics as NumPy float64 (an explicit copy off another library's device)."""
    if isinstance(v, np.ndarray):
        return v.astype(np.float64, copy=False)
    from ._xp import to_numpy

    return np.asarray(to_numpy(v), np.float64)


def layer_from_checkpoint(path: str | os.PathLike) -> NormLayer:
    """Rebuild a norm layer from a file written by its ``save`` (any class of the family).

    The configuration and the stored arrays' shapes are checked
    (:func:`batchnorm.checkpoint.layer_config`) before the layer is built, so a small file
    cannot make this allocate a huge layer; every problem is a ValueError naming the path.
    """
    state, meta = checkpoint.load_state(path)
    cfg = checkpoint.layer_config(meta, path, state)
    try:
        layer = NormLayer.from_config(cfg)
        return layer.load_state_dict(state, version=checkpoint.state_version(meta, path))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the layer configuration or state is not usable: {exc}") from None


def json_safe(value: object) -> object:
    """``value`` with every non-finite float replaced by the string "inf", "-inf" or "nan"
    (strict JSON has no such numbers)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def describe_checkpoint(path: str | os.PathLike, batch: np.ndarray | None = None) -> dict:
    """Summary of a saved layer: configuration, running statistics, window, and (given a
    batch) the train/eval gap."""
    layer = layer_from_checkpoint(path)
    out = {"config": layer.config(), "num_batches_tracked": layer.num_batches_tracked}
    if layer.track_running_stats:
        rm, rv = layer.host("running_mean"), layer.host("running_var")
        out["running_mean"] = {"min": float(rm.min()), "max": float(rm.max())}
        out["running_var"] = {"min": float(rv.min()), "max": float(rv.max())}
        out["averaging_window"] = averaging_window(layer)
        if batch is not None:
            out["train_eval_gap"] = train_eval_gap(layer, batch)
    return out
