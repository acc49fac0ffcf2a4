"""What several commands share: the output-folder check and the once-only compile notice."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["check_out", "notice_once"]


def notice_once() -> Callable[[], None]:
    """A function that prints :data:`batchnorm_demo.warmup.COMPILE_NOTICE` once on stderr.

    Returns
    -------
    callable
        Takes no argument; the first call prints the notice (through ``tqdm.write`` when tqdm
        is installed, so that an active progress bar stays intact), later calls do nothing.
    """
    from ._progress import tqdm_class
    from .warmup import COMPILE_NOTICE

    tqdm = tqdm_class()
    said = []

    def say() -> None:
        if not said:
            said.append(True)
            if tqdm is None:  # no bar can be active: a plain line
                print(COMPILE_NOTICE, file=sys.stderr)
            else:  # tqdm.write keeps an active progress bar intact
                tqdm.write(COMPILE_NOTICE, file=sys.stderr)
            sys.stderr.flush()

    return say


def check_out(out: str) -> Path:
    """Refuse an output folder that cannot be one (before any work is done); create it.

    Parameters
    ----------
    out : str
        The ``--out`` value.

    Returns
    -------
    pathlib.Path
        The folder, which exists and is writable.

    Raises
    ------
    ValueError
        ``out`` is a file, cannot be created or is not writable (the message names it).
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"--out {out} exists and is not a folder; name a folder (it is created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror})") from exc
    if not os.access(path, os.W_OK):
        raise ValueError(f"--out {out}: the folder is not writable")
    return path
