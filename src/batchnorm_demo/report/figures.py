"""The demo report's figures (PNG files); with :mod:`.sync`, the only modules that
import matplotlib, and only when a figure is drawn."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..experiments.assess import LABELS
from ..experiments.ioffe import ARMS

__all__ = ["FIGURES", "arm_offsets", "write_figures"]

COLORS = {"no_bn": "tab:gray", "bn": "tab:blue", "noisy_bn": "tab:orange"}
FIGURES = (
    "learning_rates.png",
    "accuracy.png",
    "distribution.png",
    "robustness.png",
    "regularization.png",
    "smoothness.png",
)


def _plt():
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = {"no_bn": "o", "bn": "s", "noisy_bn": "^"}
# the three percentiles of the distribution panels: 15th dashed, 50th solid, 85th dotted
PERCENTILE_STYLES = (("15th", "--"), ("50th", "-"), ("85th", ":"))


def _null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _spread(ax, x, vals, color, label, marker="o", ls="-"):
    vals = np.asarray(vals, dtype=np.float64)
    mean = np.nanmean(vals, axis=1)
    ax.plot(x, mean, marker=marker, ls=ls, color=color, label=label)
    ax.fill_between(
        x, np.nanmin(vals, axis=1), np.nanmax(vals, axis=1), color=color, alpha=0.2, lw=0
    )


def arm_offsets(lrs: list[float], n_arms: int = len(ARMS), spread: float = 0.1) -> np.ndarray:
    """x positions of each arm's points on a log learning-rate axis, side by side.

    Arm ``j`` of ``n_arms`` sits at ``lr * 10**(spread * (j - (n_arms - 1) / 2) / 2)``, so
    points of different arms at the same rate never share a position and stay closer to
    their own rate than to any other of the grid's.

    Parameters
    ----------
    lrs : list of float
        The learning-rate grid.
    n_arms : int
        Arms drawn side by side.
    spread : float
        Width of the group in decades.

    Returns
    -------
    ndarray, shape (n_arms, len(lrs))
    """
    shift = spread * (np.arange(n_arms) - (n_arms - 1) / 2) / 2
    return np.asarray(lrs, np.float64)[None, :] * 10.0 ** shift[:, None]


def _lr_figure(results: dict, summary: dict, path: Path) -> None:
    plt = _plt()
    lrs = [float(x) for x in results["config"]["lrs"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    step = results["ioffe"]["bn"]["early_step"]
    xs = arm_offsets(lrs)
    for j, arm in enumerate(ARMS):
        sw, c, m, x = results["lr_sweep"][arm], COLORS[arm], MARKERS[arm], xs[j]
        test = [[100 * v for v in sw[repr(lr)]["test_accuracy"]] for lr in lrs]
        early = [[100 * v for v in sw[repr(lr)]["early_test_accuracy"]] for lr in lrs]
        loss = np.maximum(np.asarray([sw[repr(lr)]["train_loss"] for lr in lrs], float), 1e-6)
        for ax, vals in zip(axes, (test, early, loss), strict=True):
            _spread(ax, x, vals, c, LABELS[arm], marker=m)
        sel = results["selected_lr"][arm]
        axes[0].plot(
            [x[lrs.index(float(sel))]],
            [100 * np.mean(sw[repr(sel)]["test_accuracy"])],
            "*",
            ms=15,
            color=c,
            mec="k",
            zorder=5,
        )
    axes[0].axhline(
        100 * summary["usable_threshold"],
        color="k",
        ls=":",
        lw=1,
        label=f"usable threshold ({100 * summary['usable_threshold']:.1f}%)",
    )
    axes[0].set_title("final test accuracy (star: rate chosen on validation)")
    axes[1].set_title(f"test accuracy at step {step} (how fast)")
    axes[2].set_title("final training loss (mean over the last interval)")
    axes[0].set_ylabel("final test accuracy (%)")
    axes[1].set_ylabel(f"test accuracy at step {step} (%)")
    axes[2].set_ylabel("training loss (cross-entropy, log scale)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs])
        ax.xaxis.set_minor_locator(_null_locator())
        ax.set_xlabel("learning rate (log scale; the arms side by side at each rate)")
        ax.grid(alpha=0.3)
    star = plt.Line2D([], [], ls="", marker="*", ms=14, color="w", mec="k")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        [*handles, star],
        [*labels, "rate chosen on validation"],
        loc="lower center",
        ncol=len(labels) + 1,
        fontsize=10,
        frameon=False,
    )
    n = results["config"]["seeds"]
    fig.suptitle(f"Learning-rate sweep: line = mean over {n} seeds, band = min..max over seeds")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
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
    fig, grid = plt.subplots(2, 2, figsize=(12, 8.8))
    axes = grid.ravel()
    _change_panel(axes[0], d)
    _unit_panels(axes[1:], d, results)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    _unit_legend(fig, plt, d)
    fig.suptitle(
        "Distribution of the last hidden layer's sigmoid inputs, probed during training on "
        f"{results['config'].get('probe_size', 'the same')} fixed test images"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _change_panel(ax, d: dict) -> None:
    """The distribution figure's first panel: the change per probe interval, every arm."""
    for arm in ARMS:
        mids = np.asarray(d[arm]["probe_steps"])[1:]  # each change is drawn at its later probe
        for key, style in (("seen", "-"), ("before_noise", "--")):
            if key not in d[arm]:
                continue
            curve = np.asarray(d[arm][key]["curve"], dtype=np.float64)
            label = LABELS[arm] + (" (before the noise)" if key == "before_noise" else "")
            ax.plot(
                mids,
                curve.mean(0),
                style,
                color=COLORS[arm],
                marker=MARKERS[arm],
                ms=4,
                label=label,
            )
    w = d["bn"]["early_window"]
    ax.axvline(w, color="k", lw=0.8, ls=":", label=f"end of the early window (step {w})")
    ax.set_yscale("log")
    ax.set_ylabel("|change of a percentile| / 15-85 width (log)")
    ax.set_title("Change of the sigmoid inputs per probe interval\n(mean over units and seeds)")
    ax.legend(fontsize=9)


def _unit_panels(axes, d: dict, results: dict) -> None:
    """The distribution figure's unit panels: one unit's percentiles over training, per arm."""
    unit = d["bn"]["unit"]
    for ax, arm in zip(axes, ARMS, strict=True):
        steps = d[arm]["probe_steps"]
        p = np.asarray(d[arm]["seen"]["unit_percentiles_seed0"])
        for i, (_, style) in enumerate(PERCENTILE_STYLES):
            ax.plot(steps, p[:, i], style, color=COLORS[arm], lw=1.8)
        if "before_noise" in d[arm]:
            b = np.asarray(d[arm]["before_noise"]["unit_percentiles_seed0"])
            for i, (_, style) in enumerate(PERCENTILE_STYLES):
                ax.plot(steps, b[:, i], style, color="k", lw=1, alpha=0.7)
        ax.set_title(
            f"{LABELS[arm]} (lr {results['ioffe'][arm]['lr']:g}): unit {unit} of the last "
            "hidden layer, seed 0"
        )
        ax.set_ylabel("input to the sigmoid")


def _unit_legend(fig, plt, d: dict) -> None:
    """One legend for the three unit panels: the line styles mean the same in each."""
    styles = [plt.Line2D([], [], ls=st, color="0.3", lw=1.8) for _, st in PERCENTILE_STYLES]
    names = [f"{q} percentile" for q, _ in PERCENTILE_STYLES]
    if any("before_noise" in d[a] for a in ARMS):
        styles.append(plt.Line2D([], [], color="k", lw=1, alpha=0.7))
        names.append("noisy BN before the noise (thin, black)")
    fig.legend(
        styles,
        names,
        loc="lower center",
        ncol=len(names),
        fontsize=10,
        frameon=False,
        title="unit panels: percentiles over the probe images",
        title_fontsize=10,
    )


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
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    reg, fit = results["regularization"], 100 * results["config"]["fit_threshold"]
    _bars(
        axes[0],
        ["train", "test"],
        {a: [reg[a]["final_train_accuracy"], reg[a]["final_test_accuracy"]] for a in ARMS},
        ARMS,
    )
    axes[0].axhline(fit, color="k", ls="--", lw=1, label=f"fit threshold ({fit:.0f}%)")
    axes[0].set_ylim(0, 105)
    name = reg["dataset"]["name"] if reg.get("dataset") else ""
    axes[0].set_title(f"{name}: accuracy once fitted\n(or at the step cap)")
    axes[0].set_ylabel("accuracy (%)")
    # below the axes: inside, any corner would cover a bar once the arms fit
    axes[0].legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=4)
    g, settings = results["ghost"], results["ghost_settings"]
    ks = sorted(g, key=int)
    x = [int(k) for k in ks]
    for key, color, marker, label in (
        ("final_train_accuracy", "tab:green", "s", "training accuracy"),
        ("final_test_accuracy", "tab:blue", "o", "test accuracy"),
    ):
        _spread(axes[1], x, [[100 * v for v in g[k][key]] for k in ks], color, label, marker)
    axes[1].axhline(fit, color="k", ls="--", lw=1, label=f"fit threshold ({fit:.0f}%)")
    axes[1].set_ylabel("accuracy in evaluation mode (%)")
    axes[1].set_title(f"Ghost batch norm on {settings['dataset']}:\naccuracy in evaluation mode")
    axes[1].legend(fontsize=9, loc="best", framealpha=0.95)
    _spread(
        axes[2],
        x,
        [[100 * v for v in g[k]["train_eval_gap"]] for k in ks],
        "tab:red",
        None,
        marker="^",
    )
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].set_ylabel("batch statistics − running statistics (points)")
    axes[2].set_title("Ghost batch norm: test accuracy in train\nmode minus in eval mode")
    for ax in axes[1:]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, ks)
        ax.xaxis.set_minor_locator(_null_locator())
        ax.set_xlabel(f"virtual batch size (inside batches of {results['config']['batch_size']})")
        ax.grid(alpha=0.3)
    n = results["config"]["seeds"]
    fig.suptitle(
        "Regularization: each arm trained until fitted or its step cap; ghost batches: BN at "
        f"lr {settings['lr']:g} "
        f"(line = mean over {n} seeds, band = min..max, dots = seeds)"
    )
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
    if "smoothness" in results:
        from .smoothness import smoothness_figure

        smoothness_figure(results, out / "smoothness.png", _plt())
