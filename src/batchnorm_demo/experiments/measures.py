"""What the demo measures in a training run: the distribution change of a layer's inputs
(:func:`percentile_change` of the probes of :func:`probe_distribution`) and Santurkar et
al.'s internal covariate shift (:func:`ics_measure`); see :mod:`.ioffe`."""

from __future__ import annotations

import copy
import math

import numpy as np

from batchnorm.nn import NoisyShift, Sequential, Sigmoid, softmax_cross_entropy

from .ioffe_config import IoffeConfig, RunSpec

__all__ = [
    "QUANTILES",
    "ics_measure",
    "percentile_change",
    "probe_distribution",
    "summarize_measures",
]

QUANTILES = (15, 50, 85)


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


def probe_distribution(
    net: Sequential, probe: np.ndarray, probe_rng: np.random.Generator, arm: str
) -> dict:
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


def summarize_measures(probes: dict, ics: list[dict], config: IoffeConfig, spec: RunSpec) -> dict:
    """A measured run's distribution change (per probe interval, early and late) and its
    mean ICS, from the probes of :func:`probe_distribution` and the :func:`ics_measure`
    results."""
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
