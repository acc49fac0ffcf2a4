"""The report's smoothness section (Santurkar et al. 2018, section 3): a table and a figure
in the manner of their Figure 4 (shaded ranges over training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._format import pm
from ..experiments.assess import LABELS

__all__ = ["smoothness_figure", "smoothness_table", "smoothness_text"]

COLORS = {"no_bn": "tab:gray", "bn": "tab:blue", "noisy_bn": "tab:orange"}
PANELS = (
    ("loss_min", "loss_max", "loss along the gradient", "loss landscape variation"),
    ("grad_change_min", "grad_change_max", "‖∇L(θ) − ∇L(θ′)‖₂", "gradient predictiveness"),
    (None, "beta", "max ‖Δ∇L‖ / ‖Δθ‖", "effective β-smoothness"),
)


def smoothness_text(results: dict) -> str:
    """The paragraph that says what is measured."""
    sm = results["smoothness"]
    mult = ", ".join(f"{m:g}" for m in sm["bn"]["multipliers"])
    every = results["config"]["smooth_every"]
    return (
        f"Every {every} steps of the sweep runs, on the step's batch (and noise draw), the loss "
        f"and its gradient are evaluated after moving {mult} times the learning rate along the "
        "negative gradient, in training mode, without changing the run. Loss landscape "
        "variation: the range of those losses (with the current one); gradient predictiveness: "
        "the range of the l2 distance between the gradient here and there; effective "
        "β-smoothness: the largest ratio of that distance to the distance moved. Lower means "
        "smoother. Table: means over the run, mean ± sd over seeds; figure: per arm, the shaded "
        "band spans the measure's range (min to max over the step sizes, and over seeds), the "
        "line its mean over seeds, at the common rate (top row) and at each arm's chosen rate "
        "(bottom row)."
    )


def smoothness_table(results: dict):
    """Means over the run at the common rate and at each arm's chosen rate."""
    sm = results["smoothness"]
    common = repr(float(results["config"]["lrs"][0]))
    head = ["arm", "lr", "loss range", "gradient change (max)", "effective β"]
    rows = []
    for a in sm:
        for lr in dict.fromkeys([common, repr(float(sm[a]["lr"]))]):
            d = sm[a]["by_lr"][lr]
            tag = " (common)" if lr == common else " (chosen)"
            if lr == common and float(lr) == float(sm[a]["lr"]):
                tag = " (common, chosen)"
            rows.append(
                [LABELS[a], f"{float(lr):g}{tag}", pm(d["mean_loss_range"], 1, 3),
                 pm(d["mean_grad_change_max"], 1, 3), pm(d["mean_beta"], 1, 3)]
            )  # fmt: skip
    return head, rows


def _band(ax, steps, lo, hi, color, label):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)  # (seeds, points)
    with np.errstate(invalid="ignore"):
        ax.fill_between(steps, np.nanmin(lo, axis=0), np.nanmax(hi, axis=0), color=color,
                        alpha=0.25, lw=0)  # fmt: skip
        ax.plot(steps, np.nanmean(0.5 * (lo + hi), axis=0), color=color, lw=1.2, label=label)


def smoothness_figure(results: dict, path: Path, plt) -> None:
    """Draw the 2 x 3 figure (rows: common rate, chosen rate; columns: the three measures)."""
    sm = results["smoothness"]
    common = repr(float(results["config"]["lrs"][0]))
    steps = np.asarray(sm["bn"]["steps"], float)
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.6), sharex=True)
    for row, which in enumerate(("common", "chosen")):
        for col, (lo_key, hi_key, ylabel, title) in enumerate(PANELS):
            ax = axes[row, col]
            for a in sm:
                lr = common if which == "common" else repr(float(sm[a]["lr"]))
                cur = sm[a]["by_lr"][lr]["curves"]
                lo = cur[lo_key] if lo_key else cur[hi_key]
                _band(ax, steps, lo, cur[hi_key], COLORS[a], f"{LABELS[a]} (lr {float(lr):g})")
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            rate = f"common lr {float(common):g}" if which == "common" else "chosen rates"
            ax.set_title(f"{title}, {rate}", fontsize=10)
            if row == 1:
                ax.set_xlabel("training step")
            ax.legend(fontsize=8, loc="best")
    fig.suptitle("Smoothness along the gradient (Santurkar et al. 2018, Fig. 4 style); "
                 "lower is smoother", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
