r"""Santurkar et al. (2018), section 3: how smooth the loss is along the gradient.

At a training step with parameters :math:`\theta`, batch B (and, for noisy BN, the step's
noise draw) and gradient :math:`g = \nabla L(\theta)`, the loss and its gradient are
evaluated at :math:`\theta_c = \theta - c\,\eta\,g` for each multiplier ``c`` of the run's
learning rate :math:`\eta` (the step SGD takes is ``c = 1``), in training mode, without
touching the running statistics:

* *loss landscape variation*: the range (min and max) of :math:`L(\theta_c)` over
  ``c`` in {0} and the multipliers;
* *gradient predictiveness*: the range of :math:`\|g - \nabla L(\theta_c)\|_2`
  (small: the gradient here predicts the gradient there);
* *effective beta-smoothness*: :math:`\max_c \|g - \nabla L(\theta_c)\|_2 /
  \|c\,\eta\,g\|_2`, the largest ratio of gradient change to distance moved.

All parameters count (weights, biases, gamma and beta). :func:`smoothness_points` computes
them for every run of a :class:`.batched.BatchedNet`; :func:`smoothness_measure` is the same on
one ``Sequential`` (the one-by-one reference).
"""

from __future__ import annotations

import copy
import math

import numpy as np

from batchnorm.nn import Sequential, softmax_cross_entropy

from .batched import Tape, softmax_cross_entropy_batched

__all__ = ["smoothness_measure", "smoothness_points", "summarize_smoothness"]

KEYS = ("loss_min", "loss_max", "grad_change_min", "grad_change_max", "beta")


def _finish(losses, changes, multipliers, lr, g_norm) -> dict:
    losses, changes = np.asarray(losses), np.asarray(changes)
    dist = np.multiply.outer(np.asarray(multipliers), np.asarray(lr) * g_norm)
    with np.errstate(invalid="ignore", divide="ignore"):
        beta = (changes / dist).max(axis=0)
    return {
        "loss_min": losses.min(axis=0),
        "loss_max": losses.max(axis=0),
        "grad_change_min": changes.min(axis=0),
        "grad_change_max": changes.max(axis=0),
        "beta": beta,
    }


def smoothness_points(net, xs, ys, noise, loss, grads, multipliers) -> dict:
    """The three measures for every run of ``net`` at its current parameters.

    Parameters
    ----------
    net : BatchedNet
    xs, ys : ndarray
        The step's batch per seed (S, N, in) and labels per run (R, N).
    noise : list or None
        The step's noise draws (noisy BN).
    loss : ndarray, shape (R,)
        The loss at the current parameters.
    grads : dict
        The gradients at the current parameters.
    multipliers : ndarray
        Multiples of each run's learning rate to move along ``-g``.

    Returns
    -------
    dict
        Each of :data:`KEYS` -> ndarray of shape (R,).
    """
    grads = {k: v.astype(np.float64) for k, v in grads.items()}  # norms in float64
    g_norm = np.sqrt(sum(np.sum(v * v, axis=tuple(range(1, v.ndim))) for v in grads.values()))
    losses, changes = [loss], []
    for c in multipliers:
        moved = net.shifted(grads, c * net.lr)
        tape = Tape()
        with np.errstate(over="ignore", invalid="ignore"):
            logits = net.forward(xs, training=True, noise=noise, params=moved, tape=tape)
            loss_c, d = softmax_cross_entropy_batched(logits, ys)
            g_c = net.backward(d, tape, params=moved)
            diff = sum(
                np.sum((grads[k] - g_c[k].astype(np.float64)) ** 2, axis=tuple(range(1, v.ndim)))
                for k, v in grads.items()
            )
        losses.append(loss_c)
        changes.append(np.sqrt(diff))
    return _finish(losses, changes, multipliers, net.lr, g_norm)


def smoothness_measure(net: Sequential, x, y, lr: float, multipliers) -> dict:
    """The same measures for one network (copies are used: ``net`` and its random streams
    are untouched; every evaluation sees the noise draw the next training step will)."""
    first = copy.deepcopy(net)
    loss, d = softmax_cross_entropy(first.forward(x, training=True, update_stats=False), y)
    first.backward(d)
    g = {k: np.array(v, dtype=np.float64) for k, v in first.gradients().items()}
    g_norm = math.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
    losses, changes = [loss], []
    for c in multipliers:
        moved = copy.deepcopy(net)
        for name, p in moved.parameters().items():
            p -= c * lr * g[name]
        with np.errstate(over="ignore", invalid="ignore"):
            loss_c, d = softmax_cross_entropy(
                moved.forward(x, training=True, update_stats=False), y
            )
            moved.backward(d)
        g_c = moved.gradients()
        losses.append(loss_c)
        changes.append(math.sqrt(sum(float(np.sum((g[k] - g_c[k]) ** 2)) for k in g)))
    out = _finish(losses, changes, multipliers, lr, g_norm)
    return {k: float(v) for k, v in out.items()}


def summarize_smoothness(points: list[dict]) -> dict:
    """A run's measurements as curves over the measured steps, plus their means.

    Returns
    -------
    dict
        ``steps``; per measure of :data:`KEYS` a curve; ``loss_range`` (max - min) curve;
        ``mean_loss_range``, ``mean_grad_change_max`` and ``mean_beta`` over the finite
        points (NaN when there are none).
    """
    out: dict = {"steps": [p["step"] for p in points]}
    for k in KEYS:
        out[k] = [float(p[k]) for p in points]
    out["loss_range"] = [hi - lo for hi, lo in zip(out["loss_max"], out["loss_min"], strict=True)]
    for name, key in (("mean_loss_range", "loss_range"), ("mean_grad_change_max",
                      "grad_change_max"), ("mean_beta", "beta")):  # fmt: skip
        vals = [v for v in out[key] if math.isfinite(v)]
        out[name] = float(np.mean(vals)) if vals else math.nan
    return out
