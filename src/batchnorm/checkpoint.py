"""Saving and loading state dicts without pickle.

Files are NumPy ``.npz`` archives read with ``allow_pickle=False``, written to a temporary
file in the target folder and moved into place with :func:`os.replace`, so a crash while
saving never leaves a half-written checkpoint under the final name. An optional JSON string
of metadata (the layer's configuration) travels under the reserved key ``__meta__``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["load_npz", "save_npz"]

META_KEY = "__meta__"


def _as_saved_array(key: str, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError(f"state entry {key!r} is not numeric (dtype object); refusing to save")
    return arr


def save_npz(path: str | os.PathLike, state: dict, meta: dict | None = None) -> Path:
    """Atomically write ``state`` (str -> array or int) and optional ``meta`` to ``path``."""
    path = Path(path)
    arrays = {k: _as_saved_array(k, v) for k, v in state.items()}
    if META_KEY in arrays:
        raise ValueError(f"state may not use the reserved key {META_KEY!r}")
    if meta is not None:
        arrays[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_npz(path: str | os.PathLike) -> tuple[dict, dict | None]:
    """Read a file written by :func:`save_npz`; return ``(state, meta)``.

    0-d integer arrays come back as Python ints. Raises ValueError for files that are not
    valid npz archives or that hold object arrays (which would need pickle).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise
    except Exception as exc:  # zipfile, zlib, format and pickle refusals all mean "bad file"
        raise ValueError(
            f"{path} is not a readable npz checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    meta = None
    if META_KEY in raw:
        try:
            meta = json.loads(str(raw.pop(META_KEY)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: metadata entry {META_KEY!r} is not valid JSON") from exc
    state: dict = {}
    for k, v in raw.items():
        if v.ndim == 0 and v.dtype.kind in "iu":
            state[k] = int(v)
        else:
            state[k] = v
    return state, meta
