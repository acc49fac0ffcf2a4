"""Writing a set of output files all at once: nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ._stop import deferred

__all__ = ["staged_folder"]


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder inside ``out`` whose files replace those of ``out`` at the end.

    The files are written into a hidden folder next to their destination (same file
    system); when the block ends normally each one is moved into ``out`` with
    :func:`os.replace` (atomic per file), with SIGINT and SIGTERM held back so that the set
    is moved whole. When the block raises (an error, Ctrl-C), the scratch folder is removed
    and ``out`` keeps what it had.

    Parameters
    ----------
    out : path
        The output folder (created if missing).

    Yields
    ------
    Path
        The scratch folder to write into (flat: no sub-folders).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        yield stage
        with deferred():
            for f in sorted(stage.iterdir()):
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
