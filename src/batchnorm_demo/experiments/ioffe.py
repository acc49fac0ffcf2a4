"""Ioffe & Szegedy (2015) section 4.1, with Santurkar et al. (2018)'s noisy-BN control.

A fully connected sigmoid network (by default 3 hidden layers of 100 units, 10-way softmax,
small Gaussian initial weights, mini-batches of 60) is trained with plain SGD in three arms
that are identical in everything else (initial weights, batch order, seeds):

* ``no_bn``: Linear(+bias) -> Sigmoid;
* ``bn``: Linear(no bias) -> BatchNorm -> Sigmoid (beta replaces the bias);
* ``noisy_bn``: Linear(no bias) -> BatchNorm -> NoisyShift -> Sigmoid, where NoisyShift
  injects random per-unit shifts and scales at every step (Santurkar et al.'s "noisy BN").

One call of :func:`train_arm` trains one arm at one learning rate for one seed and records:

* test, validation and training accuracy and the training loss over steps (evaluation mode);
* the *distribution change* of the input to the last hidden layer's sigmoids: on a fixed probe
  set, every ``probe_every`` steps, the 15th/50th/85th percentiles of each unit's input (in
  training mode, as the layer sees it while learning, without updating running statistics);
  per unit, the change of those percentiles from one probe to the next divided by the 15-85
  width (:func:`percentile_change`), averaged over units, early and late separately. For noisy
  BN also the same for the BatchNorm output *before* the noise;
* Santurkar et al.'s internal covariate shift for the last hidden Linear layer
  (:func:`ics_measure`): its weight gradient G on a batch, and G' on the same batch (same noise
  draw) after only the layers before it took their SGD update.

Probing and the ICS measure never touch the training random streams: the probe's noise comes
from its own generator and the ICS measure works on copies of the network, so changing
``eval_every`` or ``probe_every`` leaves the training run bit-identical.

The settings are in :mod:`.ioffe_config`, the measures in :mod:`.measures`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from batchnorm import BatchNorm
from batchnorm.nn import (
    SGD,
    Linear,
    NoisyShift,
    Sequential,
    Sigmoid,
    accuracy,
    softmax_cross_entropy,
)
from batchnorm.variants import GhostBatchNorm

from ..data import Dataset
from .ioffe_config import ARMS, IoffeConfig, RunSpec
from .measures import ics_measure, percentile_change, probe_distribution, summarize_measures
from .smoothness import smoothness_measure, summarize_smoothness

__all__ = [
    "ARMS",
    "IoffeConfig",
    "RunSpec",
    "build_network",
    "ics_measure",
    "percentile_change",
    "train_arm",
]


def build_network(
    arm: str,
    n_in: int,
    n_classes: int,
    hidden: tuple[int, ...],
    init_std: float,
    config: IoffeConfig,
    init_rng: np.random.Generator,
    noise_rng: np.random.Generator,
    ghost: int | None = None,
) -> Sequential:
    """The arm's network; the same ``init_rng`` state gives the same weights in every arm.

    Parameters
    ----------
    arm : str
        One of :data:`ARMS`.
    n_in, n_classes : int
        Input features and classes.
    hidden : tuple of int
        Hidden widths.
    init_std : float
        Standard deviation of the Gaussian initial weights.
    config : IoffeConfig
        Supplies BN momentum and the noise settings.
    init_rng, noise_rng : numpy.random.Generator
        Initial weights; noisy BN's training noise.
    ghost : int, optional
        Use ``GhostBatchNorm(virtual_batch_size=ghost)`` instead of BatchNorm.

    Returns
    -------
    Sequential
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS}")
    modules = []
    fan_in = n_in
    for width in hidden:
        modules.append(Linear(fan_in, width, rng=init_rng, std=init_std, bias=arm == "no_bn"))
        if arm != "no_bn":
            # a non-finite batch ends the run as diverged (the loss is not finite either)
            kw = {"momentum": config.bn_momentum, "nonfinite": "skip"}
            if ghost is None:
                modules.append(BatchNorm(width, **kw))
            else:
                modules.append(GhostBatchNorm(width, virtual_batch_size=ghost, **kw))
        if arm == "noisy_bn":
            modules.append(NoisyShift(noise_rng, **config.noise))
        modules.append(Sigmoid())
        fan_in = width
    modules.append(Linear(fan_in, n_classes, rng=init_rng, std=init_std))
    return Sequential(*modules)


def _linear_indices(net: Sequential) -> list[int]:
    return [i for i, m in enumerate(net.modules) if isinstance(m, Linear)]


def _eval_points(steps: int, every: int, extra: tuple[int, ...] = ()) -> list[int]:
    pts = set(range(0, steps, every)) | {steps} | {e for e in extra if 0 <= e <= steps}
    return sorted(pts)


def train_arm(
    spec: RunSpec,
    data: Dataset,
    config: IoffeConfig,
    *,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
    keep_parameters: bool = False,
) -> dict:
    """Train one arm at one learning rate for one seed; return its curves and numbers.

    This is the reference: the demo trains runs in groups (:func:`.lockstep.train_group`),
    which gives the same numbers to float rounding.

    Parameters
    ----------
    spec : RunSpec
        What to train.
    data : Dataset
        Training and test data.
    config : IoffeConfig
        Shared settings (batch size, evaluation and probe schedules, noise).
    val : (x_val, y_val), optional
        Validation data (held out of training); recorded as ``val_accuracy``.
    progress : callable(steps_done), optional
        Called with the number of steps done since the last call.
    keep_parameters : bool
        Also return the final parameters under ``"parameters"`` (arrays; for tests).

    Returns
    -------
    dict
        JSON-ready: curves, final accuracies and loss, and (if ``spec.measure``) the
        distribution change and ICS numbers.
    """
    if config.dtype != "float64":
        raise ValueError(
            f"the one-by-one reference trains in float64; got config.dtype={config.dtype!r}"
        )
    start = time.process_time()
    run = _Run(spec, data, config, val)
    eval_steps = set(_eval_points(spec.steps, config.eval_every, (config.early_step,)))
    probe_steps = set(_eval_points(spec.steps, config.probe_every)) if spec.measure else set()
    reported = 0
    for step in range(spec.steps + 1):
        if step in probe_steps and not run.diverged:
            run.probe(step)
        if step in eval_steps:
            run.evaluate(step)
            if progress is not None and step > reported:
                progress(step - reported)
                reported = step
            if spec.stop_at_fit and step > 0 and run.fitted():
                break
        if step == spec.steps:
            break
        idx = run.next_batch()
        if not run.diverged:
            run.train_step(step, idx)
    if progress is not None and spec.steps > reported:
        progress(spec.steps - reported)  # stopped early: the rest of the budget counts as done
    return run.output(start, keep_parameters)


class _Run:
    """One reference run while it trains: the network, its random streams and its records."""

    def __init__(self, spec: RunSpec, data: Dataset, config: IoffeConfig, val) -> None:
        init_seed, order_seed, noise_seed, probe_seed = np.random.SeedSequence(
            spec.seed_entropy
        ).spawn(4)
        self.net = build_network(
            spec.arm,
            data.n_features,
            data.n_classes,
            spec.hidden,
            spec.init_std,
            config,
            np.random.default_rng(init_seed),
            np.random.default_rng(noise_seed),
            ghost=spec.ghost,
        )
        self.spec, self.data, self.config, self.val = spec, data, config, val
        self.order_rng = np.random.default_rng(order_seed)
        self.probe_rng = np.random.default_rng(probe_seed)
        self.opt = SGD(self.net, spec.lr)
        self.ics_layer = _linear_indices(self.net)[-2]
        self.curves: dict[str, list] = {
            "steps": [],
            "test_accuracy": [],
            "train_accuracy": [],
            "train_loss": [],
        }
        if val is not None:
            self.curves["val_accuracy"] = []
        self.probes: dict[str, list] = {"steps": [], "seen": [], "before_noise": []}
        self.ics: list[dict] = []
        self.smooth: list[dict] = []
        self.perm, self.pos, self.losses = self.order_rng.permutation(data.x_train.shape[0]), 0, []
        self.diverged = False

    def probe(self, step: int) -> None:
        """Record the layer-input distribution on the probe set."""
        pr = probe_distribution(
            self.net, self.data.x_test[: self.config.probe_size], self.probe_rng, self.spec.arm
        )
        self.probes["steps"].append(step)
        for k, v in pr.items():
            self.probes[k].append(v)

    def evaluate(self, step: int) -> None:
        """Append one point to every curve (chance accuracy once diverged)."""
        curves, data, n_eval = self.curves, self.data, self.config.train_eval_size
        curves["steps"].append(step)
        if self.diverged:
            for k in curves:
                if k not in ("steps", "train_loss"):
                    curves[k].append(1.0 / data.n_classes)
        else:
            net = self.net
            curves["test_accuracy"].append(
                accuracy(net.forward(data.x_test, training=False), data.y_test)
            )
            curves["train_accuracy"].append(
                accuracy(net.forward(data.x_train[:n_eval], training=False), data.y_train[:n_eval])
            )
            if self.val is not None:
                curves["val_accuracy"].append(
                    accuracy(net.forward(self.val[0], training=False), self.val[1])
                )
        curves["train_loss"].append(float(np.mean(self.losses)) if self.losses else math.nan)
        self.losses = []

    def fitted(self) -> bool:
        """Whether the training accuracy (whole training set) reached the fit threshold."""
        if self.diverged:
            return False
        acc = accuracy(self.net.forward(self.data.x_train, training=False), self.data.y_train)
        return acc >= self.config.fit_threshold

    def next_batch(self) -> np.ndarray:
        """The next mini-batch's indices (a new permutation once the epoch is used up)."""
        n, bs = self.data.x_train.shape[0], self.config.batch_size
        if self.pos + bs > n:
            self.perm, self.pos = self.order_rng.permutation(n), 0
        idx = self.perm[self.pos : self.pos + bs]
        self.pos += bs
        return idx

    def train_step(self, step: int, idx: np.ndarray) -> None:
        """The measures due at ``step``, then one SGD step on the batch ``idx``."""
        spec, config, net = self.spec, self.config, self.net
        xb, yb = self.data.x_train[idx], self.data.y_train[idx]
        if spec.measure and step > 0 and step % config.ics_every == 0:
            self.ics.append({"step": step, **ics_measure(net, xb, yb, spec.lr, self.ics_layer)})
        if spec.measure and step % config.smooth_every == 0:
            m = smoothness_measure(net, xb, yb, spec.lr, config.smooth_multipliers)
            self.smooth.append({"step": step, **m})
        with np.errstate(over="ignore", invalid="ignore"):
            logits = net.forward(xb, training=True)
            loss, dlogits = softmax_cross_entropy(logits, yb)
        if not math.isfinite(loss):
            self.diverged = True  # recorded as chance accuracy from here on, not an error
            self.losses.append(math.inf)
            return
        self.losses.append(loss)
        net.backward(dlogits)
        self.opt.step()

    def output(self, start: float, keep_parameters: bool) -> dict:
        """The run's JSON-ready record (see :func:`train_arm`); ``start``: the process time
        at which the run began."""
        spec, config, data, curves, net = self.spec, self.config, self.data, self.curves, self.net
        final_train = (
            1.0 / data.n_classes
            if self.diverged
            else accuracy(net.forward(data.x_train, training=False), data.y_train)
        )
        out = {
            "spec": {**asdict(spec), "hidden": list(spec.hidden)},
            "steps_run": curves["steps"][-1],
            "curves": curves,
            "diverged": self.diverged,
            "final_test_accuracy": curves["test_accuracy"][-1],
            "final_train_accuracy": final_train,
            "final_train_loss": curves["train_loss"][-1],
            "parameter_digest": hashlib.sha256(
                b"".join(np.ascontiguousarray(v).tobytes() for v in net.parameters().values())
            ).hexdigest(),
        }
        if self.val is not None:
            out["final_val_accuracy"] = curves["val_accuracy"][-1]
        i_early = int(np.searchsorted(curves["steps"], min(config.early_step, curves["steps"][-1])))
        out["early_step"] = curves["steps"][i_early]
        out["early_test_accuracy"] = curves["test_accuracy"][i_early]
        if spec.ghost is not None and not self.diverged:
            out["train_mode_test_accuracy"] = _train_mode_accuracy(net, data, config.batch_size)
        if spec.measure:
            out.update(summarize_measures(self.probes, self.ics, config, spec))
            out["smoothness"] = summarize_smoothness(self.smooth)
        out["cpu_seconds"] = time.process_time() - start
        if keep_parameters:
            out["parameters"] = [np.array(v) for v in net.parameters().values()]
        return out


def _train_mode_accuracy(net: Sequential, data: Dataset, batch: int) -> float:
    """Test accuracy with batch statistics (batches of ``batch``), no running-stat updates."""
    n = (data.x_test.shape[0] // batch) * batch
    hits = 0
    for i in range(0, n, batch):
        logits = net.forward(data.x_test[i : i + batch], training=True, update_stats=False)
        hits += int(np.sum(np.argmax(logits, axis=1) == data.y_test[i : i + batch]))
    return hits / max(1, n)
