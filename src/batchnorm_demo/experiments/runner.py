"""Plan, run (on a pool of spawned workers) and collect every run of the demo.

Two phases. Phase 1: the learning-rate sweep (every arm x every rate x every seed on the main
dataset, trained on the training part minus a validation split, with distribution probes and
the ICS measure) and the deep networks (their own small sweep). Phase 2 starts once the sweep
is done, because it uses each arm's rate chosen on validation: the small initial scale, the
regularization runs on MNIST-1D and the ghost-batch sweep (on the main dataset). Phase-1 runs
still in the queue keep the workers busy meanwhile.

Every run's generators are derived from its seed index only, so the results are identical
whatever the number of workers and whatever order the runs finish in.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from ..data import Dataset, load_dataset, validation_split
from .ioffe import ARMS, IoffeConfig, RunSpec, train_arm

# share of the step cap that a run stopping once fitted is expected to use (for the ETA only;
# calibrated on the default run: MNIST-1D runs fit after 55-100% of the cap, ghost runs are
# cheaper per step than the cost model says)
EXPECTED_FIT_FRACTION = {"reg": 0.85, "main": 0.7}
# share of the whole run spent starting the worker processes (measured: 4-6 s of ~250 s)
STARTUP_SHARE = 0.02

__all__ = ["collect", "estimated_cost", "plan_phase1", "plan_phase2", "run", "select_lr"]


def estimated_cost(spec: RunSpec, n_in: int, config: IoffeConfig) -> float:
    """Rough milliseconds one run takes on one core (for the progress bar's ETA only).

    Parameters
    ----------
    spec : RunSpec
    n_in : int
        Input features of the run's dataset.
    config : IoffeConfig

    Returns
    -------
    float
    """
    widths = (n_in, *spec.hidden, 10)
    macs = sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    per_step = 0.12 + 1.2e-5 * macs
    if spec.arm != "no_bn":
        groups = 1 if spec.ghost is None else -(-config.batch_size // spec.ghost)
        per_step += len(spec.hidden) * (0.05 + 0.16 * groups)
    if spec.arm == "noisy_bn":
        per_step += 0.05 * len(spec.hidden)
    if spec.measure:
        per_step *= 1.15
    fraction = EXPECTED_FIT_FRACTION[spec.dataset] if spec.stop_at_fit else 1.0
    return per_step * spec.steps * 1.1 * fraction


def plan_phase1(config: IoffeConfig, entropies: list[int]) -> list[RunSpec]:
    """The learning-rate sweep (all arms, rates, seeds) and the deep networks' sweep.

    Parameters
    ----------
    config : IoffeConfig
    entropies : list of int
        One seed entropy per seed.

    Returns
    -------
    list of RunSpec
    """
    specs = [
        RunSpec(
            arm,
            lr,
            s,
            e,
            config.steps,
            hidden=config.hidden,
            init_std=config.init_std,
            measure=True,
        )
        for s, e in enumerate(entropies)
        for arm in ARMS
        for lr in config.lrs
    ]
    specs += [
        RunSpec(
            arm, lr, s, e, config.deep_steps, hidden=config.deep_hidden, init_std=config.init_std
        )
        for s, e in enumerate(entropies)
        for arm in ("no_bn", "bn")
        for lr in config.deep_lrs
    ]
    return specs


def plan_phase2(
    config: IoffeConfig, entropies: list[int], selected: dict[str, float]
) -> list[RunSpec]:
    """Small initial scale, regularization and ghost batches, at the chosen rates.

    Parameters
    ----------
    config : IoffeConfig
    entropies : list of int
        One seed entropy per seed.
    selected : dict
        Arm -> learning rate chosen on validation.

    Returns
    -------
    list of RunSpec
    """
    specs = [
        RunSpec(
            arm,
            selected[arm],
            s,
            e,
            config.steps,
            hidden=config.hidden,
            init_std=config.small_init_std,
        )
        for s, e in enumerate(entropies)
        for arm in ARMS
    ]
    specs += [
        RunSpec(
            arm,
            selected[arm],
            s,
            e,
            config.reg_steps,
            dataset="reg",
            hidden=config.hidden,
            init_std=config.init_std,
            stop_at_fit=True,
        )
        for s, e in enumerate(entropies)
        for arm in ARMS
    ]
    specs += [
        RunSpec(
            "bn",
            selected["bn"],
            s,
            e,
            config.ghost_steps,
            hidden=config.hidden,
            init_std=config.init_std,
            ghost=k,
            stop_at_fit=True,
        )
        for s, e in enumerate(entropies)
        for k in config.ghost_sizes
    ]
    return specs


def select_lr(val_accuracy: dict[float, list[float]]) -> float:
    """The rate with the highest mean validation accuracy (ties: the smaller rate).

    Parameters
    ----------
    val_accuracy : dict
        Learning rate -> final validation accuracy per seed.

    Returns
    -------
    float
    """
    return max(sorted(val_accuracy), key=lambda lr: float(np.mean(val_accuracy[lr])))


def _selected(config: IoffeConfig, specs: list[RunSpec], outputs: dict) -> dict[str, float]:
    chosen = {}
    for arm in ARMS:
        val = {
            lr: [
                outputs[s]["final_val_accuracy"]
                for s in specs
                if s.arm == arm and s.lr == lr and s.measure
            ]
            for lr in config.lrs
        }
        chosen[arm] = select_lr(val)
    return chosen


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
            if progress:
                progress(min(done, total), total)

        return f

    for spec in phase1:
        outputs[spec] = train_arm(spec, train, config, val=val, progress=tick(weight(spec)))
    selected = _selected(config, phase1, outputs)
    phase2 = plan_phase2(config, entropies, selected)
    for spec in phase2:
        data = get_reg() if spec.dataset == "reg" else train
        outputs[spec] = train_arm(spec, data, config, val=None, progress=tick(weight(spec)))
    return outputs, phase2


_progress_queue = None
_worker_data: dict | None = None


def _worker_init(queue, data: dict) -> None:
    global _progress_queue, _worker_data
    _progress_queue, _worker_data = queue, data
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


def _task(spec: RunSpec, config: IoffeConfig, weight: float, reg: Dataset | None):
    def report(k: int) -> None:
        if _progress_queue is not None:
            _progress_queue.put(k * weight)

    data, val = (
        (_worker_data["main"], _worker_data["val"]) if spec.dataset == "main" else (reg, None)
    )
    return train_arm(spec, data, config, val=val, progress=report)


def run(
    config: IoffeConfig,
    rng: np.random.Generator,
    *,
    data: Dataset,
    reg_data: Dataset | Callable[[], Dataset] | None = None,
    progress: Callable[[float, float], None] | None = None,
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

    Returns
    -------
    dict
    """
    entropies = [int(v) for v in rng.integers(0, 2**63 - 1, size=config.seeds)]
    train, x_val, y_val = validation_split(data, config.val_size, rng)
    phase1 = plan_phase1(config, entropies)
    # phase 2's size is known before its rates are: cost it with the first rates for the ETA
    dummy = plan_phase2(config, entropies, dict.fromkeys(ARMS, config.lrs[0]))
    n_in_reg = 40 if not isinstance(reg_data, Dataset) else reg_data.n_features

    def weight(spec):
        n_in = train.n_features if spec.dataset == "main" else n_in_reg
        return estimated_cost(spec, n_in, config) / spec.steps

    total = sum(weight(s) * s.steps for s in phase1 + dummy)
    # starting the worker processes (spawn, imports, data) counts as work too, so the ETA of
    # the first seconds does not treat the start-up as the speed of training
    startup = STARTUP_SHARE * total
    total += startup
    done = 0.0
    outputs: dict[RunSpec, dict] = {}
    reg: Dataset | None = reg_data if isinstance(reg_data, Dataset) else None

    def get_reg() -> Dataset:
        nonlocal reg
        if reg is None:
            reg = reg_data() if callable(reg_data) else load_dataset(config.reg_dataset)
        return reg

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
        # "spawn": forking a process whose numba/OpenMP thread pool is running is unsafe
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        with ProcessPoolExecutor(
            workers,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(q, {"main": train, "val": (x_val, y_val)}),
        ) as pool:
            futures: dict[RunSpec, Future] = {
                s: pool.submit(_task, s, config, weight(s), None) for s in phase1
            }
            sweep = [s for s in phase1 if s.measure]
            phase2: list[RunSpec] | None = None
            started = False
            get_reg()  # load while phase 1 runs
            while True:
                try:
                    got = q.get(timeout=0.2)
                    if not started:  # the first worker is up and training
                        started, done = True, done + startup
                    done += got
                except queue_mod.Empty:
                    pass
                for f in futures.values():
                    if f.done() and f.exception() is not None:
                        raise f.exception()
                if phase2 is None and all(futures[s].done() for s in sweep):
                    selected = _selected(config, sweep, {s: futures[s].result() for s in sweep})
                    phase2 = plan_phase2(config, entropies, selected)
                    # longest first, so no worker idles at the end
                    for s in sorted(phase2, key=weight_total(weight), reverse=True):
                        futures[s] = pool.submit(
                            _task, s, config, weight(s), reg if s.dataset == "reg" else None
                        )
                if progress:
                    progress(min(done, total), total)
                if phase2 is not None and all(f.done() for f in futures.values()):
                    break
            outputs = {s: f.result() for s, f in futures.items()}
        phase2 = [s for s in outputs if s not in set(phase1)]
    if progress:
        progress(total, total)
    return collect(config, phase1, phase2, outputs, train, get_reg() if phase2 else None)


def weight_total(weight: Callable[[RunSpec], float]) -> Callable[[RunSpec], float]:
    """Sort key: a run's estimated total cost.

    Parameters
    ----------
    weight : callable(RunSpec) -> float
        Estimated cost per step.

    Returns
    -------
    callable(RunSpec) -> float
    """
    return lambda s: weight(s) * s.steps


def _per_seed(outputs: dict, specs: list[RunSpec], key: str) -> list:
    return [outputs[s][key] for s in sorted(specs, key=lambda s: s.seed)]


def collect(
    config: IoffeConfig,
    phase1: list[RunSpec],
    phase2: list[RunSpec],
    outputs: dict,
    train: Dataset,
    reg: Dataset | None,
) -> dict:
    """Arrange the runs' outputs as the results dict (see the issue's key list).

    Parameters
    ----------
    config : IoffeConfig
    phase1, phase2 : list of RunSpec
    outputs : dict
        RunSpec -> output of :func:`train_arm`.
    train : Dataset
        The main dataset as trained on (validation split removed).
    reg : Dataset or None
        The regularization dataset.

    Returns
    -------
    dict
    """

    def pick(specs, **kw):
        return [s for s in specs if all(getattr(s, k) == v for k, v in kw.items())]

    sweep_specs = [s for s in phase1 if s.measure]
    lr_sweep: dict = {}
    for arm in ARMS:
        lr_sweep[arm] = {}
        for lr in config.lrs:
            runs = pick(sweep_specs, arm=arm, lr=lr)
            lr_sweep[arm][repr(lr)] = {
                "val_accuracy": _per_seed(outputs, runs, "final_val_accuracy"),
                "test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
                "train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
                "train_loss": _per_seed(outputs, runs, "final_train_loss"),
                "early_test_accuracy": _per_seed(outputs, runs, "early_test_accuracy"),
                "diverged": _per_seed(outputs, runs, "diverged"),
            }
    selected = _selected(config, sweep_specs, outputs)

    ioffe, dist, ics = {}, {}, {}
    for arm in ARMS:
        runs = sorted(pick(sweep_specs, arm=arm, lr=selected[arm]), key=lambda s: s.seed)
        outs = [outputs[s] for s in runs]
        steps = outs[0]["curves"]["steps"]
        ioffe[arm] = {
            "lr": selected[arm],
            "final_test_accuracy": [o["final_test_accuracy"] for o in outs],
            "final_train_accuracy": [o["final_train_accuracy"] for o in outs],
            "final_val_accuracy": [o["final_val_accuracy"] for o in outs],
            "final_train_loss": [o["final_train_loss"] for o in outs],
            "early_step": outs[0]["early_step"],
            "early_test_accuracy": [o["early_test_accuracy"] for o in outs],
            "curves": {
                "steps": steps,
                **{
                    k: [o["curves"][k] for o in outs]
                    for k in ("test_accuracy", "val_accuracy", "train_accuracy", "train_loss")
                },
            },
        }
        d = {
            "probe_steps": outs[0]["probe_steps"],
            "early_window": outs[0]["early_window"],
            "unit": config.unit,
            "layer": "input to the sigmoids of the last hidden layer",
        }
        for key in ("seen", "before_noise"):
            if key in outs[0]["distribution"]:
                dd = [o["distribution"][key] for o in outs]
                d[key] = {
                    "early": [x["early"] for x in dd],
                    "late": [x["late"] for x in dd],
                    "curve": [x["curve"] for x in dd],
                    "unit_percentiles_seed0": dd[0]["unit_percentiles"],
                }
        d["early"], d["late"] = d["seen"]["early"], d["seen"]["late"]
        dist[arm] = d
        by_lr = {}
        for lr in config.lrs:
            rr = [
                outputs[s]["ics"]
                for s in sorted(pick(sweep_specs, arm=arm, lr=lr), key=lambda s: s.seed)
            ]
            by_lr[repr(lr)] = {
                "relative": [r["relative"] for r in rr],
                "cosine": [r["cosine"] for r in rr],
            }
        ics[arm] = {
            "lr": selected[arm],
            **by_lr[repr(selected[arm])],
            "by_lr": by_lr,
            "layer": "last hidden Linear layer (weights)",
            "measurements_per_run": outs[0]["ics"]["count"],
        }

    init: dict = {repr(config.init_std): {}, repr(config.small_init_std): {}}
    for arm in ARMS:
        init[repr(config.init_std)][arm] = {
            "lr": selected[arm],
            "final_test_accuracy": ioffe[arm]["final_test_accuracy"],
            "final_train_accuracy": ioffe[arm]["final_train_accuracy"],
            "early_test_accuracy": ioffe[arm]["early_test_accuracy"],
        }
        runs = pick(phase2, arm=arm, dataset="main", ghost=None)
        init[repr(config.small_init_std)][arm] = {
            "lr": selected[arm],
            "final_test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
            "final_train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
            "early_test_accuracy": _per_seed(outputs, runs, "early_test_accuracy"),
        }

    deep_specs = [s for s in phase1 if not s.measure]
    deep: dict = {}
    for arm in ("no_bn", "bn"):
        val = {
            lr: _per_seed(outputs, pick(deep_specs, arm=arm, lr=lr), "final_val_accuracy")
            for lr in config.deep_lrs
        }
        lr = select_lr(val)
        runs = pick(deep_specs, arm=arm, lr=lr)
        deep[arm] = {
            "lr": lr,
            "final_test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
            "final_train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
            "by_lr": {
                repr(r): {
                    "val_accuracy": val[r],
                    "test_accuracy": _per_seed(
                        outputs, pick(deep_specs, arm=arm, lr=r), "final_test_accuracy"
                    ),
                }
                for r in config.deep_lrs
            },
        }

    regularization: dict = {
        "dataset": reg.summary() if reg is not None else None,
        "steps": config.reg_steps,
    }
    for arm in ARMS:
        runs = pick(phase2, arm=arm, dataset="reg", ghost=None)
        regularization[arm] = {
            "lr": selected[arm],
            "final_test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
            "final_train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
            "steps_run": _per_seed(outputs, runs, "steps_run"),
        }
    ghost: dict = {}
    for k in config.ghost_sizes:
        runs = sorted(pick(phase2, ghost=k), key=lambda s: s.seed)
        outs = [outputs[s] for s in runs]
        ghost[str(k)] = {
            "final_test_accuracy": [o["final_test_accuracy"] for o in outs],
            "final_train_accuracy": [o["final_train_accuracy"] for o in outs],
            "steps_run": [o["steps_run"] for o in outs],
            "train_mode_test_accuracy": [
                o.get("train_mode_test_accuracy", float("nan")) for o in outs
            ],
            "train_eval_gap": [
                o.get("train_mode_test_accuracy", float("nan")) - o["final_test_accuracy"]
                for o in outs
            ],
        }
    ghost_meta = {
        "lr": selected["bn"],
        "steps": config.ghost_steps,
        "batch_size": config.batch_size,
        "dataset": train.name,
    }
    groups = {
        "lr_sweep": sweep_specs,
        "deep": deep_specs,
        "small_init": pick(phase2, dataset="main", ghost=None),
        "regularization": pick(phase2, dataset="reg"),
        "ghost": [s for s in phase2 if s.ghost is not None],
    }
    cpu = {
        k: {"runs": len(v), "cpu_seconds": round(sum(outputs[s]["cpu_seconds"] for s in v), 1)}
        for k, v in groups.items()
    }

    return {
        "config": config.to_json(),
        "dataset": train.summary(),
        "ioffe": ioffe,
        "lr_sweep": lr_sweep,
        "selected_lr": selected,
        "init": init,
        "deep": deep,
        "distribution_change": dist,
        "ics": ics,
        "regularization": regularization,
        "ghost": ghost,
        "ghost_settings": ghost_meta,
        "cpu_seconds": cpu,
    }
