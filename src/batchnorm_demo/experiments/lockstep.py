"""Train a group of runs in lockstep on one :class:`.batched.BatchedNet`.

:func:`train_group` gives, for every :class:`RunSpec` of the group, the same output as
:func:`.ioffe.train_arm` run on it alone: the same schedule of evaluations, probes and
measurements, the same random streams (derived from each run's seed entropy: initial
weights, batch order, noise, probe noise), the same rules for divergence and for stopping
once fitted. A run that diverges or fits leaves the batch (its record is final), so the
others go on without it.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from ..data import Dataset
from .batched import BatchedNet, Tape, softmax_cross_entropy_batched
from .ioffe_config import IoffeConfig, RunSpec
from .measures import QUANTILES, summarize_measures
from .smoothness import smoothness_points, summarize_smoothness

__all__ = ["group_key", "train_group"]


def group_key(spec: RunSpec) -> tuple:
    """Runs with equal keys can share one batched model (they differ in rate, initial scale,
    ghost size and seed only)."""
    return (spec.arm, spec.hidden, spec.dataset, spec.steps, spec.measure, spec.stop_at_fit,
            spec.ghost is None)  # fmt: skip


def _eval_points(steps: int, every: int, extra: tuple[int, ...] = ()) -> list[int]:
    pts = set(range(0, steps, every)) | {steps} | {e for e in extra if 0 <= e <= steps}
    return sorted(pts)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.mean(np.argmax(logits, axis=2) == labels, axis=1)


class _Streams:
    """Per seed: batch order, training noise and probe noise (as :func:`.ioffe.train_arm`)."""

    def __init__(self, entropies: list[int], n: int, batch: int):
        self.order, self.noise, self.probe, self.init = [], [], [], []
        for e in entropies:
            init, order, noise, probe = np.random.SeedSequence(e).spawn(4)
            self.init.append(init)
            self.order.append(np.random.default_rng(order))
            self.noise.append(np.random.default_rng(noise))
            self.probe.append(np.random.default_rng(probe))
        self.n, self.batch = n, batch
        self.perm = [g.permutation(n) for g in self.order]
        self.pos = 0

    def next_batch(self) -> list[np.ndarray]:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = [g.permutation(self.n) for g in self.order], 0
        idx = [p[self.pos : self.pos + self.batch] for p in self.perm]
        self.pos += self.batch
        return idx

    @staticmethod
    def draw(rngs, n: int, widths, noise: dict, dtype=np.float64) -> list[tuple]:
        """NoisyShift's draws for every hidden layer, per seed, in the layers' order."""
        a, s_range, jit = noise["mean_range"], noise["scale_range"], noise["jitter"]
        out = [tuple(np.empty((len(rngs), n, d), dtype) for _ in "ms") for d in widths]
        for k, rng in enumerate(rngs):
            for (m, s), d in zip(out, widths, strict=True):
                mu_t = rng.uniform(-a, a, size=d)
                sigma_t = rng.uniform(1.0, 1.0 + s_range, size=d)
                # uniform(low, high) is low + (high - low) * random(), normal(loc, scale) is
                # loc + scale * standard_normal(): the same numbers as NoisyShift's calls (the
                # equivalence tests check it), without the slow array-parameter paths; each
                # sum is formed in float64 and rounded once into the output's dtype
                low = mu_t - jit
                r = rng.random((n, d))
                r *= (mu_t + jit) - low
                np.add(low, r, out=m[k])
                r = rng.standard_normal((n, d))
                r *= jit
                np.add(sigma_t, r, out=s[k])
        return out


def _as_dtype(data: Dataset, dtype: np.dtype) -> Dataset:
    if data.x_train.dtype == dtype and data.x_test.dtype == dtype:
        return data
    return Dataset(data.name, data.x_train.astype(dtype), data.y_train, data.x_test.astype(dtype),
                   data.y_test, data.description)  # fmt: skip


class _Record:
    """One run's curves and measurements while it trains."""

    def __init__(self, spec: RunSpec, has_val: bool):
        self.spec = spec
        self.curves = {"steps": [], "test_accuracy": [], "train_accuracy": [], "train_loss": []}
        if has_val:
            self.curves["val_accuracy"] = []
        self.probes = {"steps": [], "seen": [], "before_noise": []}
        self.ics: list[dict] = []
        self.smooth: list[dict] = []
        self.losses: list[float] = []
        self.diverged = False
        self.final: dict = {}


def _check_group(specs: list[RunSpec]) -> None:
    keys = {group_key(s) for s in specs}
    if len(keys) != 1:
        raise ValueError(f"runs of one group must share arm, shape and schedule; got {keys}")


def _ics(net, tape, grads, xs, ys, noise, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Santurkar et al.'s ICS of hidden Linear ``layer``, per run (see
    :func:`.measures.ics_measure`): G from the step's gradient, G' after only the earlier
    layers' SGD step, same batch and noise."""
    moved = dict(net.params)
    for k in net.params:
        if int("".join(ch for ch in k if ch.isdigit())) < layer:  # W0, b0, gamma0, beta0, ...
            lr = net.lr.reshape((-1,) + (1,) * (net.params[k].ndim - 1))
            moved[k] = (net.params[k] - lr * grads[k]).astype(net.dtype, copy=False)
    t2 = Tape()
    logits = net.forward(xs, training=True, noise=noise, params=moved, tape=t2)
    _, d2 = softmax_cross_entropy_batched(logits, ys)
    g2 = net.backward(d2, t2, params=moved)[f"W{layer}"]
    g, g2 = grads[f"W{layer}"].astype(np.float64), g2.astype(np.float64)
    norm = np.sqrt(np.sum(g * g, axis=(1, 2)))
    norm2 = np.sqrt(np.sum(g2 * g2, axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.sqrt(np.sum((g - g2) ** 2, axis=(1, 2))) / norm
        cos = np.sum(g * g2, axis=(1, 2)) / (norm * norm2)
    return rel, cos


def train_group(
    specs: list[RunSpec],
    data: Dataset,
    config: IoffeConfig,
    *,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
    keep_parameters: bool = False,
) -> list[dict]:
    """Train every run of ``specs`` at once; return their outputs in the order of ``specs``.

    Parameters
    ----------
    specs : list of RunSpec
        Runs sharing :func:`group_key`.
    data : Dataset
    config : IoffeConfig
    val : (x_val, y_val), optional
    progress : callable(steps_done), optional
        Called with the number of group steps done since the last call (one group step
        advances every run of the group).
    keep_parameters : bool
        Also return each run's final parameters under ``"parameters"`` (a list of arrays in
        ``Sequential.parameters()`` order; not JSON; for tests).

    Returns
    -------
    list of dict
        As :func:`.ioffe.train_arm` returns for each spec.
    """
    _check_group(specs)
    start = time.process_time()
    entropies = list(dict.fromkeys(s.seed_entropy for s in specs))  # first-seen order
    order = sorted(range(len(specs)), key=lambda i: (entropies.index(specs[i].seed_entropy), i))
    group = _Group([specs[i] for i in order], entropies, data, config, val)
    spec0, steps, reported = specs[0], specs[0].steps, 0
    eval_steps = set(_eval_points(steps, config.eval_every, (config.early_step,)))
    probe_steps = set(_eval_points(steps, config.probe_every)) if spec0.measure else set()
    for step in range(steps + 1):
        if step in probe_steps and group.active:
            group.probe(step)
        if step in eval_steps:
            group.evaluate(step)
            if progress is not None and step > reported:
                progress(step - reported)
                reported = step
            if spec0.stop_at_fit and step > 0 and group.active:
                group.finish_fitted()
        if step == steps or (not group.active and not any(r.diverged for r in group.recs)):
            break  # (diverged runs record chance at every evaluation up to the cap)
        idx = group.streams.next_batch()
        if group.active:
            group.train_step(step, idx)
    if group.active:
        group.finish(list(range(len(group.active))))
    if progress is not None and steps > reported:
        progress(steps - reported)
    cpu = time.process_time() - start
    outs = [_output(rec, config, cpu / len(group.recs), keep_parameters) for rec in group.recs]
    back = [None] * len(specs)
    for k, i in enumerate(order):
        back[i] = outs[k]
    return back


class _Group:
    """The runs of one group while they train: the batched network, the random streams, each
    run's record, and which runs are still in the batch (``active``: the record index of
    each row of the network)."""

    def __init__(self, runs: list[RunSpec], entropies: list[int], data: Dataset,
                 config: IoffeConfig, val) -> None:  # fmt: skip
        spec0 = runs[0]
        seed_of = [entropies.index(s.seed_entropy) for s in runs]
        self.streams = _Streams(entropies, data.x_train.shape[0], config.batch_size)
        self.net = BatchedNet(
            spec0.arm, data.n_features, data.n_classes, spec0.hidden,
            [self.streams.init[k] for k in seed_of], [s.init_std for s in runs], seed_of,
            [s.lr for s in runs], None if spec0.ghost is None else [s.ghost for s in runs],
            config.bn_momentum, config.dtype,
        )  # fmt: skip
        self.data = _as_dtype(data, self.net.dtype)
        self.val = None if val is None else (np.asarray(val[0], self.net.dtype), val[1])
        self.recs = [_Record(s, val is not None) for s in runs]
        self.active = list(range(len(runs)))
        self.spec0, self.config = spec0, config
        self.chance = 1.0 / data.n_classes
        self.multipliers = np.asarray(config.smooth_multipliers, dtype=np.float64)

    def probe(self, step: int) -> None:
        """Record every active run's layer-input distribution on the probe set."""
        net, x, noisy = self.net, self.data.x_test[: self.config.probe_size], self.spec0.arm
        noisy, noise = noisy == "noisy_bn", None
        if noisy:
            noise = _Streams.draw(self.streams.probe, x.shape[0], net.hidden, self.config.noise,
                                  net.dtype)  # fmt: skip
        tape = Tape()
        net.forward(x, training=True, noise=noise, tape=tape)
        last = len(net.hidden) - 1
        # the last hidden layer's sigmoid input (after the noise for noisy BN), and before it
        pct = np.percentile(tape.pre_sig[last], QUANTILES, axis=1)
        before = np.percentile(tape.bn_out[last], QUANTILES, axis=1) if noisy else None
        for r, i in enumerate(self.active):
            probes = self.recs[i].probes
            probes["steps"].append(step)
            probes["seen"].append(pct[:, r, :])
            if before is not None:
                probes["before_noise"].append(before[:, r, :])

    def evaluate(self, step: int) -> None:
        """Append one point to the curves of every run still recording."""
        data, n = self.data, self.config.train_eval_size
        sets = [("test_accuracy", data.x_test, data.y_test),
                ("train_accuracy", data.x_train[:n], data.y_train[:n])]  # fmt: skip
        if self.val is not None:
            sets.append(("val_accuracy", *self.val))
        accs = {}
        if self.active:  # (diverged runs record chance)
            accs = {key: _accuracy(self.net.forward(x, training=False), y) for key, x, y in sets}
        row = {i: r for r, i in enumerate(self.active)}
        for i, rec in enumerate(self.recs):
            if i not in row and not rec.diverged:
                continue  # finished (fitted): its curves end where it stopped
            rec.curves["steps"].append(step)
            for key, _, _ in sets:
                rec.curves[key].append(self.chance if rec.diverged else float(accs[key][row[i]]))
            rec.curves["train_loss"].append(float(np.mean(rec.losses)) if rec.losses else math.nan)
            rec.losses = []

    def finish_fitted(self) -> None:
        """Finish the runs whose accuracy on the whole training set reached the threshold."""
        acc = _accuracy(self.net.forward(self.data.x_train, training=False), self.data.y_train)
        fit = [r for r in range(len(self.active)) if acc[r] >= self.config.fit_threshold]
        self.finish(fit, train_acc=acc[fit])

    def finish(self, rows: list[int], *, diverged: bool = False, train_acc=None) -> None:
        """Record the final numbers of the runs at ``rows`` and drop them from the batch
        (``train_acc``: their accuracy on the whole training set, when already computed)."""
        if not rows:
            return
        data, net = self.data, self.net
        sub = copy.copy(net)
        sub.keep(rows)
        tm = None
        if not diverged:
            if train_acc is None:
                train_acc = _accuracy(sub.forward(data.x_train, training=False), data.y_train)
            if self.spec0.ghost is not None:
                tm = _train_mode_accuracy(sub, data, self.config.batch_size)
        for j, row in enumerate(rows):
            rec = self.recs[self.active[row]]
            rec.final["train"] = self.chance if diverged else float(train_acc[j])
            if tm is not None:
                rec.final["train_mode"] = float(tm[j])
            rec.final["params"] = [np.array(p) for p in sub.parameter_list(j)]
        keep = [r for r in range(len(self.active)) if r not in set(rows)]
        self.active = [self.active[r] for r in keep]
        if keep:
            net.keep(keep)

    def _forward_loss(self, xs, ys_seed, noise):
        """Training forward of the active runs: tape, per-run loss, d loss / d logits, labels."""
        net = self.net
        ys = ys_seed[net.seed_of]
        tape = Tape()
        with np.errstate(over="ignore", invalid="ignore"):
            logits = net.forward(xs, training=True, noise=noise, tape=tape)
            loss, dlogits = softmax_cross_entropy_batched(logits, ys)
        return tape, loss, dlogits, ys

    def train_step(self, step: int, idx: list[np.ndarray]) -> None:
        """One SGD step of every active run on its seed's batch ``idx`` (runs whose loss is
        not finite leave the batch as diverged), with the measures due at ``step``."""
        spec0, config, net = self.spec0, self.config, self.net
        rows = np.stack(idx)  # (seeds, batch): one gather each, half the time of 60-row stacks
        xs, ys_seed = self.data.x_train[rows], self.data.y_train[rows]
        noise = None
        if spec0.arm == "noisy_bn":
            noise = _Streams.draw(self.streams.noise, config.batch_size, spec0.hidden,
                                  config.noise, net.dtype)  # fmt: skip
        tape, loss, dlogits, ys = self._forward_loss(xs, ys_seed, noise)
        bad = [r for r in range(len(self.active)) if not math.isfinite(loss[r])]
        for r in range(len(self.active)):
            self.recs[self.active[r]].losses.append(float(loss[r]) if r not in bad else math.inf)
        if bad:  # these runs stop here (recorded as chance from now on, not an error)
            for r in bad:
                self.recs[self.active[r]].diverged = True
            self.finish(bad, diverged=True)
            if not self.active:
                return
            # the runs that go on: the same batch and noise, without the others
            tape, loss, dlogits, ys = self._forward_loss(xs, ys_seed, noise)
        grads = net.backward(dlogits, tape)
        self._measure(step, tape, grads, xs, ys, noise, loss)
        net.step(grads)
        net.update_running(tape)

    def _measure(self, step, tape, grads, xs, ys, noise, loss) -> None:
        """Santurkar et al.'s ICS and the smoothness measures, on the steps they are due."""
        spec0, config, net = self.spec0, self.config, self.net
        if spec0.measure and step > 0 and step % config.ics_every == 0:
            rel, cos = _ics(net, tape, grads, xs, ys, noise, len(spec0.hidden) - 1)
            for r, i in enumerate(self.active):
                self.recs[i].ics.append(
                    {"step": step, "relative": float(rel[r]), "cosine": float(cos[r])}
                )
        if spec0.measure and step % config.smooth_every == 0:
            pts = smoothness_points(net, xs, ys, noise, loss, grads, self.multipliers)
            for r, i in enumerate(self.active):
                self.recs[i].smooth.append({"step": step, **{k: v[r] for k, v in pts.items()}})


def _train_mode_accuracy(net: BatchedNet, data: Dataset, batch: int) -> np.ndarray:
    """Per run, test accuracy with batch statistics (batches of ``batch``), no updates."""
    n = (data.x_test.shape[0] // batch) * batch
    hits = np.zeros(net.runs)
    for i in range(0, n, batch):
        logits = net.forward(data.x_test[i : i + batch], training=True)
        hits += np.sum(np.argmax(logits, axis=2) == data.y_test[i : i + batch], axis=1)
    return hits / max(1, n)


def _output(rec: _Record, config: IoffeConfig, cpu: float, keep: bool) -> dict:
    spec, curves = rec.spec, rec.curves
    out = {
        "spec": {**asdict(spec), "hidden": list(spec.hidden)},
        "steps_run": curves["steps"][-1],
        "curves": curves,
        "diverged": rec.diverged,
        "final_test_accuracy": curves["test_accuracy"][-1],
        "final_train_accuracy": rec.final["train"],
        "final_train_loss": curves["train_loss"][-1],
        "parameter_digest": hashlib.sha256(
            b"".join(np.ascontiguousarray(v).tobytes() for v in rec.final["params"])
        ).hexdigest(),
    }
    if "val_accuracy" in curves:
        out["final_val_accuracy"] = curves["val_accuracy"][-1]
    i_early = int(np.searchsorted(curves["steps"], min(config.early_step, curves["steps"][-1])))
    out["early_step"] = curves["steps"][i_early]
    out["early_test_accuracy"] = curves["test_accuracy"][i_early]
    if "train_mode" in rec.final:
        out["train_mode_test_accuracy"] = rec.final["train_mode"]
    if spec.measure:
        out.update(summarize_measures(rec.probes, rec.ics, config, spec))
        out["smoothness"] = summarize_smoothness(rec.smooth)
    out["cpu_seconds"] = cpu
    if keep:
        out["parameters"] = rec.final["params"]
    return out
