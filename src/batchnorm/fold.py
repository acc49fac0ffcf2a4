r"""Folding an evaluation-mode batch norm into the layer before it.

In evaluation mode batch norm is the per-feature affine map
:math:`y = s\,(z - \mu) + \beta` with :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}`. When
:math:`z` is the output of a linear layer or convolution, :math:`z = W x + b`, the two
compose into one layer with weights :math:`s W` (each output feature's weights scaled) and
bias :math:`s (b - \mu) + \beta`, which alone gives the same outputs.
"""

from __future__ import annotations

import numpy as np

from ._validation import check_state_array
from .layers import NormLayer

__all__ = ["bn_affine", "fold_conv", "fold_linear"]


def bn_affine(layer: NormLayer) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (scale, shift) of a norm layer in evaluation mode: ``y = scale * z + shift``.

    Any norm layer with running statistics (BatchNorm, BatchRenorm, GhostBatchNorm,
    FrozenBatchNorm); float64 results.
    """
    if not isinstance(layer, NormLayer):
        raise TypeError(
            f"expected a norm layer (BatchNorm, BatchRenorm, GhostBatchNorm, "
            f"FrozenBatchNorm); got {type(layer).__name__}"
        )
    if not layer.track_running_stats:
        raise ValueError(
            f"{type(layer).__name__} without running statistics has no fixed affine map to fold"
        )
    if len(layer.feature_shape) != 1:
        raise ValueError(f"folding needs one feature axis; the layer has {layer.feature_shape}")
    scale = 1.0 / np.sqrt(layer.host("running_var").astype(np.float64) + layer.eps)
    if layer.gamma is not None:
        scale = scale * layer.host("gamma")
    shift = -layer.host("running_mean").astype(np.float64) * scale
    if layer.beta is not None:
        shift = shift + layer.host("beta")
    return scale, shift


def _real(v, name: str) -> np.ndarray:
    """A finite real NumPy array, through the one shared state check (masked, complex,
    object, string, bool and non-finite refused)."""
    return check_state_array(v, name, kinds="fiu")


def _fold(weight, bias, layer, out_axis, ndim_ok, expected):
    scale, shift = bn_affine(layer)  # refuses what is not a norm layer with running stats
    raw = _real(weight, "weight")
    if raw.dtype.kind not in "fiu":
        raise TypeError(
            f"weight must be a real numeric array; got {type(weight).__name__} "
            f"with dtype {raw.dtype}"
        )
    if not ndim_ok(raw.ndim):
        raise ValueError(f"weight has shape {raw.shape}; expected {expected}")
    weight = raw.astype(np.float64)
    n_out = weight.shape[out_axis]
    if layer.feature_shape != (n_out,):
        raise ValueError(
            f"the BatchNorm has {layer.feature_shape} features but the weight "
            f"{weight.shape} has {n_out} outputs along axis {out_axis}"
        )
    b = np.zeros(n_out) if bias is None else _real(bias, "bias").astype(np.float64)
    if b.shape != (n_out,):
        raise ValueError(f"bias has shape {b.shape}; expected ({n_out},)")
    shape = [1] * weight.ndim
    shape[out_axis] = n_out
    return weight * scale.reshape(shape), scale * b + shift


def fold_linear(weight, bias, layer: NormLayer, *, layout: str = "in_out"):
    """Fold an eval-mode BatchNorm into the Linear layer before it.

    Parameters
    ----------
    weight : ndarray
        ``(in, out)`` for ``y = x @ W + b`` (``layout="in_out"``, as :class:`batchnorm.nn.Linear`)
        or ``(out, in)`` for ``y = x @ W.T + b`` (``layout="out_in"``, as PyTorch).
    bias : ndarray, shape (out,), or None
    layer : BatchNorm
        Normalizing the Linear's outputs (feature axis = the output features).

    Returns
    -------
    weight, bias : the folded parameters (float64), in the same layout.

    Examples
    --------
    >>> import numpy as np
    >>> import batchnorm as bn
    >>> rng = np.random.default_rng(0)
    >>> W, b = rng.standard_normal((5, 3)), np.zeros(3)
    >>> layer = bn.BatchNorm(3)
    >>> _ = layer(rng.standard_normal((8, 5)) @ W)
    >>> W2, b2 = bn.fold_linear(W, b, layer.eval())
    >>> x = rng.standard_normal((4, 5))
    >>> bool(np.allclose(x @ W2 + b2, layer(x @ W + b)))
    True
    """
    if layout not in ("in_out", "out_in"):
        raise ValueError(f"layout must be 'in_out' or 'out_in'; got {layout!r}")
    expected = "(in, out)" if layout == "in_out" else "(out, in)"
    return _fold(weight, bias, layer, 1 if layout == "in_out" else 0, lambda n: n == 2, expected)


def fold_conv(weight, bias, layer: NormLayer):
    """Fold an eval-mode BatchNorm into the convolution before it.

    Parameters
    ----------
    weight : ndarray, shape (out, in, *kernel)
    bias : ndarray, shape (out,), or None

    Returns
    -------
    weight, bias : the folded parameters (float64).
    """
    return _fold(weight, bias, layer, 0, lambda n: n >= 3, "(out, in, *kernel)")
