"""File-level reading behind :mod:`batchnorm.checkpoint`: bounded readers (the writing is
:mod:`batchnorm._checkpoint_write`).

Nothing here unpickles, and nothing allocates memory for array data before the sizes that a
file declares have been checked against a cap and against each other:

* npz: the zip end-of-central-directory record, then every member's declared uncompressed
  size, then every ``.npy`` header (dtype and shape) are checked before any data is read;
  :class:`zipfile.ZipExtFile` never returns more than a member's declared size.
* safetensors: the 8-byte header length and the JSON header (dtypes, shapes, offsets) are
  parsed and checked before the file's data is read.

Every error names the path; invalid files raise :class:`ValueError`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

#: npy dtype kinds a checkpoint array may have: bool, signed and unsigned int, float.
NUMERIC_KINDS = "biuf"
#: Largest ``.npy`` header accepted (NumPy's own default limit).
MAX_NPY_HEADER = 10_000
#: Largest zip central directory read (a few thousand members).
MAX_ZIP_DIRECTORY_BYTES = 1 << 20
#: Largest metadata string (the ``__meta__`` member of an npz) read.
MAX_META_BYTES = 1 << 20
#: Largest safetensors JSON header read.
MAX_SAFETENSORS_HEADER_BYTES = 1 << 20
SAFETENSORS_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}


def _bad_npz(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a readable npz checkpoint: {why}")


def _check_zip_directory(fh: BinaryIO, path: Path, size: int) -> None:
    """Refuse an oversized central directory before zipfile parses it."""
    tail_len = min(size, 22 + 0xFFFF)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise _bad_npz(path, "no zip end-of-directory record (truncated?)")
    entries = int.from_bytes(tail[at + 10 : at + 12], "little")
    dir_bytes = int.from_bytes(tail[at + 12 : at + 16], "little")
    if dir_bytes != 0xFFFFFFFF and dir_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise _bad_npz(
            path,
            f"its zip directory declares {dir_bytes} bytes ({entries} members); "
            f"at most {MAX_ZIP_DIRECTORY_BYTES} are read",
        )


def _npy_header(fp: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(fp)  # ValueError if not .npy
    if version == (1, 0):
        return npy_format.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)
    raise ValueError(f".npy format version {version} is not read (1.0 or 2.0 needed)")


def open_regular(path: Path):
    """Open ``path`` for reading only if it is a regular file (a FIFO or a device would block
    or never end): checked before opening (``stat``) and again on the open file."""
    st = os.stat(path)  # FileNotFoundError names the path
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot load {path}: it is a folder", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"cannot load {path}: it is not a regular file (a FIFO, a device?)")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    fh = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between stat and open
        fh.close()
        raise ValueError(f"cannot load {path}: it is not a regular file")
    return fh


def read_npz(path: Path, max_bytes: int, meta_key: str) -> dict[str, np.ndarray]:
    """Read every array of an npz archive after checking what it declares.

    Each member must be a ``.npy`` file holding a numeric array (``meta_key``: a 0-d unicode
    string), and the members' uncompressed sizes together at most ``max_bytes``.
    """
    with open_regular(path) as fh:  # FileNotFoundError names the path
        size = os.fstat(fh.fileno()).st_size
        magic = fh.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise _bad_npz(path, f"it is not a zip archive (it starts with {magic!r})")
        if size > max_bytes + max_bytes // 64 + (4 << 20):
            raise _bad_npz(path, f"the file has {size} bytes; the limit is max_bytes={max_bytes}")
        _check_zip_directory(fh, path, size)
        fh.seek(0)
        try:
            with zipfile.ZipFile(fh) as zf:
                return _read_members(zf, path, max_bytes, meta_key)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError) as exc:
            raise _bad_npz(path, f"{type(exc).__name__}: {exc}") from exc
        except (NotImplementedError, RuntimeError) as exc:  # unsupported compression, password
            raise _bad_npz(path, f"{type(exc).__name__}: {exc}") from exc


def _read_members(
    zf: zipfile.ZipFile, path: Path, max_bytes: int, meta_key: str
) -> dict[str, np.ndarray]:
    infos = zf.infolist()
    names = [info.filename for info in infos]
    for name in names:
        if not name.endswith(".npy"):
            raise _bad_npz(path, f"member {name!r} is not a .npy array")
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        raise _bad_npz(path, f"members {dupes} occur more than once")
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        raise _bad_npz(
            path,
            f"its {len(infos)} members declare {total} bytes uncompressed; the limit is "
            f"max_bytes={max_bytes}",
        )
    out: dict[str, np.ndarray] = {}
    for info in infos:
        key = info.filename[:-4]
        with zf.open(info) as fp:
            try:
                shape, _, dtype = _npy_header(fp)
            except ValueError as exc:
                raise _bad_npz(path, f"member {info.filename!r}: {exc}") from exc
            header_len = fp.tell()
        _check_member(path, info, key, meta_key, shape, dtype, header_len)
        with zf.open(info) as fp:
            try:
                arr = npy_format.read_array(fp, allow_pickle=False, max_header_size=MAX_NPY_HEADER)
            except ValueError as exc:
                raise _bad_npz(path, f"member {info.filename!r}: {exc}") from exc
        out[key] = arr
    return out


def _check_member(
    path: Path,
    info: zipfile.ZipInfo,
    key: str,
    meta_key: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    header_len: int,
) -> None:
    name = info.filename
    if key == meta_key:
        if dtype.kind != "U" or shape != ():
            raise _bad_npz(
                path,
                f"metadata member {name!r} must be a 0-d unicode string; it is {dtype} "
                f"of shape {shape}",
            )
        if dtype.itemsize > MAX_META_BYTES:
            raise _bad_npz(
                path,
                f"metadata member {name!r} has {dtype.itemsize} bytes; at most "
                f"{MAX_META_BYTES} are read",
            )
    elif dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype:
        raise _bad_npz(
            path,
            f"member {name!r} has dtype {dtype}; only bool, int, uint and float arrays are "
            "read (object arrays would need pickle, which is never used)",
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if header_len + nbytes != info.file_size:
        raise _bad_npz(
            path,
            f"member {name!r} declares shape {shape} of {dtype} ({nbytes} bytes) but holds "
            f"{info.file_size - header_len} bytes of data",
        )


# ----------------------------------------------------------------------------- safetensors
def _bad_st(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors checkpoint: {why}")


def _check_tensor_entry(path: Path, key: str, entry: object) -> tuple[int, int, np.dtype]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad_st(path, f"header entry {key!r} is not {{dtype, shape, data_offsets}}")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise _bad_st(
            path,
            f"tensor {key!r} has dtype {entry['dtype']!r}; one of "
            f"{sorted(SAFETENSORS_DTYPES)} is needed",
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
        raise _bad_st(path, f"tensor {key!r} has shape {shape!r}; a list of counts is needed")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise _bad_st(path, f"tensor {key!r} has data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise _bad_st(
            path,
            f"tensor {key!r} declares shape {tuple(shape)} of {entry['dtype']} ({nbytes} bytes)"
            f" but data_offsets {offsets} span {end - begin} bytes",
        )
    return begin, end, dtype


def _is_count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def read_safetensors_checked(path: Path, max_bytes: int) -> tuple[bytes, dict]:
    """Return the whole file and its parsed header after checking the header.

    The header must be a JSON object whose entries (besides ``__metadata__``, a str -> str
    object) describe tensors that exactly tile the data section, at most ``max_bytes`` long.
    """
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise _bad_st(path, f"it has {size} bytes, fewer than the 8-byte header length")
        header_len = int.from_bytes(head, "little")
        if header_len > MAX_SAFETENSORS_HEADER_BYTES:
            raise _bad_st(
                path,
                f"its header declares {header_len} bytes; at most "
                f"{MAX_SAFETENSORS_HEADER_BYTES} are read",
            )
        if 8 + header_len > size:
            raise _bad_st(path, f"its header declares {header_len} bytes but the file has {size}")
        header_bytes = fh.read(header_len)
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _bad_st(path, f"its header is not JSON ({type(exc).__name__}: {exc})") from exc
        if not isinstance(header, dict):
            raise _bad_st(path, f"its header is a JSON {type(header).__name__}, not an object")
        metadata = header.get("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _bad_st(path, "its __metadata__ is not an object of strings")
        spans = sorted(
            _check_tensor_entry(path, k, v)[:2] + (k,)
            for k, v in header.items()
            if k != "__metadata__"
        )
        data_len = size - 8 - header_len
        pos = 0
        for begin, end, key in spans:
            if begin != pos:
                raise _bad_st(path, f"tensor {key!r} starts at data offset {begin}, expected {pos}")
            pos = end
        if pos > max_bytes:
            raise _bad_st(
                path, f"its tensors declare {pos} bytes; the limit is max_bytes={max_bytes}"
            )
        if pos != data_len:
            raise _bad_st(
                path, f"its tensors declare {pos} bytes of data but the file holds {data_len}"
            )
        data = fh.read(data_len)
        if len(data) != data_len:
            raise _bad_st(path, "the file changed while it was read")
    return head + header_bytes + data, header
