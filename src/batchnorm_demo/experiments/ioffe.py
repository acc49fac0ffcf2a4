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
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

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

__all__ = [
    "ARMS",
    "IoffeConfig",
    "RunSpec",
    "build_network",
    "ics_measure",
    "percentile_change",
    "train_arm",
]

ARMS = ("no_bn", "bn", "noisy_bn")
QUANTILES = (15, 50, 85)


@dataclass(frozen=True)
class IoffeConfig:
    """Settings of the whole demo; the defaults fit in about four minutes on 2 cores.

    Attributes
    ----------
    steps : int
        SGD steps of each learning-rate-sweep run (the main comparison reuses these runs).
    batch_size : int
        Mini-batch size (60, as in the paper).
    hidden : tuple of int
        Hidden widths of the main network.
    init_std : float
        Standard deviation of the Gaussian initial weights.
    small_init_std : float
        The paper's "small Gaussian" initial scale, run at each arm's chosen rate.
    lrs : tuple of float
        The learning-rate grid, the same for every arm.
    bn_momentum : float
        Weight of the old running value in BatchNorm's running averages.
    seeds : int
        Seeds per setting.
    val_size : int
        Training items held out as the validation split (chooses the learning rates).
    eval_every : int
        Steps between evaluations of the accuracy curves.
    early_step : int
        The step at which "how fast" is read off (accuracy at that step).
    probe_every, probe_size : int
        Steps between probes of the layer-input distribution, and probe-set size.
    early_window : int
        Steps that count as "early" for the distribution change; later steps are "late".
    unit : int
        The unit of the last hidden layer whose percentiles are drawn in the figure.
    ics_every : int
        Steps between measurements of Santurkar et al.'s ICS.
    train_eval_size : int
        Training items evaluated for the training-accuracy curve (the final value uses all).
    deep_hidden, deep_lrs, deep_steps :
        The deep network (its learning rate is chosen on validation from ``deep_lrs``).
    reg_dataset, reg_steps :
        Dataset and length of the regularization runs (each arm at its chosen rate).
    ghost_sizes, ghost_steps :
        Virtual batch sizes of the ghost-batch sweep (inside batches of ``batch_size``), run on
        the main dataset at BN's chosen rate until fitted (at most ``ghost_steps``).
    fit_threshold : float
        Training accuracy an arm must reach before its generalization is judged.
    workers : int
        Worker processes.
    noise : dict
        NoisyShift settings.
    """

    steps: int = 2000
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.1
    small_init_std: float = 0.01
    lrs: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    bn_momentum: float = 0.9
    seeds: int = 2
    val_size: int = 1000
    eval_every: int = 250
    early_step: int = 500
    probe_every: int = 50
    probe_size: int = 500
    early_window: int = 1000
    unit: int = 0
    ics_every: int = 100
    train_eval_size: int = 1000
    deep_hidden: tuple[int, ...] = (100,) * 8
    deep_lrs: tuple[float, ...] = (0.5, 2.0)
    deep_steps: int = 1000
    reg_dataset: str = "mnist1d"
    reg_steps: int = 15000
    ghost_sizes: tuple[int, ...] = (2, 4, 8, 16, 60)
    ghost_steps: int = 800
    fit_threshold: float = 0.99
    workers: int = 2
    noise: dict = field(
        default_factory=lambda: {"mean_range": 0.5, "scale_range": 0.25, "jitter": 0.1}
    )

    def __post_init__(self):
        problems = []
        for name in (
            "steps",
            "seeds",
            "eval_every",
            "probe_every",
            "ics_every",
            "deep_steps",
            "reg_steps",
            "ghost_steps",
            "probe_size",
            "train_eval_size",
            "early_step",
            "early_window",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 for batch statistics (got {self.batch_size})")
        if not self.hidden or not 0 <= self.unit < self.hidden[-1]:
            problems.append(f"unit {self.unit} must index the last hidden layer {self.hidden}")
        if any(r <= 0 for r in (*self.lrs, *self.deep_lrs)) or not self.lrs or not self.deep_lrs:
            problems.append("learning rates must be positive (and at least one given)")
        if any(k < 2 or k > self.batch_size for k in self.ghost_sizes):
            problems.append(f"ghost sizes must lie in [2, batch_size]; got {self.ghost_sizes}")
        if problems:
            raise ValueError("invalid IoffeConfig: " + "; ".join(problems))

    @classmethod
    def full(cls, **overrides) -> IoffeConfig:
        """The long schedule of ``--full``: the paper's 50,000 steps, 3 seeds.

        Parameters
        ----------
        **overrides
            Fields to set on top of the long schedule.
        """
        base = dict(
            steps=50_000,
            seeds=3,
            eval_every=1000,
            probe_every=100,
            ics_every=500,
            early_step=1000,
            deep_steps=20_000,
            reg_steps=60_000,
            ghost_steps=10_000,
        )
        return cls(**{**base, **overrides})

    def scaled(self, steps: int) -> IoffeConfig:
        """The same design with ``steps`` sweep steps; the other schedules scale with it.

        Parameters
        ----------
        steps : int
            New number of sweep steps (``--steps``).
        """
        f = steps / self.steps

        def s(v):
            return max(1, int(round(v * f)))

        return replace(
            self,
            steps=steps,
            deep_steps=s(self.deep_steps),
            reg_steps=s(self.reg_steps),
            ghost_steps=s(self.ghost_steps),
            eval_every=min(self.eval_every, max(1, steps // 8)),
            early_step=s(self.early_step),
            early_window=s(self.early_window),
            probe_every=min(self.probe_every, max(1, steps // 10)),
            ics_every=min(self.ics_every, max(1, steps // 10)),
        )

    def to_json(self) -> dict:
        """The settings as a JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RunSpec:
    """One training run: which network, how trained, and with what seed.

    Attributes
    ----------
    arm : str
        One of :data:`ARMS`.
    lr : float
        SGD learning rate.
    seed : int
        Index of the seed (``seed_entropy`` is derived from it).
    seed_entropy : int
        Entropy of the run's generators: initial weights, batch order, noise and probe noise.
        The same entropy gives the same initial weights and batch order in every arm.
    steps : int
        SGD steps.
    dataset : str
        Key of the dataset the run uses (``"main"`` or ``"reg"``).
    hidden : tuple of int
        Hidden widths.
    init_std : float
        Initial weight scale.
    ghost : int or None
        Virtual batch size (GhostBatchNorm) instead of plain BatchNorm, for arm ``"bn"``.
    measure : bool
        Whether to probe distributions and measure ICS.
    stop_at_fit : bool
        Stop at the first evaluation where the accuracy on the whole training set reaches
        ``config.fit_threshold`` (``steps`` is then a cap).
    """

    arm: str
    lr: float
    seed: int
    seed_entropy: int
    steps: int
    dataset: str = "main"
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.1
    ghost: int | None = None
    measure: bool = False
    stop_at_fit: bool = False


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
            if ghost is None:
                modules.append(BatchNorm(width, momentum=config.bn_momentum))
            else:
                modules.append(
                    GhostBatchNorm(width, virtual_batch_size=ghost, momentum=config.bn_momentum)
                )
        if arm == "noisy_bn":
            modules.append(NoisyShift(noise_rng, **config.noise))
        modules.append(Sigmoid())
        fan_in = width
    modules.append(Linear(fan_in, n_classes, rng=init_rng, std=init_std))
    return Sequential(*modules)


def percentile_change(p: np.ndarray) -> np.ndarray:
    """Per unit, how much the distribution moved between consecutive probes.

    Parameters
    ----------
    p : ndarray, shape (probes, 3, units)
        The 15th, 50th and 85th percentiles of each unit's input at each probe.

    Returns
    -------
    ndarray, shape (probes - 1, units)
        Mean absolute change of the three percentiles from one probe to the next, divided by
        the 15-85 width (averaged over the two probes). 0 means the distribution did not move;
        1 means its percentiles moved by a whole 15-85 width.
    """
    p = np.asarray(p, dtype=np.float64)
    width = p[:, 2] - p[:, 0]
    scale = np.maximum(0.5 * (width[1:] + width[:-1]), 1e-12)
    return np.abs(np.diff(p, axis=0)).mean(axis=1) / scale


def _window_means(steps: list[int], change: np.ndarray, early_end: int) -> dict:
    """Mean change per probe interval over the early (ending <= early_end) and late ones."""
    ends = np.asarray(steps[1:])
    starts = np.asarray(steps[:-1])
    early, late = ends <= early_end, starts >= early_end
    return {
        "early": float(change[early].mean()) if early.any() else math.nan,
        "late": float(change[late].mean()) if late.any() else math.nan,
    }


def _linear_indices(net: Sequential) -> list[int]:
    return [i for i, m in enumerate(net.modules) if isinstance(m, Linear)]


def ics_measure(net: Sequential, x: np.ndarray, y: np.ndarray, lr: float, layer: int) -> dict:
    """Santurkar et al. (2018)'s internal covariate shift of one layer, on one batch.

    G is the gradient of the loss with respect to the weights of module ``layer`` (a Linear)
    on the batch; G' is the same gradient after only the modules before ``layer`` took their
    SGD step (with their gradients on that batch). Both passes see the same noise draw. The
    network itself is not changed and its random streams are not consumed (the work is done
    on copies).

    Parameters
    ----------
    net : Sequential
    x, y : ndarray
        The batch.
    lr : float
        Learning rate of the update.
    layer : int
        Index in ``net.modules`` of the Linear layer measured.

    Returns
    -------
    dict
        ``relative`` = ||G - G'|| / ||G|| and ``cosine`` = cos(G, G').
    """
    first = copy.deepcopy(net)
    second = copy.deepcopy(net)  # same parameters and the same noise-generator state
    loss, dlogits = softmax_cross_entropy(first.forward(x, training=True, update_stats=False), y)
    first.backward(dlogits)
    g = np.array(first.modules[layer].gradients()["W"], dtype=np.float64)
    for i in range(layer):
        params, grads = second.modules[i].parameters(), first.modules[i].gradients()
        for name, p in params.items():
            p -= lr * grads[name]
    _, dlogits2 = softmax_cross_entropy(second.forward(x, training=True, update_stats=False), y)
    second.backward(dlogits2)
    g2 = np.asarray(second.modules[layer].gradients()["W"], dtype=np.float64)
    norm, norm2 = float(np.linalg.norm(g)), float(np.linalg.norm(g2))
    rel = float(np.linalg.norm(g - g2) / norm) if norm > 0 else math.nan
    cos = float(np.sum(g * g2) / (norm * norm2)) if norm > 0 and norm2 > 0 else math.nan
    return {"relative": rel, "cosine": cos}


def _probe(net: Sequential, probe: np.ndarray, probe_rng: np.random.Generator, arm: str) -> dict:
    """Percentiles of the last hidden layer's sigmoid input (and, for noisy BN, before noise).

    NoisyShift draws its noise from ``probe_rng`` during the probe, so the training noise
    stream is untouched; no running statistics are updated.
    """
    noisy = [m for m in net.modules if isinstance(m, NoisyShift)]
    saved = [m.rng for m in noisy]
    for m in noisy:
        m.rng = probe_rng
    try:
        acts = net.forward_collect(probe, training=True, update_stats=False)
    finally:
        for m, rng in zip(noisy, saved, strict=True):
            m.rng = rng
    sig = [i for i, m in enumerate(net.modules) if isinstance(m, Sigmoid)][-1]
    out = {"seen": np.percentile(acts[sig - 1], QUANTILES, axis=0)}
    if arm == "noisy_bn":
        out["before_noise"] = np.percentile(acts[sig - 2], QUANTILES, axis=0)
    return out


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
) -> dict:
    """Train one arm at one learning rate for one seed; return its curves and numbers.

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

    Returns
    -------
    dict
        JSON-ready: curves, final accuracies and loss, and (if ``spec.measure``) the
        distribution change and ICS numbers.
    """
    start = time.process_time()
    init_seed, order_seed, noise_seed, probe_seed = np.random.SeedSequence(spec.seed_entropy).spawn(
        4
    )
    net = build_network(
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
    order_rng = np.random.default_rng(order_seed)
    probe_rng = np.random.default_rng(probe_seed)
    opt = SGD(net, spec.lr)
    probe = data.x_test[: config.probe_size]
    x_tr_eval = data.x_train[: config.train_eval_size]
    y_tr_eval = data.y_train[: config.train_eval_size]
    ics_layer = _linear_indices(net)[-2]

    eval_steps = set(_eval_points(spec.steps, config.eval_every, (config.early_step,)))
    probe_steps = set(_eval_points(spec.steps, config.probe_every)) if spec.measure else set()
    curves: dict[str, list] = {
        "steps": [],
        "test_accuracy": [],
        "train_accuracy": [],
        "train_loss": [],
    }
    if val is not None:
        curves["val_accuracy"] = []
    probes: dict[str, list] = {"steps": [], "seen": [], "before_noise": []}
    ics: list[dict] = []
    n, bs = data.x_train.shape[0], config.batch_size
    perm, pos, losses, reported = order_rng.permutation(n), 0, [], 0
    diverged = False
    for step in range(spec.steps + 1):
        if step in probe_steps and not diverged:
            pr = _probe(net, probe, probe_rng, spec.arm)
            probes["steps"].append(step)
            for k, v in pr.items():
                probes[k].append(v)
        if step in eval_steps:
            curves["steps"].append(step)
            if diverged:
                for k in curves:
                    if k not in ("steps", "train_loss"):
                        curves[k].append(1.0 / data.n_classes)
            else:
                curves["test_accuracy"].append(
                    accuracy(net.forward(data.x_test, training=False), data.y_test)
                )
                curves["train_accuracy"].append(
                    accuracy(net.forward(x_tr_eval, training=False), y_tr_eval)
                )
                if val is not None:
                    curves["val_accuracy"].append(
                        accuracy(net.forward(val[0], training=False), val[1])
                    )
            curves["train_loss"].append(float(np.mean(losses)) if losses else math.nan)
            losses = []
            if progress is not None and step > reported:
                progress(step - reported)
                reported = step
            if (
                spec.stop_at_fit
                and step > 0
                and not diverged
                and accuracy(net.forward(data.x_train, training=False), data.y_train)
                >= config.fit_threshold
            ):
                break
        if step == spec.steps:
            break
        if pos + bs > n:
            perm, pos = order_rng.permutation(n), 0
        idx = perm[pos : pos + bs]
        pos += bs
        if diverged:
            continue
        xb, yb = data.x_train[idx], data.y_train[idx]
        if spec.measure and step > 0 and step % config.ics_every == 0:
            ics.append({"step": step, **ics_measure(net, xb, yb, spec.lr, ics_layer)})
        with np.errstate(over="ignore", invalid="ignore"):
            logits = net.forward(xb, training=True)
            loss, dlogits = softmax_cross_entropy(logits, yb)
        if not math.isfinite(loss):
            diverged = True  # recorded as chance accuracy from here on, not an error
            losses.append(math.inf)
            continue
        losses.append(loss)
        net.backward(dlogits)
        opt.step()

    final_train = (
        1.0 / data.n_classes
        if diverged
        else accuracy(net.forward(data.x_train, training=False), data.y_train)
    )
    if progress is not None and spec.steps > reported:
        progress(spec.steps - reported)  # stopped early: the rest of the budget counts as done
    out = {
        "spec": {**asdict(spec), "hidden": list(spec.hidden)},
        "steps_run": curves["steps"][-1],
        "curves": curves,
        "diverged": diverged,
        "final_test_accuracy": curves["test_accuracy"][-1],
        "final_train_accuracy": final_train,
        "final_train_loss": curves["train_loss"][-1],
        "parameter_digest": hashlib.sha256(
            b"".join(np.ascontiguousarray(v).tobytes() for v in net.parameters().values())
        ).hexdigest(),
    }
    if val is not None:
        out["final_val_accuracy"] = curves["val_accuracy"][-1]
    i_early = int(np.searchsorted(curves["steps"], min(config.early_step, curves["steps"][-1])))
    out["early_step"] = curves["steps"][i_early]
    out["early_test_accuracy"] = curves["test_accuracy"][i_early]
    if spec.ghost is not None and not diverged:
        out["train_mode_test_accuracy"] = _train_mode_accuracy(net, data, bs)
    if spec.measure:
        out.update(_measures(probes, ics, config, spec))
    out["cpu_seconds"] = time.process_time() - start
    return out


def _train_mode_accuracy(net: Sequential, data: Dataset, batch: int) -> float:
    """Test accuracy with batch statistics (batches of ``batch``), no running-stat updates."""
    n = (data.x_test.shape[0] // batch) * batch
    hits = 0
    for i in range(0, n, batch):
        logits = net.forward(data.x_test[i : i + batch], training=True, update_stats=False)
        hits += int(np.sum(np.argmax(logits, axis=1) == data.y_test[i : i + batch]))
    return hits / max(1, n)


def _measures(probes: dict, ics: list[dict], config: IoffeConfig, spec: RunSpec) -> dict:
    steps = probes["steps"]
    early_end = min(config.early_window, spec.steps // 2 or 1)
    dist = {}
    for key in ("seen", "before_noise"):
        if not probes[key] or len(steps) < 2:
            continue
        p = np.asarray(probes[key])  # (probes, 3, units)
        change = percentile_change(p)  # (probes - 1, units)
        curve = change.mean(axis=1)
        dist[key] = {
            "curve": curve.tolist(),
            **_window_means(steps, curve, early_end),
            "unit_percentiles": p[:, :, config.unit].tolist(),
        }
    ics_rel = [m["relative"] for m in ics if math.isfinite(m["relative"])]
    ics_cos = [m["cosine"] for m in ics if math.isfinite(m["cosine"])]
    return {
        "probe_steps": steps,
        "early_window": early_end,
        "distribution": dist,
        "ics": {
            "relative": float(np.mean(ics_rel)) if ics_rel else math.nan,
            "cosine": float(np.mean(ics_cos)) if ics_cos else math.nan,
            "count": len(ics_rel),
        },
    }
