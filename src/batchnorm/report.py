"""Figures and the written report of the demo; the only module that imports matplotlib."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from .experiments.assess import summarize
from .experiments.ioffe import ARMS

__all__ = ["write_report"]

LABELS = {"no_bn": "no BN", "bn": "BN", "noisy_bn": "noisy BN"}
COLORS = {"no_bn": "tab:gray", "bn": "tab:blue", "noisy_bn": "tab:orange"}


def _plt():
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_figure(results: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in ARMS:
        r = results["ioffe"][arm]
        steps = np.asarray(r["test_accuracy_curve"]["steps"])
        vals = 100 * np.asarray(r["test_accuracy_curve"]["values"])
        mean = vals.mean(0)
        label = f"{LABELS[arm]} (lr {r['lr']:g})"
        ax.plot(steps, mean, color=COLORS[arm], label=label)
        ax.fill_between(steps, vals.min(0), vals.max(0), color=COLORS[arm], alpha=0.2, lw=0)
    final = [100 * np.mean(results["ioffe"][a]["final_test_accuracy"]) for a in ARMS]
    ax.set_ylim(max(0, min(final) - 15), 100)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")
    n = len(results["ioffe"]["bn"]["final_test_accuracy"])
    ax.set_title(f"Test accuracy: mean over {n} seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _percentile_figure(results: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    for ax, arm in zip(axes, ARMS, strict=True):
        p = results["ioffe"][arm]["percentiles"]
        steps = p["steps"]
        for q, style in (("15", "--"), ("50", "-"), ("85", "--")):
            ax.plot(steps, p[q][0], style, color=COLORS[arm], label=f"{q}th percentile")
        inst = results["ioffe"][arm]["instability"][0]["score"]
        ax.set_title(f"{LABELS[arm]} (instability {inst:.3f}, seed 0)")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"input to sigmoid unit {results['ioffe']['bn']['percentiles']['unit']}\n"
                       "of the last hidden layer")
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gap_figure(results: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, arm in enumerate(ARMS):
        gaps = 100 * np.asarray(results["ioffe"][arm]["train_test_gap"])
        ax.bar(i, gaps.mean(), color=COLORS[arm], alpha=0.6,
               yerr=gaps.std(ddof=1) if gaps.size > 1 else 0, capsize=4)
        ax.plot(np.full(gaps.size, i), gaps, "k.", ms=6)
    ax.set_xticks(range(len(ARMS)), [LABELS[a] for a in ARMS])
    ax.set_ylabel("train - test accuracy (points)")
    ax.set_title("Generalization gap at the end (bars: mean ± sd; dots: seeds)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for arm in ARMS:
        t = summary["table"][arm]

        def f(s, k=100, d=1):
            return f"{k * s['mean']:.{d}f} ± {k * s['sd']:.{d}f}"

        rows.append([LABELS[arm], f"{t['lr']:g}", f(t["test"]), f(t["train"]), f(t["gap"]),
                     f(t["early_test"]), f(t["instability"], 1, 3)])
    return rows


TABLE_HEAD = ["arm", "lr", "test acc (%)", "train acc (%)", "gap (points)",
              "early test acc (%)", "instability"]


def format_table(summary: dict) -> str:
    """Plain-text summary table for the terminal."""
    rows = [TABLE_HEAD, *_table_rows(summary)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEAD))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _claims_text(summary: dict) -> list[tuple[str, str, str]]:
    c = summary["claims"]
    return [
        ("Claim 1: BN removes internal covariate shift (stable layer inputs)",
         c["stable_distributions"]["verdict"],
         c["stable_distributions"]["evidence"] + ". Control: " + c["stable_distributions"][
             "noisy_bn"] + "."),
        ("Claim 2: BN has a slight regularization effect", c["regularization"]["verdict"],
         c["regularization"]["evidence"] + "."),
        ("Also: BN trains faster", c["faster_training"]["verdict"],
         c["faster_training"]["evidence"] + "."),
    ]


def _sd(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


def _markdown(results: dict, summary: dict) -> str:
    cfg, ds = results["config"], results["dataset"]
    early = summary["table"]["bn"]["early_step"]
    lines = [
        "# Does batch normalization do what the article says?",
        "",
        f"Dataset: {ds['description']} ({ds['n_train']} train / {ds['n_test']} test, "
        f"{ds['n_features']} inputs, {ds['n_classes']} classes).",
        f"Network: {ds['n_features']}-" + "-".join(str(h) for h in cfg["hidden"])
        + f"-{ds['n_classes']} sigmoid MLP, Gaussian init (std {cfg['init_std']}), SGD, "
        f"batch {cfg['batch_size']}, {cfg['steps']} steps, {cfg['seeds']} seeds. "
        f"BN and noisy BN use lr {cfg['lr']}; the no-BN arm uses lr "
        f"{summary['no_bn_lr']['chosen']:g}, chosen from {summary['no_bn_lr']['candidates']} by "
        f"{summary['no_bn_lr']['rule']}.",
        "",
        "## Verdicts",
        "",
    ]
    for title, verdict, evidence in _claims_text(summary):
        lines += [f"**{title}: {verdict}.** {evidence}", ""]
    lines += [
        "## Numbers (mean ± sd over seeds)",
        "",
        "| " + " | ".join(TABLE_HEAD) + " |",
        "|" + "---|" * len(TABLE_HEAD),
        *["| " + " | ".join(r) + " |" for r in _table_rows(summary)],
        "",
        f"*early test acc* is at step {early}, about a tenth of the way. *instability* is how "
        "much the 15th/50th/85th percentiles of the last hidden layer's sigmoid inputs move "
        "over training (std over time of the median and of the 15-85 width, each divided by "
        "the mean width, averaged over the layer's units; lower is more stable). *gap* is "
        "final train minus test accuracy. Verdicts call a difference *separated* when the "
        "means differ by more than one sd of each arm.",
        "",
        "## No-BN learning-rate sweep (mean ± sd over seeds)",
        "",
        "| lr | final train loss | test acc (%) |",
        "|---|---|---|",
        *[f"| {v['lr']:g} | {np.mean(v['final_train_loss']):.4f} ± "
          f"{_sd(v['final_train_loss']):.4f} | {100 * np.mean(v['final_test_accuracy']):.1f} ± "
          f"{100 * _sd(v['final_test_accuracy']):.1f} |"
          for v in sorted(results["ioffe"]["no_bn"]["lr_sweep"].values(), key=lambda v: v["lr"])],
        "",
        "## Figures",
        "",
        "![test accuracy](accuracy.png)",
        "",
        "![percentiles](percentiles.png)",
        "",
        "![gap](gap.png)",
        "",
        "## How to read this",
        "",
        "- *accuracy.png*: test accuracy against steps (Ioffe & Szegedy's Figure 1a); the band "
        "spans the seeds.",
        "- *percentiles.png*: the distribution of one sigmoid's input over training "
        "(Figure 1b, c), measured on a fixed probe set in training mode. Noisy BN "
        "(Santurkar et al. 2018) shifts and scales each unit at random every step, so its "
        "distribution is deliberately unstable; if it still trains like BN, stability is not "
        "the reason BN helps.",
        "- *gap.png*: final train-test gap per arm; a regularizer should shrink it.",
        "",
        "All numbers come from this run; results.json holds every curve.",
    ]
    return "\n".join(lines) + "\n"


def _html(md_summary: dict, results: dict) -> str:
    summary = md_summary
    cfg, ds = results["config"], results["dataset"]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>batchnorm demo report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em}"
        "img{max-width:100%}.v{font-weight:bold}</style></head><body>",
        "<h1>Does batch normalization do what the article says?</h1>",
        f"<p>Dataset: {esc(ds['description'])}. Network {ds['n_features']}-"
        + "-".join(str(h) for h in cfg["hidden"])
        + f"-{ds['n_classes']}, {cfg['steps']} steps, batch {cfg['batch_size']}, "
        f"{cfg['seeds']} seeds. No-BN learning rate {summary['no_bn_lr']['chosen']:g} "
        f"(chosen by {esc(summary['no_bn_lr']['rule'])}); BN arms {cfg['lr']:g}.</p>",
        "<h2>Verdicts</h2><ul>",
    ]
    for title, verdict, evidence in _claims_text(summary):
        parts.append(f"<li><span class='v'>{esc(title)}: {esc(verdict)}.</span> "
                     f"{esc(evidence)}</li>")
    parts.append("</ul><h2>Numbers (mean ± sd over seeds)</h2><table><tr>")
    parts += [f"<th>{esc(h)}</th>" for h in TABLE_HEAD]
    parts.append("</tr>")
    for row in _table_rows(summary):
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    parts.append("</table><h2>No-BN learning-rate sweep (mean ± sd over seeds)</h2><table>"
                 "<tr><th>lr</th><th>final train loss</th><th>test acc (%)</th></tr>")
    for v in sorted(results["ioffe"]["no_bn"]["lr_sweep"].values(), key=lambda v: v["lr"]):
        parts.append(f"<tr><td>{v['lr']:g}</td><td>{np.mean(v['final_train_loss']):.4f} ± "
                     f"{_sd(v['final_train_loss']):.4f}</td><td>"
                     f"{100 * np.mean(v['final_test_accuracy']):.1f} ± "
                     f"{100 * _sd(v['final_test_accuracy']):.1f}</td></tr>")
    parts.append("</table><h2>Figures</h2>")
    for name, alt in (("accuracy.png", "test accuracy"), ("percentiles.png", "percentiles"),
                      ("gap.png", "generalization gap")):
        parts.append(f"<p><img src='{name}' alt='{alt}'></p>")
    parts.append("<p>See report.md for how to read the figures; results.json holds every "
                 "curve.</p></body></html>")
    return "\n".join(parts)


def write_report(results: dict, out: str | os.PathLike) -> dict:
    """Write results.json, the three figures, report.md and report.html into ``out``.

    Returns the summary (numbers and verdicts) that the report states.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    (out / "results.json").write_text(json.dumps({**results, "summary": summary}, indent=1))
    _accuracy_figure(results, out / "accuracy.png")
    _percentile_figure(results, out / "percentiles.png")
    _gap_figure(results, out / "gap.png")
    (out / "report.md").write_text(_markdown(results, summary))
    (out / "report.html").write_text(_html(summary, results))
    return summary
