"""The demo report's figures (PNG files); with :mod:`.sync_report`, the only modules that
import matplotlib, and only when a figure is drawn."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .experiments.assess import LABELS
from .experiments.ioffe import ARMS

__all__ = ["FIGURES", "write_figures"]

COLORS = {"no_bn": "tab:gray", "bn": "tab:blue", "noisy_bn": "tab:orange"}
FIGURES = (
    "learning_rates.png",
    "accuracy.png",
    "distribution.png",
    "robustness.png",
    "regularization.png",
)


def _plt():
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread(ax, x, vals, color, label, marker="o"):
    vals = np.asarray(vals, dtype=np.float64)
    mean = np.nanmean(vals, axis=1)
    ax.plot(x, mean, marker=marker, color=color, label=label)
    ax.fill_between(
        x, np.nanmin(vals, axis=1), np.nanmax(vals, axis=1), color=color, alpha=0.2, lw=0
    )


def _lr_figure(results: dict, summary: dict, path: Path) -> None:
    plt = _plt()
    lrs = [float(x) for x in results["config"]["lrs"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    step = results["ioffe"]["bn"]["early_step"]
    for arm in ARMS:
        sw = results["lr_sweep"][arm]
        test = [[100 * v for v in sw[repr(lr)]["test_accuracy"]] for lr in lrs]
        early = [[100 * v for v in sw[repr(lr)]["early_test_accuracy"]] for lr in lrs]
        loss = [sw[repr(lr)]["train_loss"] for lr in lrs]
        _spread(axes[0], lrs, test, COLORS[arm], LABELS[arm])
        _spread(axes[1], lrs, early, COLORS[arm], LABELS[arm])
        _spread(
            axes[2],
            lrs,
            np.maximum(np.asarray(loss, dtype=np.float64), 1e-6),
            COLORS[arm],
            LABELS[arm],
        )
        sel = results["selected_lr"][arm]
        axes[0].plot(
            [sel],
            [100 * np.mean(sw[repr(sel)]["test_accuracy"])],
            "*",
            ms=14,
            color=COLORS[arm],
            mec="k",
        )
    axes[0].axhline(
        100 * summary["usable_threshold"], color="k", ls=":", lw=1, label="usable threshold"
    )
    axes[0].set_title("final test accuracy (star: chosen on validation)")
    axes[1].set_title(f"test accuracy at step {step}")
    axes[2].set_title("final training loss (mean of the last interval)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs])
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8)
    n = results["config"]["seeds"]
    fig.suptitle(f"Learning-rate sweep: line = mean over {n} seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _accuracy_figure(results: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in ARMS:
        r = results["ioffe"][arm]
        steps = np.asarray(r["curves"]["steps"])
        vals = 100 * np.asarray(r["curves"]["test_accuracy"], dtype=np.float64)
        ax.plot(steps, vals.mean(0), color=COLORS[arm], label=f"{LABELS[arm]} (lr {r['lr']:g})")
        ax.fill_between(steps, vals.min(0), vals.max(0), color=COLORS[arm], alpha=0.2, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    n = results["config"]["seeds"]
    ax.set_title(f"Test accuracy at each arm's chosen rate ({n} seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _distribution_figure(results: dict, path: Path) -> None:
    plt = _plt()
    d = results["distribution_change"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.9))
    ax = axes[0]
    for arm in ARMS:
        steps = np.asarray(d[arm]["probe_steps"])
        mids = steps[1:]
        for key, style in (("seen", "-"), ("before_noise", "--")):
            if key not in d[arm]:
                continue
            curve = np.asarray(d[arm][key]["curve"], dtype=np.float64)
            label = LABELS[arm] + (" before the noise" if key == "before_noise" else "")
            ax.plot(mids, curve.mean(0), style, color=COLORS[arm], label=label)
    w = d["bn"]["early_window"]
    ax.axvline(w, color="k", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_title("change per probe interval\n(mean over units and seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    unit = d["bn"]["unit"]
    for ax, arm in zip(axes[1:], ARMS, strict=True):
        steps = d[arm]["probe_steps"]
        p = np.asarray(d[arm]["seen"]["unit_percentiles_seed0"])
        for i, (q, style) in enumerate((("15", "--"), ("50", "-"), ("85", "--"))):
            ax.plot(steps, p[:, i], style, color=COLORS[arm], label=f"{q}th percentile")
        if "before_noise" in d[arm]:
            b = np.asarray(d[arm]["before_noise"]["unit_percentiles_seed0"])
            for i in range(3):
                ax.plot(
                    steps,
                    b[:, i],
                    "-" if i == 1 else "--",
                    color="k",
                    lw=0.8,
                    alpha=0.6,
                    label="before the noise" if i == 1 else None,
                )
        ax.set_title(f"{LABELS[arm]}: unit {unit}, seed 0 (lr {results['ioffe'][arm]['lr']:g})")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[1].set_ylabel("input to the sigmoid")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax, groups: list[str], data: dict[str, list[list[float]]], arms) -> None:
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        for i, vals in enumerate(data[arm]):
            v = 100 * np.asarray(vals, dtype=np.float64)
            v = v[np.isfinite(v)]
            if v.size == 0:
                continue
            x = i + (j - (len(arms) - 1) / 2) * width
            ax.bar(
                x,
                np.nanmean(v),
                width,
                color=COLORS[arm],
                alpha=0.7,
                label=LABELS[arm] if i == 0 else None,
            )
            ax.plot(np.full(v.size, x), v, "k.", ms=5)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")


def _robustness_figure(results: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    stds = list(results["init"])
    groups = [f"init std {s}" for s in stds] + [
        f"{len(results['config']['deep_hidden'])} hidden layers"
    ]
    data = {}
    for arm in ARMS:
        data[arm] = [results["init"][s][arm]["final_test_accuracy"] for s in stds]
        deep = results["deep"].get(arm)
        data[arm].append(deep["final_test_accuracy"] if deep else [math.nan])
    _bars(ax, groups, data, ARMS)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("Initial scale and depth (each arm at its chosen rate; dots: seeds)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _regularization_figure(results: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    reg = results["regularization"]
    _bars(
        axes[0],
        ["train", "test"],
        {a: [reg[a]["final_train_accuracy"], reg[a]["final_test_accuracy"]] for a in ARMS},
        ARMS,
    )
    name = reg["dataset"]["name"] if reg.get("dataset") else ""
    axes[0].set_title(f"{name}: accuracy once fitted (or at the step cap)")
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8, loc="lower left")
    g = results["ghost"]
    ks = sorted(g, key=int)
    x = [int(k) for k in ks]
    _spread(
        axes[1],
        x,
        [[100 * v for v in g[k]["final_test_accuracy"]] for k in ks],
        "tab:blue",
        "test acc, eval mode (%)",
    )
    _spread(
        axes[1],
        x,
        [[100 * v for v in g[k]["final_train_accuracy"]] for k in ks],
        "tab:green",
        "train acc, eval mode (%)",
        marker="s",
    )
    ax2 = axes[1].twinx()
    _spread(
        ax2,
        x,
        [[100 * v for v in g[k]["train_eval_gap"]] for k in ks],
        "tab:red",
        "train-mode − eval-mode test acc (points)",
        marker="^",
    )
    ax2.set_ylabel("points", color="tab:red")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(x, ks)
    axes[1].set_xlabel(f"virtual batch size (inside batches of {results['config']['batch_size']})")
    axes[1].set_title(
        f"Ghost batch norm on {results['ghost_settings']['dataset']} "
        f"(BN at lr {results['ghost_settings']['lr']:g})"
    )
    axes[1].grid(alpha=0.3)
    h1, l1 = axes[1].get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    axes[1].legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(results: dict, summary: dict, out: Path) -> None:
    """Draw the report's figures (:data:`FIGURES`) into the folder ``out``.

    Parameters
    ----------
    results : dict
        The output of :func:`batchnorm_demo.experiments.runner.run`.
    summary : dict
        Its summary (:func:`batchnorm_demo.experiments.assess.summarize`).
    out : Path
        An existing folder.
    """
    _lr_figure(results, summary, out / "learning_rates.png")
    _accuracy_figure(results, out / "accuracy.png")
    _distribution_figure(results, out / "distribution.png")
    _robustness_figure(results, out / "robustness.png")
    _regularization_figure(results, out / "regularization.png")
