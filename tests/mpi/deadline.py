"""MPI scenario: a reducer's timeout is a deadline for the whole synchronized call.

Run as ``mpiexec -n R python deadline.py LATE``. Every rank but the last calls
``gather`` through a reducer with ``timeout=4``; the last rank (no timeout) arrives at the
header exchange LATE seconds late and at the payload another LATE seconds later. With
LATE=2.8 each wait is shorter than the timeout but the call takes 5.6 s: the waiting ranks
abort the job (a per-wait timeout let it complete). With LATE=1 the call takes about 2 s
and completes.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from mpi4py import MPI

from batchnorm._sync import protocol as P
from batchnorm.core.reduce import KIND_METRICS, Call
from batchnorm.distributed import MpiReducer

late = float(sys.argv[1])
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
call = Call("deadline_probe", KIND_METRICS)
vector = np.full(3, float(rank))
if rank == size - 1:
    red = MpiReducer(comm, None)
    time.sleep(late)
    table = red.agree(call, None, nfeat=3)
    time.sleep(late)
    recv = P.allgather(red, vector, call, int(table[0, P.COL_SEQ]))
else:
    red = MpiReducer(comm, timeout=4)
    recv = red.gather(call, vector)[1]
assert [float(r[0]) for r in recv] == [float(r) for r in range(size)]
print(f"rank {rank} completed", flush=True)
