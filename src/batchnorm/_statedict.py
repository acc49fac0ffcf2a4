"""Checks of a layer state dict, shared by ``load_state_dict`` and the checkpoint loaders.

A state dict maps names to per-feature arrays (``gamma``, ``beta``, the running
statistics) and ``num_batches_tracked`` to a non-negative integer. The check returns the
converted values, or raises before anything is changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ._validation import COUNT_LIMIT, check_state_array

__all__ = ["check_state_dict"]


def check_state_dict(
    state: object,
    keys: Sequence[str],
    feature_shape: tuple[int, ...],
    dtype: np.dtype,
    *,
    nonnegative: Iterable[str] = (),
) -> dict[str, np.ndarray | int]:
    """Validate ``state`` against the expected keys, shapes and dtype; return new values.

    Raises
    ------
    TypeError
        ``state`` is not a dict, or an entry is not a real floating array (masked, complex,
        object, string and bool arrays are refused by the one shared check,
        :func:`batchnorm._validation.check_state_array`).
    ValueError
        Missing or unexpected keys, a wrong shape, a value that is not finite (also after
        conversion to ``dtype``), a negative value in a ``nonnegative`` entry, or a
        ``num_batches_tracked`` that is not a non-negative integer.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict; got {type(state).__name__}")
    expected = set(keys)
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"state dict keys do not match: missing {sorted(missing)}, unexpected "
            f"{sorted(map(str, unexpected))} (expected {sorted(expected)})"
        )
    new: dict[str, np.ndarray | int] = {}
    for key in keys:
        if key == "num_batches_tracked":
            continue
        arr = check_state_array(state[key], f"state[{key!r}]")
        if arr.shape != feature_shape:
            raise ValueError(
                f"state[{key!r}] has shape {arr.shape}; the layer expects {feature_shape}"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            converted = arr.astype(dtype)
        if not np.all(np.isfinite(converted)):
            bad = np.flatnonzero(~np.isfinite(converted))
            raise ValueError(
                f"state[{key!r}] has non-finite values in {dtype}: entries "
                f"{bad[:8].tolist()}, first {arr.ravel()[bad[0]]!r}"
            )
        new[key] = converted
    for key in nonnegative:
        if key in new and np.any(new[key] < 0):
            raise ValueError(f"state[{key!r}] has negative values (min {new[key].min()!r})")
    if "num_batches_tracked" in expected:
        new["num_batches_tracked"] = _batch_count(state["num_batches_tracked"])
    return new


def _batch_count(nbt: object) -> int:
    """``num_batches_tracked``: an integer scalar in [0, 2**63) (ValueError otherwise)."""
    try:
        arr = check_state_array(nbt, "state['num_batches_tracked']", kinds="iu")
    except TypeError:
        arr = None
    if arr is None or arr.shape != () or not 0 <= int(arr) < COUNT_LIMIT:
        raise ValueError(
            f"state['num_batches_tracked'] must be a non-negative integer below 2**63; got {nbt!r}"
        )
    return int(arr)
