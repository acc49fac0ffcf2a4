"""What a checkpoint's metadata record besides the arrays: the layer configuration a
layer's ``save`` stored (:func:`~batchnorm.checkpoint.layer_config`, checked before
anything is built) and the state-dict format version with its migrations. Re-exported by
:mod:`batchnorm.checkpoint`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import numpy as np

__all__ = [
    "MAX_FEATURES",
    "MIGRATIONS",
    "STATE_VERSION",
    "check_version",
    "layer_config",
    "migrate",
    "state_version",
]

#: Cap on the number of features (product of ``num_features``) that
#: :func:`~batchnorm.checkpoint.layer_config` accepts.
MAX_FEATURES = 1 << 24
_MAX_FEATURE_DIMS = 32


def layer_config(meta: dict | None, path: str | os.PathLike, state: Mapping | None = None) -> dict:
    """The layer configuration a layer's ``save`` stored, checked before anything is built.

    Parameters
    ----------
    meta : dict or None
        The metadata returned by :func:`~batchnorm.checkpoint.load_state`.
    path : str or os.PathLike
        The checkpoint, for error messages.
    state : Mapping or None
        The state returned by :func:`~batchnorm.checkpoint.load_state`. If given, every
        array in it that is not 0-d must have the shape ``num_features`` declares, so a
        header cannot make the caller allocate a layer larger than the arrays stored.

    Returns
    -------
    dict
        A copy of ``meta["batchnorm"]``, with ``"class"`` a str and ``"num_features"`` a
        non-empty list of at most 32 positive ints whose product is at most
        ``batchnorm.checkpoint.MAX_FEATURES``. Other keys are left for the caller to check.

    Raises
    ------
    ValueError
        Naming ``path`` and the missing or bad field.
    """
    cfg = meta.get("batchnorm") if isinstance(meta, dict) else None
    if cfg is None:
        raise ValueError(
            f"{path} holds no layer configuration (no 'batchnorm' entry in its metadata; was it "
            "written by a layer's save()?)"
        )
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: metadata 'batchnorm' must be an object; got {cfg!r:.80}")
    cls = cfg.get("class")
    if not isinstance(cls, str) or not cls:
        raise ValueError(f"{path}: metadata 'batchnorm.class' must be a class name; got {cls!r}")
    nf = cfg.get("num_features")
    ok = (
        isinstance(nf, list)
        and 0 < len(nf) <= _MAX_FEATURE_DIMS
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in nf)
    )
    if not ok:
        raise ValueError(
            f"{path}: metadata 'batchnorm.num_features' must be a list of 1 to "
            f"{_MAX_FEATURE_DIMS} positive ints; got {nf!r:.80}"
        )
    if math.prod(nf) > MAX_FEATURES:
        raise ValueError(
            f"{path}: metadata 'batchnorm.num_features' {nf} declares {math.prod(nf)} "
            f"features; at most MAX_FEATURES={MAX_FEATURES} are accepted"
        )
    if state is not None:
        for key, value in state.items():
            shape = np.shape(value)
            if shape != () and shape != tuple(nf):
                raise ValueError(
                    f"{path}: state[{key!r}] has shape {shape} but metadata "
                    f"'batchnorm.num_features' declares {tuple(nf)}"
                )
    return dict(cfg)


# ----------------------------------------------------------------------------- versions
#: The layer state-dict format this library writes. 0 is the format of batchnorm 0.1.0
#: (no version recorded); 1 is identical in content and records its version.
STATE_VERSION = 1

#: ``MIGRATIONS[v]`` turns a state dict of version ``v`` into version ``v + 1`` (a future
#: change of keys or meaning adds one here, so every checkpoint ever written keeps loading).
MIGRATIONS: dict[int, Callable[[dict], dict]] = {0: lambda state: dict(state)}


def check_version(version: object) -> int:
    """A state version this library can read (0 .. ``batchnorm.checkpoint.STATE_VERSION``)."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise TypeError(f"state version must be an integer; got {version!r}")
    if not 0 <= int(version) <= STATE_VERSION:
        raise ValueError(
            f"state version {int(version)} is not supported: this library reads versions 0 "
            f"to {STATE_VERSION} (written by a newer batchnorm?)"
        )
    return int(version)


def migrate(state: dict, version: int) -> dict:
    """``state`` of ``version`` in the current format (the input is never modified)."""
    v = check_version(version)
    out = state
    while v < STATE_VERSION:
        out = MIGRATIONS[v](out)
        v += 1
    return out


def state_version(meta: dict | None, path: str | os.PathLike | None = None) -> int:
    """The state version a checkpoint's metadata record (0 when none: batchnorm 0.1.0).

    Raises
    ------
    ValueError
        Naming ``path`` when the recorded version is not one this library can read.
    """
    if not isinstance(meta, dict) or "state_version" not in meta:
        return 0
    try:
        return check_version(meta["state_version"])
    except (TypeError, ValueError) as exc:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}unusable state_version in the metadata: {exc}") from None
