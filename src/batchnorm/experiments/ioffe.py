"""Ioffe & Szegedy (2015) section 4.1, with Santurkar et al. (2018)'s noisy-BN control.

A fully connected network (3 hidden layers of 100 sigmoid units, 10-way softmax, small
Gaussian initial weights, mini-batches of 60) is trained with plain SGD in three arms that are
identical in everything else (initial weights, learning rate, steps, batch order, seeds):

* ``no_bn``: Linear(+bias) -> Sigmoid;
* ``bn``: Linear(no bias) -> BatchNorm -> Sigmoid (beta replaces the bias);
* ``noisy_bn``: Linear(no bias) -> BatchNorm -> NoisyShift -> Sigmoid, where NoisyShift
  injects random per-unit shifts and scales at every step (Santurkar et al.'s "noisy BN").

The no-BN arm is also trained at a few other learning rates; the rate with the lowest mean
final *training* loss (never test data) is the one compared, so BN is not credited with a
badly tuned baseline.

Recorded per arm and seed: test and train accuracy over steps; the 15th/50th/85th
percentiles of the input to the sigmoids of the last hidden layer over a fixed probe set
(taken in training mode, as the layer sees it while learning, without updating any running
statistics); a stability number for those traces; and the final train-test accuracy gap.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from ..data import Dataset
from ..layers import BatchNorm
from ..nn import SGD, Linear, NoisyShift, Sequential, Sigmoid, accuracy, softmax_cross_entropy

__all__ = ["ARMS", "IoffeConfig", "instability", "run", "train_arm"]


ARMS = ("no_bn", "bn", "noisy_bn")
QUANTILES = (15, 50, 85)


@dataclass(frozen=True)
class IoffeConfig:
    """Settings of the experiment; the defaults fit in about two minutes on 2 cores.

    ``--full`` in the CLI sets ``steps=50_000`` (the paper's schedule).
    """

    steps: int = 5000
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.1
    lr: float = 0.5
    no_bn_extra_lrs: tuple[float, ...] = (0.25, 1.0, 2.0)
    bn_momentum: float = 0.9
    seeds: int = 3
    eval_every: int = 100
    probe_size: int = 1000
    unit: int = 0
    train_eval_size: int = 1000
    workers: int = 2
    noise: dict = field(default_factory=lambda: {"mean_range": 0.5, "scale_range": 0.25,
                                                 "jitter": 0.1})

    def __post_init__(self):
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 for batch statistics (got {self.batch_size})")
        if self.seeds < 1:
            problems.append(f"seeds must be >= 1 (got {self.seeds})")
        if self.eval_every < 1:
            problems.append(f"eval_every must be >= 1 (got {self.eval_every})")
        if not self.hidden or self.unit >= self.hidden[-1] or self.unit < 0:
            problems.append(f"unit {self.unit} must index the last hidden layer {self.hidden}")
        if self.lr <= 0 or any(r <= 0 for r in self.no_bn_extra_lrs):
            problems.append("learning rates must be positive")
        if problems:
            raise ValueError("invalid IoffeConfig: " + "; ".join(problems))


def build_network(arm: str, n_in: int, n_classes: int, config: IoffeConfig,
                  init_rng: np.random.Generator, noise_rng: np.random.Generator) -> Sequential:
    """The arm's network; the same ``init_rng`` state gives the same weights in every arm."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS}")
    modules = []
    fan_in = n_in
    for width in config.hidden:
        modules.append(Linear(fan_in, width, rng=init_rng, std=config.init_std,
                              bias=arm == "no_bn"))
        if arm != "no_bn":
            modules.append(BatchNorm(width, momentum=config.bn_momentum))
        if arm == "noisy_bn":
            modules.append(NoisyShift(noise_rng, **config.noise))
        modules.append(Sigmoid())
        fan_in = width
    modules.append(Linear(fan_in, n_classes, rng=init_rng, std=config.init_std))
    return Sequential(*modules)


def _eval_points(steps: int, every: int) -> list[int]:
    pts = list(range(0, steps, every))
    return pts + [steps] if pts[-1] != steps else pts


def instability(p15: np.ndarray, p50: np.ndarray, p85: np.ndarray) -> dict:
    """How much a unit's input distribution moves over training (lower = more stable).

    Arrays are (steps, units). For each unit: ``median_drift`` = std over time of the median
    divided by the mean 15-85 width, ``width_drift`` = std over time of the width divided by
    its mean. Both are averaged over units; ``score`` is their mean.
    """
    width = p85 - p15
    mean_width = np.maximum(width.mean(axis=0), 1e-12)
    median_drift = float(np.mean(p50.std(axis=0) / mean_width))
    width_drift = float(np.mean(width.std(axis=0) / mean_width))
    return {"median_drift": median_drift, "width_drift": width_drift,
            "score": 0.5 * (median_drift + width_drift)}


def train_arm(arm: str, lr: float, seed_entropy: int, data: Dataset, config: IoffeConfig,
              progress: Callable[[int], None] | None = None) -> dict:
    """Train one arm at one learning rate for one seed; return its curves and numbers."""
    seq = np.random.SeedSequence(seed_entropy)
    init_seed, order_seed, noise_seed = seq.spawn(3)
    net = build_network(arm, data.n_features, data.n_classes, config,
                        np.random.default_rng(init_seed), np.random.default_rng(noise_seed))
    order_rng = np.random.default_rng(order_seed)
    opt = SGD(net, lr)
    sig_idx = [i for i, m in enumerate(net.modules) if isinstance(m, Sigmoid)][-1]
    probe = data.x_test[: config.probe_size]
    x_tr_eval = data.x_train[: config.train_eval_size]
    y_tr_eval = data.y_train[: config.train_eval_size]

    eval_steps = set(_eval_points(config.steps, config.eval_every))
    curves = {"steps": [], "test_accuracy": [], "train_accuracy": [], "train_loss": []}
    pct = []  # (evaluations, 3 quantiles, units)
    n, bs = data.x_train.shape[0], config.batch_size
    perm, pos, losses, reported = order_rng.permutation(n), 0, [], 0
    for step in range(config.steps + 1):
        if step in eval_steps:
            acts = net.forward_collect(probe, training=True, update_stats=False)
            pct.append(np.percentile(acts[sig_idx - 1], QUANTILES, axis=0))
            curves["steps"].append(step)
            curves["test_accuracy"].append(
                accuracy(net.forward(data.x_test, training=False), data.y_test))
            curves["train_accuracy"].append(
                accuracy(net.forward(x_tr_eval, training=False), y_tr_eval))
            curves["train_loss"].append(float(np.mean(losses)) if losses else math.nan)
            losses = []
            if progress is not None and step > reported:
                progress(step - reported)
                reported = step
        if step == config.steps:
            break
        if pos + bs > n:
            perm, pos = order_rng.permutation(n), 0
        idx = perm[pos: pos + bs]
        pos += bs
        logits = net.forward(data.x_train[idx], training=True)
        loss, dlogits = softmax_cross_entropy(logits, data.y_train[idx])
        if not math.isfinite(loss):
            raise FloatingPointError(f"arm {arm} lr {lr}: loss became {loss} at step {step}")
        losses.append(loss)
        net.backward(dlogits)
        opt.step()

    pct_arr = np.asarray(pct)  # (steps, 3, units)
    return {
        "arm": arm,
        "lr": lr,
        "curves": curves,
        "percentiles_unit": pct_arr[:, :, config.unit].tolist(),
        "instability": instability(pct_arr[:, 0], pct_arr[:, 1], pct_arr[:, 2]),
        "final_test_accuracy": curves["test_accuracy"][-1],
        "final_train_accuracy": curves["train_accuracy"][-1],
        "final_train_loss": curves["train_loss"][-1],
    }


# ----------------------------------------------------------------------------- orchestration
_progress_queue = None
_worker_data: Dataset | None = None


def _worker_init(queue, data: Dataset) -> None:
    global _progress_queue, _worker_data
    _progress_queue, _worker_data = queue, data
    try:  # one BLAS thread per worker process: the workers already use the cores
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def _report(k: int) -> None:
    if _progress_queue is not None:
        _progress_queue.put(k)


def _task(args):
    arm, lr, entropy, config = args
    return train_arm(arm, lr, entropy, _worker_data, config, progress=_report)


def _tasks(config: IoffeConfig, seed_entropies: list[int]):
    lrs = {"no_bn": (config.lr, *config.no_bn_extra_lrs), "bn": (config.lr,),
           "noisy_bn": (config.lr,)}
    return [(arm, lr, s, e) for s, e in enumerate(seed_entropies) for arm in ARMS
            for lr in lrs[arm]]


def run(config: IoffeConfig, rng: np.random.Generator, *, data: Dataset,
        progress: Callable[[int, int], None] | None = None) -> dict:
    """Run every arm, learning rate and seed; return the results dict (JSON-ready).

    Parameters
    ----------
    config : IoffeConfig
    rng : numpy.random.Generator
        Source of the per-seed entropy; the same generator state gives identical results,
        whatever the number of worker processes.
    data : Dataset
    progress : callable(done_steps, total_steps), optional
    """
    seed_entropies = [int(v) for v in rng.integers(0, 2**63 - 1, size=config.seeds)]
    tasks = _tasks(config, seed_entropies)
    total = len(tasks) * config.steps
    done = 0
    outputs = []
    workers = max(1, min(config.workers, len(tasks), os.cpu_count() or 1))
    if workers == 1:
        def tick(k):
            nonlocal done
            done += k
            if progress:
                progress(done, total)
        for arm, lr, _, e in tasks:
            outputs.append(train_arm(arm, lr, e, data, config, progress=tick))
    else:
        # "spawn": forking a process whose numba/OpenMP thread pool is running is unsafe
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(queue, data)) as pool:
            futures = [pool.submit(_task, (arm, lr, e, config)) for arm, lr, _, e in tasks]
            while not all(f.done() for f in futures) or not queue.empty():
                try:
                    done += queue.get(timeout=0.2)
                except Exception:  # queue.Empty: nothing new yet
                    pass
                if progress:
                    progress(min(done, total), total)
            outputs = [f.result() for f in futures]
        if progress:
            progress(total, total)
    return _collect(config, tasks, outputs, data)


def _collect(config: IoffeConfig, tasks, outputs, data: Dataset) -> dict:
    by_key = {(t[0], t[1], t[2]): o for t, o in zip(tasks, outputs, strict=True)}
    seeds = range(config.seeds)
    sweep = {}
    for lr in (config.lr, *config.no_bn_extra_lrs):
        runs = [by_key[("no_bn", lr, s)] for s in seeds]
        sweep[repr(lr)] = {
            "lr": lr,
            "final_train_loss": [r["final_train_loss"] for r in runs],
            "final_test_accuracy": [r["final_test_accuracy"] for r in runs],
            "final_train_accuracy": [r["final_train_accuracy"] for r in runs],
        }
    chosen = min(sweep.values(), key=lambda v: np.mean(v["final_train_loss"]))["lr"]
    arms = {}
    for arm in ARMS:
        lr = chosen if arm == "no_bn" else config.lr
        runs = [by_key[(arm, lr, s)] for s in seeds]
        steps = runs[0]["curves"]["steps"]
        arms[arm] = {
            "lr": lr,
            "final_test_accuracy": [r["final_test_accuracy"] for r in runs],
            "final_train_accuracy": [r["final_train_accuracy"] for r in runs],
            "final_train_loss": [r["final_train_loss"] for r in runs],
            "train_test_gap": [r["final_train_accuracy"] - r["final_test_accuracy"]
                               for r in runs],
            "test_accuracy_curve": {"steps": steps,
                                    "values": [r["curves"]["test_accuracy"] for r in runs]},
            "train_accuracy_curve": {"steps": steps,
                                     "values": [r["curves"]["train_accuracy"] for r in runs]},
            "train_loss_curve": {"steps": steps,
                                 "values": [r["curves"]["train_loss"] for r in runs]},
            "percentiles": {
                "steps": steps,
                "unit": config.unit,
                "layer": "input to the sigmoids of the last hidden layer",
                **{str(q): [[p[i] for p in r["percentiles_unit"]] for r in runs]
                   for i, q in enumerate(QUANTILES)},
            },
            "instability": [r["instability"] for r in runs],
        }
    # the baseline at the shared learning rate too, so identical-settings comparisons stay
    # possible when the sweep picked another rate
    base = [by_key[("no_bn", config.lr, s)] for s in seeds]
    arms["no_bn"]["same_lr_as_bn"] = {
        "lr": config.lr,
        "final_test_accuracy": [r["final_test_accuracy"] for r in base],
        "final_train_accuracy": [r["final_train_accuracy"] for r in base],
    }
    arms["no_bn"]["lr_sweep"] = sweep
    cfg = asdict(config)
    cfg["hidden"] = list(config.hidden)
    cfg["no_bn_extra_lrs"] = list(config.no_bn_extra_lrs)
    return {"config": cfg, "dataset": data.summary(), "ioffe": arms}
