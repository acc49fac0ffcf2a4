"""``SyncBatchNorm`` on CPU: batch statistics over the processes of a ``torch.distributed``
(gloo) process group, through a reducer.

:class:`TorchDistReducer` runs the library's reducer protocol (:mod:`batchnorm._sync.protocol`:
headers first, so an error on any rank is raised on every rank before data moves; then the
O(C) statistics gathered and merged in rank order, bit-identical on every rank) over gloo's
non-blocking point-to-point and collective operations instead of MPI's. A waiting rank polls;
after :data:`batchnorm._sync.protocol.STALL_WARNING_SECONDS` it reports on stderr which ranks
have not arrived, and with ``timeout=`` it raises :class:`SyncTimeoutError` after that many
seconds (the process group is then unusable; the launcher tears the job down).
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from ..._sync.reducer import MpiReducer
from ...core.reduce import KIND_TRAIN, Call
from . import _bridge as B
from .function import BatchNormOp, apply
from .modules import NormBase, check_jit, eager

__all__ = ["SyncBatchNorm", "SyncTimeoutError", "TorchDistReducer"]


class SyncTimeoutError(TimeoutError):
    """A synchronized call waited longer than its reducer's timeout for missing ranks."""


class _Request:
    """A torch ``Work`` with mpi4py's ``Test()`` (errors of the operation are raised)."""

    def __init__(self, work) -> None:
        self.work = work

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        """Whether the operation completed."""
        if self.work is None:
            return True
        if not self.work.is_completed():
            return False
        self.work.wait()
        return True


class _WaitedRequest:
    """A point-to-point ``Work``, waited for by a helper thread: gloo's send and receive
    works only complete inside ``wait()``, so ``Test()`` reads what that thread saw."""

    def __init__(self, work) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.work = work
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        try:
            self.work.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the polling thread
            self.error = exc
        self.done.set()

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        """Whether the operation completed (its error raised here)."""
        if not self.done.is_set():
            return False
        if self.error is not None:
            raise self.error
        return True


class GlooComm:
    """The few mpi4py communicator methods the reducer protocol uses, over a process group.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The default (world) group when None; must be a gloo group (the exchanged buffers are
        host memory).
    """

    def __init__(self, group=None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "SyncBatchNorm needs torch.distributed initialized "
                "(torch.distributed.init_process_group('gloo', ...))"
            )
        self.group = dist.group.WORLD if group is None else group
        backend = str(dist.get_backend(self.group))
        if backend != "gloo":
            raise ValueError(
                f"batchnorm.torch.SyncBatchNorm exchanges host memory and needs a gloo process "
                f"group; this one uses {backend!r} (pass process_group=dist.new_group("
                "backend='gloo'), or use torch.nn.SyncBatchNorm for CUDA tensors with NCCL)"
            )
        self._rank, self._size = dist.get_rank(self.group), dist.get_world_size(self.group)

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        """Rank in the group."""
        return self._rank

    def Get_size(self) -> int:  # noqa: N802
        """Size of the group."""
        return self._size

    def _global(self, r: int) -> int:
        return r if self.group is dist.group.WORLD else dist.get_global_rank(self.group, r)

    def Isend(self, buf, dest: int, tag: int) -> _Request:  # noqa: N802
        """Non-blocking send of a NumPy buffer."""
        t = torch.from_numpy(buf)
        return _WaitedRequest(dist.isend(t, self._global(dest), group=self.group, tag=tag))

    def Irecv(self, buf, source: int, tag: int) -> _Request:  # noqa: N802
        """Non-blocking receive into a NumPy buffer."""
        t = torch.from_numpy(buf)
        return _WaitedRequest(dist.irecv(t, self._global(source), group=self.group, tag=tag))

    def Iallgather(self, send, recv) -> _Request:  # noqa: N802
        """Every rank's ``send`` into the rows of ``recv``."""
        outs = [torch.from_numpy(recv[r]) for r in range(self._size)]
        src = torch.from_numpy(send)
        return _Request(dist.all_gather(outs, src, group=self.group, async_op=True))

    def Ibcast(self, buf, root: int) -> _Request:  # noqa: N802
        """Broadcast ``buf`` from ``root`` in place."""
        t = torch.from_numpy(buf)
        return _Request(dist.broadcast(t, self._global(root), group=self.group, async_op=True))

    def Abort(self, code: int = 1) -> None:  # noqa: N802
        """Called by the protocol when the timeout is reached: raise on this rank."""
        raise SyncTimeoutError(
            "a synchronized batch-norm call timed out waiting for other ranks (see the message "
            "above); the process group can no longer be used"
        )


class TorchDistReducer(MpiReducer):
    """The library's reducer over a ``torch.distributed`` gloo group (module docstring).

    Parameters
    ----------
    group : ProcessGroup, optional
        Default: the world group.
    timeout : float, optional
        Seconds a rank waits for missing ranks before :class:`SyncTimeoutError`.
    """

    def __init__(self, group=None, timeout: float | None = None) -> None:
        super().__init__(GlooComm(group), timeout)

    def __repr__(self) -> str:
        return f"TorchDistReducer(rank={self.rank}, size={self.size}, timeout={self.timeout})"


class SyncOp(BatchNormOp):
    """Batch norm over a group, with torch's ``SyncBatchNorm`` gradients: ``dx`` from the
    group's gradient sums, ``dweight`` and ``dbias`` this rank's own sums (so that
    ``DistributedDataParallel``'s averaging treats them like every other parameter)."""

    def backward(self, dy, state):
        """``(dx, dgamma, dbeta)``, the last two over this rank's batch only."""
        dx, _, _ = super().backward(dy, state)
        cache = state.cache
        dyn = B.array(B.arrange(dy, state.view), state.view)
        ax = state.view.axis % dyn.ndim
        red = tuple(i for i in range(dyn.ndim) if i != ax)
        dyd = torch.as_tensor(dyn).double()
        xd = torch.as_tensor(cache.x).double()
        shape = [1] * dyn.ndim
        shape[ax] = -1
        mean = B.tensor(cache.mean, dyd, torch.float64).view(shape)
        inv = B.tensor(cache.inv_std, dyd, torch.float64)
        db = dyd.sum(red)
        dg = (dyd * (xd - mean)).sum(red) * inv
        return dx, dg, db


_REDUCERS: dict = {}


def reducer_for(group, timeout) -> TorchDistReducer:
    """The process's reducer for ``group`` and ``timeout`` (one per pair: the ranks number
    their synchronized calls alike)."""
    key = (id(group), timeout)
    red = _REDUCERS.get(key)
    if red is None or red.comm.group is not (dist.group.WORLD if group is None else group):
        red = _REDUCERS[key] = TorchDistReducer(group, timeout)
    return red


class SyncBatchNorm(NormBase):
    """Batch norm whose training statistics are those of every rank's batch together.

    A ``torch.nn.modules.batchnorm._BatchNorm`` (so ``update_bn``, fusion and user loops
    find it) but deliberately not a ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel``
    refuses every ``torch.nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only
    work with GPU modules"), and this layer exists to run on CPU. Torch's arguments; any
    ``(N, C, *)`` input; CPU tensors over a gloo group. In training, when
    ``torch.distributed`` is initialized and the group has more than one rank, the
    statistics are merged across the group exactly (ranks may hold uneven or empty batches)
    and so are the gradient sums of the backward; otherwise, and always in evaluation
    (which never waits for other ranks, as torch's), it is this process's batch norm.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats
        As :class:`batchnorm.torch.BatchNorm2d`.
    process_group : ProcessGroup, optional
        Default: the world group.
    device, dtype : optional
    bias : bool
        As torch's (keyword only).
    timeout : float, optional
        Seconds a rank waits for missing ranks before :class:`SyncTimeoutError` (None: report
        on stderr every 60 s, never give up).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        timeout: float | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group, self.timeout = process_group, timeout

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _reducer(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size(self.process_group) < 2:
            return None
        return reducer_for(self.process_group, self.timeout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize ``input``; in training with the statistics of the whole group."""
        red = self._reducer() if self.training else None
        if red is None:
            return NormBase.forward(self, input)
        return self._synchronized(input, red)

    @eager
    def _synchronized(self, input: torch.Tensor, red) -> torch.Tensor:
        check_jit(self)
        try:  # every rank checks before any rank exchanges: an error reaches every rank
            self.check_input(input)
            if input.device.type != "cpu":
                raise ValueError(f"input is on {input.device}; this SyncBatchNorm runs on CPU")
        except Exception as exc:  # noqa: BLE001
            red.agree(Call("batch_norm_train", KIND_TRAIN), exc)
        op = SyncOp(self.eps, None, None, red)
        y = apply(op, input, self.weight, self.bias)
        if self.training and self.track_running_stats:
            if op.stats.count < 2:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got "
                    f"{op.stats.count} over all ranks"
                )
            self.update_running(op.stats)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None):
        """``module`` with every batch-norm layer (torch's or this library's ``BatchNorm*d``)
        replaced by a :class:`SyncBatchNorm` sharing its parameters and buffers.

        Parameters
        ----------
        module : torch.nn.Module
        process_group : ProcessGroup, optional

        Returns
        -------
        torch.nn.Module
            ``module`` itself (children replaced), or the new layer when it is one.
        """
        from .convert import replace_modules, sync_target

        return replace_modules(module, sync_target(cls, process_group))
