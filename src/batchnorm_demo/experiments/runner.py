"""Plan, run (on a pool of spawned workers) and collect every run of the demo.

Two phases. Phase 1: the learning-rate sweep (every arm x every rate x every seed on the main
dataset, trained on the training part minus a validation split, with distribution probes and
the ICS measure) and the deep networks (their own small sweep). Phase 2 starts once the sweep
is done, because it uses each arm's rate chosen on validation: the small initial scale, the
regularization runs on MNIST-1D and the ghost-batch sweep (on the main dataset). Phase-1 runs
still in the queue keep the workers busy meanwhile.

Every run's generators are derived from its seed index only, so the results are identical
whatever the number of workers and whatever order the runs finish in.

Stopping: the workers ignore SIGINT (a Ctrl-C reaches the whole process group, and a worker
must not turn it into a failed run and go on to the next one); the main process decides. On
any exception in the main process (``Stopped``, raised for SIGINT and SIGTERM by ``_stop``, or a
failed run) the queued runs are cancelled and the workers are terminated at once, instead of
waiting for every queued run. A worker whose parent has gone (the main process was killed)
exits by itself within a second.

The plan and the cost model are in :mod:`.plan`, the arrangement of the outputs in
:mod:`.collect`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .._stop import STOP_SIGNALS, check, deferred
from ..data import Dataset, load_dataset, validation_split
from .collect import collect
from .ioffe import ARMS, IoffeConfig, RunSpec
from .lockstep import train_group
from .plan import (
    estimated_cost,
    make_groups,
    plan_phase1,
    plan_phase2,
    select_lr,
    selected_rates,
    weight_total,
)

# share of the whole run spent starting the worker processes (measured: 4-6 s of ~250 s)
STARTUP_SHARE = 0.02
# what a worker puts on the progress queue when it starts compiling numba kernels
_COMPILING = "compiling"
# seconds between a worker's checks that its parent is still alive
_PARENT_POLL_S = 0.5

__all__ = ["collect", "estimated_cost", "plan_phase1", "plan_phase2", "run", "select_lr"]


# ----------------------------------------------------------------------------- workers
@contextlib.contextmanager
def _one_numba_thread():
    """Run numba's kernels on one thread inside the block, as the worker processes do.

    One thread is faster for these small arrays, and the same thread count everywhere makes
    the results bit-identical whatever the number of workers.
    """
    try:
        import numba
    except ImportError:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _run_serial(config, entropies, phase1, train, val, get_reg, weight, total, progress, startup):
    """Both phases in this process, in order; returns (outputs, phase-2 specs)."""
    done = startup  # nothing to start here
    outputs: dict[RunSpec, dict] = {}

    def tick(w):
        def f(k):
            nonlocal done
            done += k * w
            check()  # a stop whose first raise something swallowed
            if progress:
                progress(min(done, total), total)

        return f

    for group in make_groups(phase1):
        outs = train_group(list(group), train, config, val=val, progress=tick(weight(group)))
        outputs.update(zip(group, outs, strict=True))
    selected = selected_rates(config, phase1, outputs)
    phase2 = plan_phase2(config, entropies, selected)
    for group in make_groups(phase2):
        data = get_reg() if group[0].dataset == "reg" else train
        outs = train_group(list(group), data, config, val=None, progress=tick(weight(group)))
        outputs.update(zip(group, outs, strict=True))
    return outputs, phase2


_progress_queue = None
_worker_data: dict | None = None


def _save_shared(folder: str, train: Dataset, x_val: np.ndarray, y_val: np.ndarray) -> str:
    """Write the data every worker needs into ``folder``; return the file's path."""
    path = os.path.join(folder, "main.npz")
    np.savez(
        path,
        name=np.array(train.name),
        description=np.array(train.description),
        x_train=train.x_train,
        y_train=train.y_train,
        x_test=train.x_test,
        y_test=train.y_test,
        x_val=x_val,
        y_val=y_val,
    )
    return path


def _load_shared(path: str) -> dict:
    """The workers' data from :func:`_save_shared`'s file (no pickle)."""
    with np.load(path, allow_pickle=False) as f:
        a = {k: f[k] for k in f.files}
    main = Dataset(
        str(a["name"]), a["x_train"], a["y_train"], a["x_test"], a["y_test"], str(a["description"])
    )
    return {"main": main, "val": (a["x_val"], a["y_val"])}


def _exit_when_orphaned(parent: int, shared: str) -> None:
    """Leave at once once ``parent`` is gone (it was killed: no one is left to report to),
    removing the shared data folder it could not remove."""
    while True:
        if os.getppid() != parent:
            shutil.rmtree(shared, ignore_errors=True)
            os._exit(1)
        time.sleep(_PARENT_POLL_S)


def _worker_init(queue, data_path: str, parent: int) -> None:
    global _progress_queue, _worker_data
    # the main process decides what a Ctrl-C means (it terminates the workers); SIGINT was
    # blocked since the spawn (see _stop.deferred), so a pending one is dropped here,
    # and a pending SIGTERM (the main process stopping us already) ends this process now
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _progress_queue, _worker_data = queue, _load_shared(data_path)
    shared = os.path.dirname(data_path)
    threading.Thread(target=_exit_when_orphaned, args=(parent, shared), daemon=True).start()
    from ..warmup import announce_compiles

    # tell the main process once when this worker starts compiling (it prints the notice)
    announce_compiles(lambda: queue.put(_COMPILING))
    try:  # one BLAS thread per worker process: the workers already use the cores
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    try:  # likewise one numba thread: two workers' thread pools contending for two cores
        import numba  # made a 500-row BatchNorm call 15-80x slower (7-34 ms instead of 0.4)

        numba.set_num_threads(1)
    except (ImportError, ValueError):
        pass


def _stop_workers(pool: ProcessPoolExecutor, workers: list) -> None:
    """Cancel the queued runs and terminate the worker processes now (SIGTERM, then SIGKILL)."""
    pool.shutdown(wait=False, cancel_futures=True)
    for p in workers:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 2  # a worker still starting has SIGTERM blocked
    for p in workers:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=1)


def _task(group: tuple, config: IoffeConfig, weight: float, reg: Dataset | None) -> list:
    def report(k: int) -> None:
        if _progress_queue is not None:
            _progress_queue.put(k * weight)

    data, val = (
        (_worker_data["main"], _worker_data["val"]) if group[0].dataset == "main" else (reg, None)
    )
    return train_group(list(group), data, config, val=val, progress=report)


def run(
    config: IoffeConfig,
    rng: np.random.Generator,
    *,
    data: Dataset,
    reg_data: Dataset | Callable[[], Dataset] | None = None,
    progress: Callable[[float, float], None] | None = None,
    on_compile: Callable[[], None] | None = None,
) -> dict:
    """Run every sub-experiment; return the results dict (JSON-ready).

    Parameters
    ----------
    config : IoffeConfig
    rng : numpy.random.Generator
        Source of the per-seed entropy and of the validation split; the same generator state
        gives identical results, whatever the number of worker processes.
    data : Dataset
        The main dataset; ``config.val_size`` of its training items become the validation
        split.
    reg_data : Dataset or callable returning one, optional
        The regularization dataset (default: ``config.reg_dataset`` loaded offline). A
        callable is called while phase 1 runs.
    progress : callable(done, total), optional
        Progress in estimated milliseconds of work.
    on_compile : callable(), optional
        Called (in this process) whenever a worker process starts compiling numba kernels
        (an empty cache). In the serial case the kernels compile in this process: watch
        them there (:func:`batchnorm_demo.warmup.watch_compiles`).

    Returns
    -------
    dict

    Notes
    -----
    On any exception, KeyboardInterrupt included, the worker processes are terminated before
    it propagates.
    """
    entropies = [int(v) for v in rng.integers(0, 2**63 - 1, size=config.seeds)]
    train, x_val, y_val = validation_split(data, config.val_size, rng)
    phase1 = plan_phase1(config, entropies)
    n_in_reg = 40 if not isinstance(reg_data, Dataset) else reg_data.n_features

    def weight(group):  # estimated cost of one step of the group
        n_in = train.n_features if group[0].dataset == "main" else n_in_reg
        return estimated_cost(group, n_in, config) / group[0].steps

    # phase 2's size is known before its rates are: cost it with the first rates for the ETA
    dummy = plan_phase2(config, entropies, dict.fromkeys(ARMS, config.lrs[0]))
    total = sum(weight(g) * g[0].steps for g in make_groups(phase1) + make_groups(dummy))
    # starting the worker processes (spawn, imports, data) counts as work too, so the ETA of
    # the first seconds does not treat the start-up as the speed of training
    startup = STARTUP_SHARE * total
    total += startup
    reg: Dataset | None = reg_data if isinstance(reg_data, Dataset) else None

    def get_reg() -> Dataset:
        nonlocal reg
        if reg is None:
            reg = reg_data() if callable(reg_data) else load_dataset(config.reg_dataset)
        return reg

    plan = _Plan(config, entropies, phase1, weight, total, startup)
    workers = max(1, min(config.workers, os.cpu_count() or 1))
    if workers == 1:
        with _one_numba_thread():
            outputs, phase2 = _run_serial(
                config,
                entropies,
                phase1,
                train,
                (x_val, y_val),
                get_reg,
                weight,
                total,
                progress,
                startup,
            )
    else:
        outputs = _run_pool(workers, plan, (train, x_val, y_val), get_reg, progress, on_compile)
        phase2 = [s for s in outputs if s not in set(phase1)]
    if progress:
        progress(total, total)
    return collect(config, phase1, phase2, outputs, train, get_reg() if phase2 else None)


@dataclass(frozen=True)
class _Plan:
    """What the pool runs: the settings, the seeds, phase 1 and the cost model (per-step
    weight of a group, total and start-up share of the estimated work)."""

    config: IoffeConfig
    entropies: list
    phase1: list
    weight: Callable
    total: float
    startup: float


def _run_pool(workers: int, plan: _Plan, main: tuple, get_reg, progress, on_compile) -> dict:
    """Both phases on a pool of ``workers`` spawned processes; returns every run's output."""
    # "spawn": forking a process whose numba/OpenMP thread pool is running is unsafe
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shared = tempfile.mkdtemp(prefix="batchnorm-demo-")
    before = set(mp.active_children())
    pool: ProcessPoolExecutor | None = None
    try:
        # the data travel through a file: handing 20 MB to each new process through its
        # start-up pipe would hold the main process (and the signals) for seconds
        data_path = _save_shared(shared, *main)
        # the workers are spawned by the first submits, with the stop signals held back
        # (see _stop.deferred): a Ctrl-C cannot interrupt a spawn half-way, and the
        # children begin with both signals blocked until _worker_init ignores SIGINT
        with deferred():
            pool = ProcessPoolExecutor(
                workers,
                mp_context=ctx,
                initializer=_worker_init,
                initargs=(q, data_path, os.getpid()),
            )
            groups1 = sorted(make_groups(plan.phase1), key=weight_total(plan.weight), reverse=True)
            futures: dict[tuple, Future] = {
                g: pool.submit(_task, g, plan.config, plan.weight(g), None) for g in groups1
            }
        reg = get_reg()  # load while phase 1 runs
        _drive(pool, q, futures, plan, reg, progress, on_compile)
        outputs = {s: o for g, f in futures.items() for s, o in zip(g, f.result(), strict=True)}
    except BaseException:
        # Ctrl-C, SIGTERM (Stopped) or a failed run: do not wait for the queue
        if pool is not None:
            _stop_workers(pool, [p for p in mp.active_children() if p not in before])
        raise
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    pool.shutdown(wait=True)
    return outputs


def _drive(pool, q, futures: dict, plan: _Plan, reg, progress, on_compile) -> None:
    """Report progress until every run is done; submit phase 2 once the sweep is done (each
    arm's rate chosen on validation). Raises the first failed run's exception."""
    config, weight, total = plan.config, plan.weight, plan.total
    sweep = [g for g in futures if g[0].measure]
    phase2: list[RunSpec] | None = None
    started, done = False, 0.0
    while True:
        check()  # a stop whose first raise something swallowed
        try:
            got = q.get(timeout=0.2)
            if got == _COMPILING:
                if on_compile is not None:
                    on_compile()
                got = 0.0
            if not started:  # the first worker is up and training
                started, done = True, done + plan.startup
            done += got
        except queue_mod.Empty:
            pass
        for f in futures.values():
            if f.done() and f.exception() is not None:
                raise f.exception()
        if phase2 is None and all(futures[s].done() for s in sweep):
            done_sweep = {s: o for g in sweep for s, o in zip(g, futures[g].result(), strict=True)}
            selected = selected_rates(config, list(done_sweep), done_sweep)
            phase2 = plan_phase2(config, plan.entropies, selected)
            # longest first, so no worker idles at the end
            with deferred():
                for g in sorted(make_groups(phase2), key=weight_total(weight), reverse=True):
                    futures[g] = pool.submit(
                        _task, g, config, weight(g), reg if g[0].dataset == "reg" else None
                    )
        if progress:
            progress(min(done, total), total)
        if phase2 is not None and all(f.done() for f in futures.values()):
            return
