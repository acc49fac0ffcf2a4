"""Saving and loading state dicts without pickle: ``.npz`` and ``.safetensors``.

NumPy ``.npz`` archives are read with ``allow_pickle=False``; safetensors files (the
safetensors package, optional) hold raw tensors and a JSON header and cannot carry code.
Both are written to a temporary file in the target folder and moved into place with
:func:`os.replace`, so a crash while saving never leaves a half-written checkpoint under the
final name. Optional metadata (the layer's configuration) travels as JSON: under the reserved
key ``__meta__`` in npz, in the header's ``__metadata__`` in safetensors. Integers such as
``num_batches_tracked`` are stored as 0-d int64 arrays and come back as Python ints.

:func:`save_state` / :func:`load_state` pick the format from the file suffix.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["load_npz", "load_safetensors", "load_state", "save_npz", "save_safetensors",
           "save_state"]

META_KEY = "__meta__"


def _as_saved_array(key: str, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError(f"state entry {key!r} is not numeric (dtype object); refusing to save")
    return arr


def _atomic_write(path: Path, write) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then move it into place."""
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _arrays(state: dict) -> dict[str, np.ndarray]:
    arrays = {k: _as_saved_array(k, v) for k, v in state.items()}
    if META_KEY in arrays:
        raise ValueError(f"state may not use the reserved key {META_KEY!r}")
    return arrays


def save_npz(path: str | os.PathLike, state: dict, meta: dict | None = None) -> Path:
    """Atomically write ``state`` (str -> array or int) and optional ``meta`` to ``path``."""
    arrays = _arrays(state)
    if meta is not None:
        arrays[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    return _atomic_write(Path(path), lambda fh: np.savez(fh, **arrays))


def _safetensors():
    try:
        import safetensors.numpy as stn
    except ImportError as exc:
        raise ModuleNotFoundError(
            "safetensors checkpoints need the safetensors package: pip install safetensors"
        ) from exc
    return stn


def save_safetensors(path: str | os.PathLike, state: dict, meta: dict | None = None) -> Path:
    """Atomically write ``state`` and optional ``meta`` as a safetensors file."""
    stn = _safetensors()
    arrays = {k: np.array(v, order="C") for k, v in _arrays(state).items()}  # keeps 0-d
    header = None if meta is None else {META_KEY: json.dumps(meta, sort_keys=True)}
    data = stn.save(arrays, metadata=header)
    return _atomic_write(Path(path), lambda fh: fh.write(data))


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict | None]:
    """Read a safetensors file; return ``(state, meta)``. Bad files raise ValueError."""
    stn = _safetensors()
    path = Path(path)
    raw_bytes = path.read_bytes()  # FileNotFoundError passes through
    try:
        raw = stn.load(raw_bytes)
        header_len = int.from_bytes(raw_bytes[:8], "little")
        header = json.loads(raw_bytes[8: 8 + header_len])
    except Exception as exc:  # truncated, corrupted or not safetensors at all
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    meta = None
    text = header.get("__metadata__", {}).get(META_KEY) if isinstance(header, dict) else None
    if text is not None:
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: metadata is not valid JSON") from exc
    return _unpack(raw), meta


def _unpack(raw: dict) -> dict:
    state: dict = {}
    for k, v in raw.items():
        state[k] = int(v) if v.ndim == 0 and v.dtype.kind in "iu" else v
    return state


def save_state(path: str | os.PathLike, state: dict, meta: dict | None = None) -> Path:
    """Write by suffix: ``.safetensors`` or (anything else) ``.npz``."""
    if str(path).endswith(".safetensors"):
        return save_safetensors(path, state, meta)
    return save_npz(path, state, meta)


def load_state(path: str | os.PathLike) -> tuple[dict, dict | None]:
    """Read by suffix: ``.safetensors`` or (anything else) ``.npz``."""
    if str(path).endswith(".safetensors"):
        return load_safetensors(path)
    return load_npz(path)


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
    return _unpack(raw), meta
