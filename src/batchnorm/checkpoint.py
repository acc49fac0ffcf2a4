"""Saving and loading state dicts without pickle: ``.npz`` and ``.safetensors``.

Reading
    NumPy ``.npz`` archives are read member by member: every member must be a ``.npy`` array
    of a numeric dtype (bool, int, uint, float); the metadata member ``__meta__`` a 0-d
    unicode string. Safetensors files (the safetensors package, optional) hold raw tensors
    and a JSON header. Nothing is ever unpickled. Before any array data is read, the sizes a
    file declares (zip directory, ``.npy`` headers, safetensors header) are checked against
    each other and against ``max_bytes`` (:data:`MAX_BYTES` unless given), so a small or
    highly compressed hostile file cannot make the reader allocate much memory. Invalid files
    raise :class:`ValueError` naming the path; a missing file raises FileNotFoundError and a
    folder IsADirectoryError.

Writing
    A state is written to a new temporary file ``.<name>.<pid>.<random>.tmp`` beside the
    target and moved into place with :func:`os.replace`, so a crash while saving never leaves
    a half-written checkpoint under the final name. A new file gets the usual permissions
    (``0o666`` less the umask); overwriting keeps the existing file's ``rwx`` permission bits
    (not its owner, ACLs or extended attributes: the file is a new one). Saving to a symbolic
    link writes through it: the file the link points to is replaced, beside itself, and the
    link stays. Saving over a folder or another non-regular file (a FIFO, a device) is
    refused. Temporaries left behind by a killed save are removed by the next save of the
    same path once their writer process is gone and they are a minute old, or once they are a
    day old (see :func:`batchnorm._checkpoint_write.remove_stale_temporaries`); loading opens
    only the exact path, never a temporary. The size cap applies to reading only: a state
    over :data:`MAX_BYTES` is saved, and read back with a larger ``max_bytes``.

Metadata (the layer's configuration) travels as a JSON object: under the reserved key
``__meta__`` in npz, in the header's ``__metadata__`` in safetensors. Integers such as
``num_batches_tracked`` are stored as 0-d int64 arrays and come back as Python ints, so a
state read by :func:`load_state` is written back identically by :func:`save_state`.
:func:`layer_config` checks the configuration a layer's ``save`` stores.

:func:`save_state` / :func:`load_state` pick the format from the file suffix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import _checkpoint_io as _io
from . import _checkpoint_write as _write
from ._checkpoint_meta import (  # what the metadata record: configuration, state version
    MAX_FEATURES,
    MIGRATIONS,  # noqa: F401 - batchnorm.checkpoint.MIGRATIONS (documented)
    STATE_VERSION,
    check_version,
    layer_config,
    migrate,
    state_version,
)
from ._statedict import check_state_dict  # the layer state-dict checks live beside these
from ._validation import check_state_array  # the one check of arrays entering as state

__all__ = [
    "MAX_BYTES",
    "MAX_FEATURES",
    "STATE_VERSION",
    "check_version",
    "migrate",
    "state_version",
    "check_state_array",
    "check_state_dict",
    "layer_config",
    "load_npz",
    "load_safetensors",
    "load_state",
    "save_npz",
    "save_safetensors",
    "save_state",
]

META_KEY = "__meta__"
#: Default cap (bytes) on the array data a checkpoint may declare: 256 MiB, room for 32
#: million float64 features times four per-feature vectors. Pass ``max_bytes=`` to change it.
MAX_BYTES = 256 << 20


# ----------------------------------------------------------------------------- saving
def _arrays(path: Path, state: Mapping) -> dict[str, np.ndarray]:
    if not isinstance(state, Mapping):
        raise TypeError(f"cannot save {path}: state must be a dict; got {type(state).__name__}")
    arrays = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or "\x00" in key:
            raise TypeError(
                f"cannot save {path}: state keys must be non-empty str without NUL; got {key!r}"
            )
        if key == META_KEY:
            raise ValueError(f"cannot save {path}: the key {META_KEY!r} is reserved")
        try:
            arr = np.asarray(value)
        except (ValueError, OverflowError) as exc:
            raise TypeError(f"cannot save {path}: state[{key!r}] is not an array ({exc})") from exc
        if arr.dtype.kind not in _io.NUMERIC_KINDS or arr.dtype.fields is not None:
            raise TypeError(
                f"cannot save {path}: state[{key!r}] has dtype {arr.dtype}; only bool, int, "
                "uint and float arrays are saved (object arrays would need pickle)"
            )
        arrays[key] = arr
    return arrays


def _meta_text(path: Path, meta: dict | None) -> str | None:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise TypeError(f"cannot save {path}: meta must be a dict or None; got {type(meta)}")
    try:
        text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"cannot save {path}: meta is not JSON-serializable ({exc})") from exc
    if len(text) * 4 > _io.MAX_META_BYTES:
        raise ValueError(
            f"cannot save {path}: meta is {len(text)} characters of JSON; at most "
            f"{_io.MAX_META_BYTES // 4} can be read back"
        )
    return text


def save_npz(path: str | os.PathLike, state: Mapping, meta: dict | None = None) -> Path:
    """Atomically write ``state`` and optional ``meta`` as an uncompressed ``.npz``.

    Parameters
    ----------
    path : str or os.PathLike
        Target file (a symbolic link is written through). Its folder must exist.
    state : Mapping
        ``str -> array or int``; arrays must be bool, int, uint or float.
    meta : dict or None
        JSON-serializable metadata, stored under ``__meta__``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    TypeError
        A key, value or ``meta`` that cannot be stored.
    FileNotFoundError, IsADirectoryError, ValueError
        The folder is missing, ``path`` is a folder or another non-regular file.
    """
    path = Path(path)
    arrays = _arrays(path, state)
    text = _meta_text(path, meta)
    if text is not None:
        arrays[META_KEY] = np.array(text)
    return _write.atomic_write(path, lambda fh: _write.write_npz(fh, arrays))


def _safetensors():
    try:
        import safetensors.numpy as stn
    except ImportError as exc:
        raise ModuleNotFoundError(
            "safetensors checkpoints need the safetensors package: pip install safetensors"
        ) from exc
    return stn


def save_safetensors(path: str | os.PathLike, state: Mapping, meta: dict | None = None) -> Path:
    """Atomically write ``state`` and optional ``meta`` as a safetensors file.

    Same parameters, return value and errors as :func:`save_npz`. Big-endian arrays are
    stored little-endian (safetensors has no byte order); dtypes safetensors cannot hold
    (``longdouble``) raise TypeError.
    """
    stn = _safetensors()
    path = Path(path)
    arrays = {}
    for key, arr in _arrays(path, state).items():
        little = arr.dtype.newbyteorder("<")
        if little not in _io.SAFETENSORS_DTYPES.values():
            raise TypeError(
                f"cannot save {path}: safetensors cannot hold state[{key!r}] of dtype {arr.dtype}"
            )
        arrays[key] = np.array(arr, dtype=little, order="C")  # keeps 0-d
    text = _meta_text(path, meta)
    data = stn.save(arrays, metadata=None if text is None else {META_KEY: text})
    return _write.atomic_write(path, lambda fh: fh.write(data))


def save_state(path: str | os.PathLike, state: Mapping, meta: dict | None = None) -> Path:
    """Write by suffix: ``.safetensors`` via :func:`save_safetensors`, anything else npz.

    Parameters
    ----------
    path : str or os.PathLike
        Target file.
    state : Mapping
        ``str -> array or int``.
    meta : dict or None
        JSON-serializable metadata.

    Returns
    -------
    Path
        ``path``.
    """
    if str(path).endswith(".safetensors"):
        return save_safetensors(path, state, meta)
    return save_npz(path, state, meta)


# ----------------------------------------------------------------------------- loading
def _parse_meta(path: Path, text: str) -> dict:
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: metadata {META_KEY!r} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(
            f"{path}: metadata {META_KEY!r} must be a JSON object; found a "
            f"{type(meta).__name__}: {text[:80]!r}"
        )
    return meta


def _check_max_bytes(max_bytes: object) -> int:
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
        raise TypeError(f"max_bytes must be an int; got {type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0; got {max_bytes}")
    return max_bytes


def _unpack(raw: dict[str, np.ndarray]) -> dict:
    # a 0-d int64 is how save stores a Python int: give the int back; keep other 0-d arrays
    return {k: int(v) if v.shape == () and v.dtype == np.int64 else v for k, v in raw.items()}


def load_npz(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES) -> tuple[dict, dict | None]:
    """Read a file written by :func:`save_npz`.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file.
    max_bytes : int
        Cap on the uncompressed size of all members together, checked before reading.

    Returns
    -------
    state : dict
        ``str -> ndarray``; 0-d int64 arrays come back as Python ints.
    meta : dict or None
        The metadata object, or None if the file has none.

    Raises
    ------
    ValueError
        Not a zip archive, truncated or corrupt, a member that is not a numeric ``.npy``
        array, declared sizes inconsistent or over ``max_bytes``, metadata not a JSON object.
    FileNotFoundError, IsADirectoryError
        ``path`` is missing or a folder.
    """
    path = Path(path)
    raw = _io.read_npz(path, _check_max_bytes(max_bytes), META_KEY)
    meta = _parse_meta(path, str(raw.pop(META_KEY)[()])) if META_KEY in raw else None
    return _unpack(raw), meta


def load_safetensors(
    path: str | os.PathLike, *, max_bytes: int = MAX_BYTES
) -> tuple[dict, dict | None]:
    """Read a safetensors file; same parameters, returns and errors as :func:`load_npz`.

    The header (length, JSON, dtypes, shapes, offsets) is checked before the data is read and
    handed to the safetensors package.
    """
    stn = _safetensors()
    path = Path(path)
    data, header = _io.read_safetensors_checked(path, _check_max_bytes(max_bytes))
    try:
        raw = stn.load(data)
    except Exception as exc:  # noqa: BLE001 - whatever the parser refuses means "bad file"
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    text = header.get("__metadata__", {}).get(META_KEY)
    meta = None if text is None else _parse_meta(path, text)
    return _unpack(raw), meta


def load_state(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES) -> tuple[dict, dict | None]:
    """Read by suffix: ``.safetensors`` via :func:`load_safetensors`, anything else npz.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint.
    max_bytes : int
        Cap on the array data the file may declare.

    Returns
    -------
    state : dict
        ``str -> ndarray or int``.
    meta : dict or None
        The metadata object.
    """
    if str(path).endswith(".safetensors"):
        return load_safetensors(path, max_bytes=max_bytes)
    return load_npz(path, max_bytes=max_bytes)
