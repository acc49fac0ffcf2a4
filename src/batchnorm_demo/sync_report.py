"""Figures and the written report of ``batchnorm sync-demo`` (rank 0 writes them)."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import numpy as np

from ._atomic import staged_folder

__all__ = ["summarize", "write_sync_report"]


def _plt():
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _equivalence_figure(results: dict, path: Path) -> None:
    plt = _plt()
    eq = results["equivalence"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    r = results["ranks"]
    labels = {
        "sync": f"SyncBN over {r} rank(s) vs BN in one process",
        "local": f"local BN over {r} rank(s) vs GhostBatchNorm({eq['per_rank_batch']})",
    }
    for arm, color in (("sync", "tab:blue"), ("local", "tab:orange")):
        d = np.maximum(np.asarray(eq[arm]["max_param_diff_per_step"]), 1e-18)
        ax.semilogy(np.arange(1, len(d) + 1), d, color=color, label=labels[arm])
    ax.axhline(1e-10, color="gray", ls="--", lw=1, label="1e-10")
    ax.set_xlabel("training step")
    ax.set_ylabel("max |parameter difference|")
    ax.set_title(f"Same computation, step for step (global batch {eq['global_batch']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _small_batch_figure(results: dict, path: Path) -> None:
    plt = _plt()
    sb = results["small_batches"]
    b = np.array([row["per_rank_batch"] for row in sb["rows"]])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, color in (
        ("local_bn_test_accuracy", "local BN (per-rank statistics)", "tab:orange"),
        ("sync_bn_test_accuracy", "SyncBN (global statistics)", "tab:blue"),
    ):
        v = 100 * np.array([row[key] for row in sb["rows"]])
        ax.plot(b, v.mean(1), "o-", color=color, label=label)
        ax.fill_between(b, v.min(1), v.max(1), color=color, alpha=0.2, lw=0)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(b, [str(x) for x in b])
    ax.set_xlabel(f"per-rank batch size (global batch {sb['global_batch']})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Small per-rank batches: mean over {sb['seeds']} seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(results: dict) -> dict:
    """The headline numbers of a sync-demo run (JSON-ready)."""
    eq, sb, cost = results["equivalence"], results["small_batches"], results["cost"]
    rows = [
        {
            "per_rank_batch": r["per_rank_batch"],
            "local_bn_mean": float(np.mean(r["local_bn_test_accuracy"])),
            "sync_bn_mean": float(np.mean(r["sync_bn_test_accuracy"])),
        }
        for r in sb["rows"]
    ]
    out = {
        "ranks": results["ranks"],
        "wall_seconds": results["wall_seconds"],
        "sync_vs_single_process_max_param_diff": eq["sync"]["final_max_param_diff"],
        "sync_max_param_diff_between_ranks": eq["sync"]["max_param_diff_between_ranks"],
        "local_vs_ghost_max_param_diff": eq["local"]["final_max_param_diff"],
        "small_batches": rows,
    }
    for arm in ("local", "sync"):
        out[f"{arm}_median_step_ms"] = float(np.max(cost[arm]["median_step_ms_per_rank"]))
        out[f"{arm}_bytes_per_step"] = float(np.max(cost[arm]["bytes_per_step_per_rank"]))
    return out


def _markdown(results: dict, s: dict) -> str:
    eq, cost, r = results["equivalence"], results["cost"], results["ranks"]
    lines = [
        "# Synchronized batch norm over MPI: sync-demo",
        "",
        f"{r} rank(s); dataset: {results['dataset'].get('description', '')}; wall time "
        f"{s['wall_seconds']:.1f} s.",
        "",
        "## Equivalence",
        "",
        f"Global batch {eq['global_batch']} ({eq['per_rank_batch']} per rank), "
        f"{eq['steps']} SGD steps of the Ioffe MLP, float64.",
        "",
        "| comparison | max parameter difference after the last step | notes |",
        "|---|---|---|",
        f"| SyncBN over {r} rank(s) vs BN on the global batch in one process | "
        f"{eq['sync']['final_max_param_diff']:.3g} | parameters differ between ranks by "
        f"{eq['sync']['max_param_diff_between_ranks']:.3g}; running statistics by "
        f"{eq['sync']['max_running_diff']:.3g} from the single process |",
        f"| local BN over {r} rank(s) vs GhostBatchNorm(virtual batch "
        f"{eq['per_rank_batch']}) in one process | {eq['local']['final_max_param_diff']:.3g} | "
        f"the ranks' running statistics differ (spread "
        f"{eq['local']['max_running_spread_between_ranks']:.3g}); their average is the ghost "
        f"layer's to {eq['local']['max_running_diff_mean_over_ranks']:.3g} |",
        "",
        "Both pairs are the same computation: the differences are float64 rounding. So "
        "GhostBatchNorm in one process stands in for local BN over many ranks below.",
        "",
        "![equivalence](equivalence.png)",
        "",
        "## Small per-rank batches",
        "",
        f"Test accuracy after {results['small_batches']['steps']} steps at a global batch of "
        f"{results['small_batches']['global_batch']}, mean over "
        f"{results['small_batches']['seeds']} seeds.",
        "",
        "| per-rank batch | ranks | local BN | SyncBN |",
        "|---|---|---|---|",
    ]
    g = results["small_batches"]["global_batch"]
    for row in s["small_batches"]:
        lines.append(
            f"| {row['per_rank_batch']} | {g / row['per_rank_batch']:.3g} | "
            f"{100 * row['local_bn_mean']:.1f}% | {100 * row['sync_bn_mean']:.1f}% |"
        )
    m = cost["model_bn_bytes_per_rank"]
    lines += [
        "",
        "![small batches](small_batches.png)",
        "",
        "## Cost",
        "",
        f"Per training step and rank, measured over {cost['steps']} steps at {r} rank(s) "
        f"(global batch {cost['global_batch']}); the bytes include the gradient sum both "
        "need (synchronized BN layers' gradients are already global, so they leave it).",
        "",
        "| | median time per step | bytes sent + received per step |",
        "|---|---|---|",
        f"| local BN | {s['local_median_step_ms']:.2f} ms | {s['local_bytes_per_step']:,.0f} |",
        f"| SyncBN | {s['sync_median_step_ms']:.2f} ms | {s['sync_bytes_per_step']:,.0f} |",
        "",
        f"The BN synchronization itself: per step and rank {m['sent']:,} bytes sent and "
        f"{m['received']:,} received ({cost['bn_features_total']} BN features: a forward and "
        "a backward exchange of 2 doubles per feature, plus a 104-byte header to each other "
        "rank per exchange).",
        "",
    ]
    return "\n".join(lines)


def _html(md: str, out: Path) -> str:
    body = []
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set(line) <= set("|-"):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
                continue
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            name = line[line.index("(") + 1 : -1]
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(
                f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></p>'
            )
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>sync-demo</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_sync_report(results: dict, out: str | os.PathLike) -> dict:
    """Write results.json, report.md, report.html and the PNG figures; return the summary."""
    summary = summarize(results)
    with staged_folder(out) as stage:  # all files appear together at the end, or none
        _equivalence_figure(results, stage / "equivalence.png")
        _small_batch_figure(results, stage / "small_batches.png")
        with open(stage / "results.json", "w") as f:
            json.dump({**results, "summary": summary}, f, indent=1)
        md = _markdown(results, summary)
        (stage / "report.md").write_text(md)
        (stage / "report.html").write_text(_html(md, stage))
    return summary
