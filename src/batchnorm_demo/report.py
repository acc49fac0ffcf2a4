"""Figures and the written report of the demo; the only module that imports matplotlib.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and
rendered to Markdown (``report.md``, figures as PNG files next to it), to one self-contained
HTML file (``report.html``, figures embedded as base64 data URIs, so it can be mailed as is)
and, for the tables, to plain text for the terminal. Every number is formatted by
:func:`pm` and the learning-rate sweep by :func:`lr_sweep_table`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

import numpy as np

from ._format import pm
from .experiments.assess import LABELS, summarize
from .experiments.ioffe import ARMS

__all__ = ["format_table", "lr_sweep_table", "main_table", "pm", "render_text", "write_report"]

COLORS = {"no_bn": "tab:gray", "bn": "tab:blue", "noisy_bn": "tab:orange"}
FIGURES = (
    "learning_rates.png",
    "accuracy.png",
    "distribution.png",
    "robustness.png",
    "regularization.png",
)

Table = tuple[list[str], list[list[str]]]


# ----------------------------------------------------------------------------- tables
def main_table(results: dict, summary: dict) -> Table:
    """Each arm at its validation-chosen rate: accuracies, early accuracy, usable rates.

    Parameters
    ----------
    results, summary : dict

    Returns
    -------
    (head, rows)
    """
    step = results["ioffe"]["bn"]["early_step"]
    head = [
        "arm",
        "chosen lr",
        "val acc (%)",
        "test acc (%)",
        "train acc (%)",
        f"test acc at step {step} (%)",
        "usable rates",
    ]
    rows = []
    for arm in ARMS:
        r = results["ioffe"][arm]
        usable = summary["usable"][arm]
        rows.append(
            [
                LABELS[arm],
                f"{r['lr']:g}",
                pm(r["final_val_accuracy"]),
                pm(r["final_test_accuracy"]),
                pm(r["final_train_accuracy"]),
                pm(r["early_test_accuracy"]),
                ", ".join(f"{x:g}" for x in usable) or "none",
            ]
        )
    return head, rows


def lr_sweep_table(
    results: dict, metric: str = "test_accuracy", scale: float = 100.0, digits: int = 1
) -> Table:
    """The learning-rate sweep: one row per arm, one column per rate, ``metric`` mean ± sd.

    The chosen rate of each arm is marked with ``*``; a rate at which some seed diverged is
    marked with ``†``.

    Parameters
    ----------
    results : dict
    metric : str
        ``"test_accuracy"``, ``"val_accuracy"``, ``"train_accuracy"``, ``"train_loss"`` or
        ``"early_test_accuracy"``.
    scale, digits : float, int
        As in :func:`pm`.

    Returns
    -------
    (head, rows)
    """
    lrs = [float(x) for x in results["config"]["lrs"]]
    head = ["arm"] + [f"lr {x:g}" for x in lrs]
    rows = []
    for arm in ARMS:
        row = [LABELS[arm]]
        for lr in lrs:
            v = results["lr_sweep"][arm][repr(lr)]
            mark = "*" if lr == results["selected_lr"][arm] else ""
            mark += "†" if any(v.get("diverged", [])) else ""
            row.append(pm(v[metric], scale, digits) + mark)
        rows.append(row)
    return head, rows


def _init_table(results: dict) -> Table:
    stds = list(results["init"])
    head = (
        ["arm", "lr"]
        + [f"init std {s}: test acc (%)" for s in stds]
        + [
            f"init std {s}: test acc at step {results['ioffe']['bn']['early_step']} (%)"
            for s in stds
        ]
    )
    rows = []
    for arm in ARMS:
        rows.append(
            [LABELS[arm], f"{results['init'][stds[0]][arm]['lr']:g}"]
            + [pm(results["init"][s][arm]["final_test_accuracy"]) for s in stds]
            + [pm(results["init"][s][arm]["early_test_accuracy"]) for s in stds]
        )
    return head, rows


def _deep_table(results: dict) -> Table:
    deep = results["deep"]
    lrs = list(deep["bn"]["by_lr"])
    head = ["arm", "chosen lr", "test acc (%)", "train acc (%)"] + [
        f"val acc at lr {float(x):g} (%)" for x in lrs
    ]
    rows = [
        [
            LABELS[a],
            f"{deep[a]['lr']:g}",
            pm(deep[a]["final_test_accuracy"]),
            pm(deep[a]["final_train_accuracy"]),
        ]
        + [pm(deep[a]["by_lr"][x]["val_accuracy"]) for x in lrs]
        for a in deep
    ]
    return head, rows


def _distribution_table(results: dict) -> Table:
    d = results["distribution_change"]
    w = d["bn"]["early_window"]
    head = ["arm", "lr", f"change, steps 0-{w}", f"change, after step {w}"]
    rows = []
    for arm in ARMS:
        rows.append(
            [
                LABELS[arm],
                f"{results['ioffe'][arm]['lr']:g}",
                pm(d[arm]["seen"]["early"], 1, 3),
                pm(d[arm]["seen"]["late"], 1, 3),
            ]
        )
        if "before_noise" in d[arm]:
            rows.append(
                [
                    LABELS[arm] + " (before the noise)",
                    f"{results['ioffe'][arm]['lr']:g}",
                    pm(d[arm]["before_noise"]["early"], 1, 3),
                    pm(d[arm]["before_noise"]["late"], 1, 3),
                ]
            )
    return head, rows


def _ics_table(results: dict) -> Table:
    ics = results["ics"]
    common = repr(float(results["config"]["lrs"][0]))
    head = [
        "arm",
        f"relative, lr {float(common):g}",
        f"cosine, lr {float(common):g}",
        "chosen lr",
        "relative, chosen lr",
        "cosine, chosen lr",
    ]
    rows = [
        [
            LABELS[a],
            pm(ics[a]["by_lr"][common]["relative"], 1, 3),
            pm(ics[a]["by_lr"][common]["cosine"], 1, 3),
            f"{ics[a]['lr']:g}",
            pm(ics[a]["relative"], 1, 3),
            pm(ics[a]["cosine"], 1, 3),
        ]
        for a in ARMS
    ]
    return head, rows


def _regularization_table(results: dict) -> Table:
    reg = results["regularization"]
    head = ["arm", "lr", "steps", "train acc (%)", "test acc (%)", "train − test (points)"]
    rows = []
    for a in ARMS:
        r = reg[a]
        gap = np.subtract(r["final_train_accuracy"], r["final_test_accuracy"])
        steps = r.get("steps_run", [])
        rows.append(
            [
                LABELS[a],
                f"{r['lr']:g}",
                "-".join(sorted({str(min(steps)), str(max(steps))})) if steps else "?",
                pm(r["final_train_accuracy"]),
                pm(r["final_test_accuracy"]),
                pm(gap),
            ]
        )
    return head, rows


def _ghost_table(results: dict) -> Table:
    g = results["ghost"]
    head = [
        "virtual batch",
        "steps",
        "train acc (%)",
        "test acc (%)",
        "train-mode − eval-mode test acc (points)",
    ]
    rows = []
    for k in sorted(g, key=int):
        steps = g[k].get("steps_run", [])
        rows.append(
            [
                k,
                "-".join(sorted({str(min(steps)), str(max(steps))})) if steps else "?",
                pm(g[k]["final_train_accuracy"]),
                pm(g[k]["final_test_accuracy"]),
                pm(g[k]["train_eval_gap"]),
            ]
        )
    return head, rows


def _cost_table(results: dict) -> Table:
    cfg = results["config"]
    cpu = results.get("cpu_seconds", {})
    seeds = cfg["seeds"]
    rows = [
        (
            "lr_sweep",
            "learning-rate sweep (+ distribution probes, ICS)",
            f"3 arms x {len(cfg['lrs'])} rates x {seeds} seeds",
            f"{cfg['steps']}",
        ),
        (
            "small_init",
            f"initial std {cfg['small_init_std']}",
            f"3 arms x {seeds} seeds",
            f"{cfg['steps']}",
        ),
        (
            "deep",
            f"{len(cfg['deep_hidden'])} hidden layers",
            f"2 arms x {len(cfg['deep_lrs'])} rates x {seeds} seeds",
            f"{cfg['deep_steps']}",
        ),
        (
            "regularization",
            f"{cfg['reg_dataset']}, until fitted",
            f"3 arms x {seeds} seeds",
            f"at most {cfg['reg_steps']}",
        ),
        (
            "ghost",
            "ghost batches, until fitted",
            f"{len(cfg['ghost_sizes'])} sizes x {seeds} seeds",
            f"at most {cfg['ghost_steps']}",
        ),
    ]
    head = ["sub-experiment", "runs", "steps per run", "CPU seconds (all runs)"]
    out = []
    for key, name, runs, steps in rows:
        c = cpu.get(key, {}).get("cpu_seconds")
        out.append([name, runs, steps, "n/a" if c is None else f"{c:.0f}"])
    wall = results.get("wall_seconds")
    if wall is not None:
        out.append(
            [
                f"all of the above (wall clock, {cfg['workers']} workers)",
                "",
                "",
                f"{wall:.0f} (wall)",
            ]
        )
    return head, out


def render_text(table: Table) -> str:
    """A table as aligned plain text (for the terminal).

    Parameters
    ----------
    table : (head, rows)

    Returns
    -------
    str
    """
    head, rows = table
    allrows = [head, *rows]
    widths = [max(len(r[i]) for r in allrows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in allrows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _render_md(table: Table) -> str:
    head, rows = table
    return "\n".join(
        [
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *["| " + " | ".join(r) + " |" for r in rows],
        ]
    )


def _render_html(table: Table) -> str:
    head, rows = table
    esc = html.escape
    return (
        "<table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        + "</table>"
    )


def format_table(results: dict, summary: dict) -> str:
    """The terminal summary: the main table and the test-accuracy sweep.

    Parameters
    ----------
    results, summary : dict

    Returns
    -------
    str
    """
    return (
        render_text(main_table(results, summary))
        + "\n\nTest accuracy (%) by learning rate (* = chosen on validation):\n"
        + render_text(lr_sweep_table(results))
    )


# ----------------------------------------------------------------------------- figures
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


# ----------------------------------------------------------------------------- the report
def _blocks(results: dict, summary: dict) -> list[tuple]:
    cfg, ds = results["config"], results["dataset"]
    reg = results["regularization"]
    claims = summary["claims"]
    arch = f"{ds['n_features']}-" + "-".join(str(h) for h in cfg["hidden"]) + f"-{ds['n_classes']}"
    b: list[tuple] = [
        ("h1", "Does batch normalization do what the articles say?"),
        (
            "p",
            f"Dataset: {ds['description']}; {ds['n_test']} test items. "
            f"Network: {arch} sigmoid MLP, Gaussian init (std {cfg['init_std']}), plain SGD, "
            f"batch {cfg['batch_size']}. Three arms share initial weights, batch order and "
            f"seeds: no BN, BN, and noisy BN (Santurkar et al. 2018: random per-unit shifts "
            f"and scales after every BN, fresh at every step). Every arm is trained at every "
            f"rate of the same grid ({', '.join(f'{float(x):g}' for x in cfg['lrs'])}) for "
            f"{cfg['steps']} steps with {cfg['seeds']} seeds; each arm's rate is the one with "
            "the highest mean validation accuracy (never test data, never training loss), "
            "and the comparison uses those runs' test accuracy.",
        ),
        ("h2", "Verdicts"),
    ]
    for c in claims.values():
        b.append(("claim", c["title"], c["verdict"], c["evidence"], c["rests_on"]))
    b += [
        ("h2", "Each arm at its chosen rate (mean ± sd over seeds)"),
        ("table", main_table(results, summary)),
        (
            "p",
            f"Usable rates: every seed ends at or above {100 * summary['usable_threshold']:.1f}"
            "% test accuracy (5 points below the best arm's mean). One binomial standard "
            f"error on {ds['n_test']} test items is about "
            f"{100 * math.sqrt(0.9 * 0.1 / ds['n_test']):.1f} points at 90% accuracy.",
        ),
        ("h2", "Learning-rate sweep"),
        (
            "p",
            "Final test accuracy (%); * marks the rate chosen on validation, † a rate where "
            "some seed diverged (counted as chance).",
        ),
        ("table", lr_sweep_table(results)),
        ("p", "Validation accuracy (%), which chose the rates:"),
        ("table", lr_sweep_table(results, "val_accuracy")),
        ("p", f"Test accuracy (%) at step {results['ioffe']['bn']['early_step']} (how fast):"),
        ("table", lr_sweep_table(results, "early_test_accuracy")),
        ("p", "Final training loss (mean over the last evaluation interval):"),
        ("table", lr_sweep_table(results, "train_loss", 1.0, 4)),
        ("img", "learning_rates.png", "test accuracy and training loss against learning rate"),
        ("img", "accuracy.png", "test accuracy over training at the chosen rates"),
        ("h2", "Initial scale and depth"),
        (
            "p",
            f"The paper's small initial scale (std {cfg['small_init_std']}) against the "
            f"demo's (std {cfg['init_std']}), each arm at its chosen rate, {cfg['steps']} "
            f"steps. The deep network has {len(cfg['deep_hidden'])} hidden layers of "
            f"{cfg['deep_hidden'][0]}; its rate is chosen on the same validation split from "
            f"{', '.join(f'{x:g}' for x in cfg['deep_lrs'])}, {cfg['deep_steps']} steps.",
        ),
        ("table", _init_table(results)),
        ("table", _deep_table(results)),
        ("img", "robustness.png", "initial scale and depth"),
        ("h2", "Distribution change and internal covariate shift"),
        (
            "p",
            f"Distribution change: every {cfg['probe_every']} steps the input to each sigmoid "
            f"of the last hidden layer is probed on {cfg['probe_size']} fixed test images in "
            "training mode (no running statistics updated; noisy BN's probe noise comes from "
            "its own generator, so probing never changes training). Per unit, the change "
            "from one probe to the next is the mean absolute change of the 15th/50th/85th "
            "percentiles divided by the 15-85 width; the table averages it over units, over "
            "the probe intervals of each window, then gives mean ± sd over seeds. For noisy "
            "BN 'before the noise' is BN's output, before the injected shift and scale. The "
            "figure's first panel plots exactly these per-interval numbers; the other panels "
            "show one unit of seed 0 only.",
        ),
        ("table", _distribution_table(results)),
        ("img", "distribution.png", "distribution change"),
        (
            "p",
            f"Santurkar et al.'s measure, every {cfg['ics_every']} steps: G = gradient of the "
            "last hidden Linear layer's weights on the step's batch, G' = the same after only "
            "the layers before it took their SGD update on that batch (same noise draw); "
            "averaged over the run, mean ± sd over seeds. The measure grows with the step "
            "size, so it is given at the common rate and at each arm's chosen rate.",
        ),
        ("table", _ics_table(results)),
        ("h2", "Regularization"),
        (
            "p",
            f"On {reg['dataset']['description'] if reg.get('dataset') else '?'}: each arm at "
            f"its chosen rate, trained until it reaches {100 * cfg['fit_threshold']:.0f}% "
            f"training accuracy (checked every {cfg['eval_every']} steps, at most "
            f"{cfg['reg_steps']} steps), so that test accuracy compares generalization, not "
            "under-fitting.",
        ),
        ("table", _regularization_table(results)),
        (
            "p",
            f"Ghost batch norm (GhostBatchNorm) on {ds['name']}: the BN arm at its chosen "
            f"rate with batch statistics over virtual batches inside each batch of "
            f"{cfg['batch_size']}, trained until fitted (at most {cfg['ghost_steps']} steps). "
            "The gap is test accuracy in training mode (statistics of each batch of "
            f"{cfg['batch_size']} test items, split the same "
            "way) minus evaluation mode (running statistics).",
        ),
        ("table", _ghost_table(results)),
        ("img", "regularization.png", "regularization"),
        ("h2", "Settings and cost of each sub-experiment"),
        ("table", _cost_table(results)),
        ("p", "All numbers come from this run; results.json holds every number and curve."),
    ]
    return b


def _markdown(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h1":
            out.append(f"# {blk[1]}")
        elif kind == "h2":
            out.append(f"## {blk[1]}")
        elif kind == "p":
            out.append(blk[1])
        elif kind == "claim":
            out.append(f"- **{blk[1]}: {blk[2]}.** {blk[3]}. *Rests on:* {blk[4]}.")
        elif kind == "table":
            out.append(_render_md(blk[1]))
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
        out.append("")
    return "\n".join(out)


def _html(blocks: list[tuple], folder: Path) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>batchnorm demo report</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;"
        "line-height:1.4}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em}img{max-width:100%}"
        ".v{font-weight:bold}</style></head><body>",
    ]
    in_list = False
    for blk in blocks:
        kind = blk[0]
        if kind != "claim" and in_list:
            parts.append("</ul>")
            in_list = False
        if kind == "h1":
            parts.append(f"<h1>{esc(blk[1])}</h1>")
        elif kind == "h2":
            parts.append(f"<h2>{esc(blk[1])}</h2>")
        elif kind == "p":
            parts.append(f"<p>{esc(blk[1])}</p>")
        elif kind == "claim":
            if not in_list:
                parts.append("<ul>")
                in_list = True
            parts.append(
                f"<li><span class='v'>{esc(blk[1])}: {esc(blk[2])}.</span> "
                f"{esc(blk[3])}. <i>Rests on:</i> {esc(blk[4])}.</li>"
            )
        elif kind == "table":
            parts.append(_render_html(blk[1]))
        elif kind == "img":
            data = base64.b64encode((folder / blk[1]).read_bytes()).decode("ascii")
            parts.append(f"<p><img src='data:image/png;base64,{data}' alt='{esc(blk[2])}'></p>")
    if in_list:
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict, out: str | os.PathLike) -> dict:
    """Write results.json, the figures, report.md and report.html into ``out``.

    Parameters
    ----------
    results : dict
        The output of :func:`batchnorm_demo.experiments.runner.run`.
    out : path
        Output folder (created if missing).

    Returns
    -------
    dict
        The summary (numbers and verdicts) that the report states.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    (out / "results.json").write_text(json.dumps({**results, "summary": summary}, indent=1))
    _lr_figure(results, summary, out / "learning_rates.png")
    _accuracy_figure(results, out / "accuracy.png")
    _distribution_figure(results, out / "distribution.png")
    _robustness_figure(results, out / "robustness.png")
    _regularization_figure(results, out / "regularization.png")
    blocks = _blocks(results, summary)
    (out / "report.md").write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks, out))
    return summary
