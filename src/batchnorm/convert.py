"""Exact conversion of batch-norm state between this library, PyTorch, Keras and Flax.

Names:

=========  ==============================================================================
torch      ``weight, bias, running_mean, running_var, num_batches_tracked``
keras      ``gamma, beta, moving_mean, moving_variance``
flax       ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``
=========  ==============================================================================

Two things differ besides names:

* momentum direction: PyTorch's momentum weights the *new* batch value, Keras's and Flax's
  the *old* running value (see :mod:`batchnorm.conventions`); :func:`translate_momentum`
  converts, and the exported config carries the translated value;
* eps: evaluation computes ``(x - mean) / sqrt(var + eps)``. When the two sides use
  different eps, the difference is absorbed into the running variance,
  ``var_dst = var_src + eps_src - eps_dst``, so evaluation outputs agree exactly. A
  variance that would become negative is refused.

Unknown or missing keys raise ValueError naming them; nothing is changed on failure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import check_eps, check_state_array
from ._xp import is_array, to_numpy
from .conventions import (
    CONVENTIONS,
    Convention,
    check_momentum,
    get_convention,
    new_value_weight,
)
from .layers import BatchNorm, BatchStatsLayer, NormLayer

__all__ = ["FRAMEWORKS", "export_state", "import_state", "translate_momentum"]

FRAMEWORKS = ("torch", "keras", "flax")
_NOT_GIVEN: Any = object()


def translate_momentum(
    momentum: float | None, src: str | Convention, dst: str | Convention
) -> float | None:
    """The same smoothing expressed in ``dst``'s momentum direction (None stays None).

    Examples
    --------
    >>> import batchnorm as bn
    >>> round(bn.translate_momentum(0.1, "torch", "keras"), 12)
    0.9
    >>> print(bn.translate_momentum(None, "torch", "seed"))
    None
    """
    momentum = check_momentum(momentum)
    src, dst = get_convention(src), get_convention(dst)
    if momentum is None:
        return None
    w_new = new_value_weight(momentum, src.momentum_weights, 1)
    return w_new if dst.momentum_weights == "new" else 1.0 - w_new


def _to_numpy(v, name: str) -> np.ndarray:
    """An incoming state entry as NumPy, through the one shared state check."""
    if hasattr(v, "detach") and not isinstance(v, np.ndarray):  # a torch tensor
        v = v.detach().cpu().numpy()
    elif not isinstance(v, np.ndarray) and is_array(v):  # JAX or another Array API library
        v = to_numpy(v)
    return check_state_array(v, name)


def _absorb_eps(var: np.ndarray, eps_src: float, eps_dst: float) -> np.ndarray:
    out = np.asarray(var, np.float64) + (eps_src - eps_dst)
    if np.any(out < 0):
        bad = np.flatnonzero(out < 0)[:8].tolist()
        raise ValueError(
            f"cannot absorb eps {eps_src:g} -> {eps_dst:g}: the running variance of features "
            f"{bad} would become negative (min {np.min(var)!r}); choose a smaller target eps"
        )
    return out


def _flat(state: dict, framework: str) -> dict:
    """Flatten a framework's state into its plain key -> array form."""
    if framework == "flax":
        unknown = set(state) - {"params", "batch_stats"}
        if unknown:
            raise ValueError(
                f"unknown top-level flax keys {sorted(unknown)}; expected "
                "'params' and 'batch_stats'"
            )
        flat = {}
        for group in ("params", "batch_stats"):
            for k, v in dict(state.get(group, {})).items():
                flat[f"{group}/{k}"] = v
        return flat
    return dict(state)


_KEYS = {
    "torch": {
        "gamma": "weight",
        "beta": "bias",
        "mean": "running_mean",
        "var": "running_var",
        "count": "num_batches_tracked",
    },
    "keras": {"gamma": "gamma", "beta": "beta", "mean": "moving_mean", "var": "moving_variance"},
    "flax": {
        "gamma": "params/scale",
        "beta": "params/bias",
        "mean": "batch_stats/mean",
        "var": "batch_stats/var",
    },
}


def _check_framework(framework: str) -> dict:
    if not isinstance(framework, str) or framework not in _KEYS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}; got {framework!r}")
    return _KEYS[framework]


def export_state(
    layer: NormLayer, framework: str, *, eps: float | None = None
) -> tuple[dict, dict]:
    """The layer's state in ``framework``'s names, and the matching layer config.

    Parameters
    ----------
    layer : BatchNorm
    framework : {"torch", "keras", "flax"}
    eps : float, optional
        The target layer's eps (default: the framework's default, see the conventions
        table); the difference to ``layer.eps`` is absorbed into the running variance.

    Returns
    -------
    state : dict
        Arrays in the framework's names (Flax: nested ``params`` / ``batch_stats``).
    config : dict
        ``{"momentum": ..., "eps": ...}`` in the framework's momentum direction.
    """
    keys = _check_framework(framework)
    if not isinstance(layer, NormLayer):
        raise TypeError(f"expected a norm layer; got {type(layer).__name__}")
    if not layer.track_running_stats:
        raise ValueError(f"{type(layer).__name__} keeps no running statistics to export")
    eps_dst = CONVENTIONS[framework].eps if eps is None else check_eps(eps)
    flat = {
        keys["mean"]: layer.host("running_mean").astype(np.float64).copy(),
        keys["var"]: _absorb_eps(layer.host("running_var"), layer.eps, eps_dst),
    }
    if layer.affine:
        flat[keys["gamma"]] = layer.host("gamma").astype(np.float64).copy()
        flat[keys["beta"]] = layer.host("beta").astype(np.float64).copy()
    if "count" in keys:
        flat[keys["count"]] = int(layer.num_batches_tracked)
    # a layer whose statistics never move (FrozenBatchNorm) exports a momentum that keeps
    # the framework's running statistics where they are
    moving = isinstance(layer, BatchStatsLayer)
    config = {
        "momentum": translate_momentum(
            layer.momentum if moving else 1.0, layer.convention if moving else "seed", framework
        ),
        "eps": eps_dst,
    }
    if framework == "flax":
        nested: dict = {"params": {}, "batch_stats": {}}
        for k, v in flat.items():
            group, name = k.split("/")
            nested[group][name] = v
        return nested, config
    return flat, config


def import_state(
    state: dict,
    framework: str,
    *,
    layer: NormLayer | None = None,
    eps: float | None = None,
    momentum: float | None = _NOT_GIVEN,
) -> NormLayer:
    """Load a framework's batch-norm state into a layer of this library.

    Parameters
    ----------
    state : dict
        The framework's state (torch tensors are accepted as they are).
    framework : {"torch", "keras", "flax"}
    layer : BatchNorm, optional
        Target; by default a new ``BatchNorm`` with ``convention=framework``.
    eps : float, optional
        The *source* layer's eps (default: the framework's default); the difference to
        ``layer.eps`` is absorbed into the running variance.
    momentum : float or None, optional
        The source layer's momentum in the framework's direction (None: a cumulative
        average); when given, the target layer's momentum is set to the same smoothing in
        its own direction.

    Returns
    -------
    BatchNorm
        The target layer, with state replaced all-or-nothing.
    """
    keys = _check_framework(framework)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of {framework} arrays; got {type(state).__name__}")
    if layer is not None and not isinstance(layer, NormLayer):
        raise TypeError(f"layer must be a norm layer of this library; got {type(layer).__name__}")
    if momentum is not _NOT_GIVEN:
        momentum = check_momentum(momentum)
    flat, arrays, has_affine = _framework_arrays(state, framework, keys)
    mean = arrays[keys["mean"]]
    if layer is None:
        layer = BatchNorm(
            mean.shape if mean.ndim != 1 else mean.shape[0], convention=framework, affine=has_affine
        )
    if has_affine != layer.affine:
        raise ValueError(
            f"the {framework} state {'has' if has_affine else 'lacks'} "
            f"gamma/beta but the layer has affine={layer.affine}"
        )
    eps_src = CONVENTIONS[framework].eps if eps is None else check_eps(eps)
    ours = {
        "running_mean": mean,
        "running_var": _absorb_eps(arrays[keys["var"]], eps_src, layer.eps),
    }
    if has_affine:
        ours["gamma"] = arrays[keys["gamma"]]
        ours["beta"] = arrays[keys["beta"]]
    # passed through as is: load_state_dict refuses anything but a non-negative integer
    count = flat.get(keys.get("count"), 0)
    if hasattr(count, "detach") and not isinstance(count, np.ndarray):  # a torch tensor
        count = count.detach().cpu().numpy()
    ours["num_batches_tracked"] = count  # load_state_dict takes a non-negative integer only
    if momentum is _NOT_GIVEN:
        new_momentum = _NOT_GIVEN
    elif not isinstance(layer, BatchStatsLayer):
        raise ValueError(f"a {type(layer).__name__} has no momentum to set; leave momentum out")
    else:
        new_momentum = translate_momentum(momentum, framework, layer.convention)
    layer.load_state_dict(ours)  # validates everything; raises before changing anything
    if new_momentum is not _NOT_GIVEN:
        layer.momentum = new_momentum
    return layer


def _framework_arrays(state: dict, framework: str, keys: dict) -> tuple[dict, dict, bool]:
    """A framework's state flattened, its keys checked, and every array entry through the
    one shared state check (before any arithmetic): ``(flat, arrays, has_affine)``."""
    flat = _flat(state, framework)
    known = set(keys.values())
    unknown = set(flat) - known
    if unknown:
        raise ValueError(
            f"unknown {framework} batch-norm keys {sorted(unknown)}; expected {sorted(known)}"
        )
    required = {keys["mean"], keys["var"]}
    has_affine = keys["gamma"] in flat or keys["beta"] in flat
    if has_affine:
        required |= {keys["gamma"], keys["beta"]}
    missing = required - set(flat)
    if missing:
        raise ValueError(f"missing {framework} batch-norm keys {sorted(missing)}")
    arrays = {
        k: _to_numpy(v, f"{framework} state[{k!r}]")
        for k, v in flat.items()
        if k != keys.get("count")
    }
    return flat, arrays, has_affine
