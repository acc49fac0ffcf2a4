"""File-level writing behind :mod:`batchnorm.checkpoint`: atomic writes of a checkpoint
(a temporary file beside the target, flushed, renamed over it, the folder synced), the
cleanup of temporaries that crashed writers left behind, and the npz writer. The reading
is :mod:`batchnorm._checkpoint_io`.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

#: A temporary file whose writer is gone is removed once it is this old (seconds) ...
STALE_DEAD_WRITER_S = 60.0
#: ... and any temporary file of the same target once it is this old (PID reuse, Windows).
STALE_ANY_S = 24 * 3600.0


# ----------------------------------------------------------------------------- writing
def _temp_stem(name: str) -> str:
    return name[:180]  # leaves room for ".<pid>.<hex>.tmp" within 255 bytes


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never signal a process group; keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OverflowError, OSError):
        return False  # not a valid PID on this system
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporaries of earlier saves of ``target`` whose writer is gone.

    A temporary is named ``.<name>.<pid>.<8 hex>.tmp`` beside ``target``. It is removed when
    its writer process no longer exists and it is older than :data:`STALE_DEAD_WRITER_S`, or
    when it is older than :data:`STALE_ANY_S` whatever its PID says. Errors are ignored: the
    clean-up never makes a save fail. Returns the paths removed.
    """
    pattern = re.compile(
        re.escape(f".{_temp_stem(target.name)}.") + r"(\d{1,20})\.[0-9a-f]{8}\.tmp"
    )
    check_pids = os.name == "posix"  # os.kill(pid, 0) terminates the process on Windows
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            pid = int(match.group(1))
            dead = check_pids and pid != os.getpid() and not _pid_alive(pid)
            if (dead and age > STALE_DEAD_WRITER_S) or age > STALE_ANY_S:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def resolve_target(path: Path) -> Path:
    """The regular file that a save to ``path`` writes (a symlink is followed).

    Raises FileNotFoundError if the folder does not exist, IsADirectoryError if the target is
    a folder, ValueError if it exists but is not a regular file or is a symlink loop.
    """
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path
    if os.path.islink(target):
        raise ValueError(f"cannot save to {path}: the symbolic link does not resolve (a loop?)")
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"cannot save to {path}: folder {folder} does not exist", str(path)
        )
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot save to {path}: it is a folder", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"cannot save to {path}: it exists and is not a regular file")
    return target


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); a folder that cannot be opened is left alone."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(fh)`` on a new temporary file beside the target, then move it into place.

    See :func:`batchnorm.checkpoint.save_state` for the file mode and symlink rules.
    Returns ``path``.
    """
    target = resolve_target(path)
    remove_stale_temporaries(target)
    try:
        old_mode = stat.S_IMODE(os.stat(target).st_mode) & 0o777
    except FileNotFoundError:
        old_mode = None
    tmp = target.with_name(f".{_temp_stem(target.name)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if old_mode is not None:
            os.chmod(tmp, old_mode)  # overwriting keeps the file's permissions
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# ----------------------------------------------------------------------------- npz
def write_npz(fh: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed npz (what :func:`numpy.savez` writes).

    Written member by member rather than through ``np.savez(fh, **arrays)``, whose own
    keyword arguments (``file``, ``allow_pickle``) would capture state keys of those names.
    """
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as fp:
                npy_format.write_array(fp, arr, allow_pickle=False)
