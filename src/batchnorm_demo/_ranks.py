"""Fatal errors of a command that may run on several MPI ranks: decided together, printed once.

:func:`collectively` runs a step that may fail on some ranks (checking the output folder,
loading the data) and turns any failure into the same
:class:`batchnorm.distributed.DistributedError` on every rank, carrying the first failing
rank's message (exchanged as bytes, nothing pickled). :func:`print_fatal` prints a fatal
error as one line, in one write: errors raised on every rank (``DistributedError``) only on
rank 0; any other error on the rank that has it, naming that rank when it is not rank 0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import numpy as np

from batchnorm.distributed import DistributedError

__all__ = ["collectively", "print_fatal", "rank_and_size"]

_MESSAGE_BYTES = 1000

# environment variables set by MPI launchers: (rank, size) of MPICH/Hydra, Open MPI, PMIx
_LAUNCHER_ENV = (
    ("PMI_RANK", "PMI_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMIX_RANK", "PMIX_SIZE"),
)


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of ranks (``(0, 1)`` outside an MPI job).

    MPI is asked when mpi4py is already initialized; otherwise the launcher's environment
    variables are read (mpi4py is never imported here).

    Returns
    -------
    tuple of int
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()
    for rank, size in _LAUNCHER_ENV:
        if os.environ.get(rank, "").isdigit():
            n = os.environ.get(size, "")
            return int(os.environ[rank]), int(n) if n.isdigit() else 1
    return 0, 1


def print_fatal(command: str, exc: BaseException, file=None) -> bool:
    """Print ``batchnorm <command>: error: <exc>`` once across the ranks; return whether
    this rank printed it.

    Parameters
    ----------
    command : str
        The subcommand.
    exc : BaseException
        The error.
    file : text stream, optional
        Default ``sys.stderr``.

    Returns
    -------
    bool
    """
    rank, size = rank_and_size()
    if rank != 0 and isinstance(exc, DistributedError):
        return False  # raised on every rank: rank 0 prints it
    where = f" (rank {rank} of {size})" if rank != 0 else ""
    # a rank other than 0 may write while rank 0's progress line is open: start a new line
    lead = "\n" if rank != 0 else ""
    stream = sys.stderr if file is None else file
    stream.write(f"{lead}batchnorm {command}{where}: error: {exc}\n")
    stream.flush()
    return True


def collectively(comm, step: Callable[[], object], what: str):
    """Run ``step()`` on every rank of ``comm``; if it fails on any rank, raise the same
    :class:`DistributedError` on every rank, with the first failing rank's message.

    Parameters
    ----------
    comm : mpi4py communicator
    step : callable
        What every rank runs (it may do nothing on some ranks).
    what : str
        Named in the message when a rank other than 0 failed.

    Returns
    -------
    object
        ``step()``'s result on this rank.
    """
    result, message = None, b""
    try:
        result = step()
    except (ValueError, TypeError, OSError) as exc:
        message = (str(exc) or type(exc).__name__).encode()[:_MESSAGE_BYTES] or b"?"
    mine = np.zeros(_MESSAGE_BYTES, np.uint8)
    mine[: len(message)] = np.frombuffer(message, np.uint8)
    everyone = np.zeros((comm.Get_size(), _MESSAGE_BYTES), np.uint8)
    comm.Allgather(mine, everyone)
    failed = [r for r in range(comm.Get_size()) if everyone[r].any()]
    if failed:
        r = failed[0]
        text = bytes(everyone[r]).rstrip(b"\0").decode(errors="replace")
        raise DistributedError(text if r == 0 else f"{what} failed on rank {r}: {text}")
    return result
