"""Figures and the written report of ``batchnorm sync-demo`` (rank 0 writes them)."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import numpy as np

from .._atomic import staged_folder
from .._format import mean_sd, pm, strict_json

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
    rows = sb["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, color, marker in (
        ("local_bn_test_accuracy", "local BN (per-rank statistics)", "tab:orange", "o-"),
        ("sync_bn_test_accuracy", "SyncBN (global statistics)", "tab:blue", "s-"),
        (
            "renorm_test_accuracy",
            "local BatchRenorm (per-rank, no communication)",
            "tab:green",
            "^--",
        ),
    ):
        have = [row for row in rows if key in row]
        if not have:
            continue
        b = np.array([row["per_rank_batch"] for row in have])
        v = 100 * np.array([row[key] for row in have])
        ax.plot(b, v.mean(1), marker, color=color, label=label)
        ax.fill_between(b, v.min(1), v.max(1), color=color, alpha=0.2, lw=0)
    b = np.array([row["per_rank_batch"] for row in rows])
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(b, [str(x) for x in b])
    ax.set_xlabel(f"per-rank batch size (global batch {sb['global_batch']})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Small per-rank batches: mean over {sb['seeds']} seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_ARMS = (
    ("local_bn", "local_bn_test_accuracy"),
    ("sync_bn", "sync_bn_test_accuracy"),
    ("renorm", "renorm_test_accuracy"),
)


def _summary_row(r: dict) -> dict:
    out = {"per_rank_batch": r["per_rank_batch"]}
    for name, key in _ARMS:
        if key in r:
            s = mean_sd(r[key])
            out[f"{name}_mean"], out[f"{name}_sd"] = s["mean"], s["sd"]
    return out


def summarize(results: dict) -> dict:
    """The headline numbers of a sync-demo run (JSON-ready)."""
    eq, sb, cost = results["equivalence"], results["small_batches"], results["cost"]
    rows = [_summary_row(r) for r in sb["rows"]]
    out = {
        "ranks": results["ranks"],
        "wall_seconds": results["wall_seconds"],
        "sync_vs_single_process_max_param_diff": eq["sync"]["final_max_param_diff"],
        "sync_max_param_diff_between_ranks": eq["sync"]["max_param_diff_between_ranks"],
        "local_vs_ghost_max_param_diff": eq["local"]["final_max_param_diff"],
        "small_batches": rows,
    }
    if "renorm" in eq:
        out["local_renorm_vs_emulation_max_param_diff"] = eq["renorm"]["final_max_param_diff"]
    if "renorm_verdict" in sb:
        out["renorm_fixes_tiny_local_batches"] = sb["renorm_verdict"]["verdict"]
        out["renorm_why"] = renorm_why(sb["renorm_verdict"])
    for arm in ("local", "sync"):
        out[f"{arm}_median_step_ms"] = float(np.max(cost[arm]["median_step_ms_per_rank"]))
        out[f"{arm}_bytes_per_step"] = float(np.max(cost[arm]["bytes_per_step_per_rank"]))
    return out


def _equivalence_md(results: dict) -> list[str]:
    eq, r = results["equivalence"], results["ranks"]
    lines = [
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
    ]
    if "renorm" in eq:
        ren = eq["renorm"]
        lines.append(
            f"| local BatchRenorm over {r} rank(s) (no communication) vs its emulation "
            f"LocalRenorm(per-rank batch {eq['per_rank_batch']}) in one process | "
            f"{ren['final_max_param_diff']:.3g} | each rank's running statistics (spread "
            f"{ren['max_running_spread_between_ranks']:.3g} between ranks) equal the "
            f"emulation's for that rank to {ren['max_running_diff_per_rank']:.3g} |"
        )
    return lines + [
        "",
        "Each pair is the same computation: the differences are float64 rounding. So the "
        "one-process stand-ins (GhostBatchNorm for local BN, LocalRenorm for local "
        "BatchRenorm) replace many ranks below.",
        "",
        "![equivalence](equivalence.png)",
        "",
    ]


def _ranks(row: dict, global_batch: int) -> str:
    """How many ranks a per-rank batch makes of the global batch, and the split if uneven."""
    split = row.get("rank_batches")
    if split is None:  # results written before the split was recorded
        return str(-(-global_batch // row["per_rank_batch"]))
    if len(set(split)) == 1:
        return str(len(split))
    full, last = split[:-1], split[-1]
    return f"{len(split)} ({len(full)} × {full[0]} + 1 × {last})"


def _schedule_text(cfg: dict) -> str:
    steps = cfg["small_batch_steps"]
    warm = round(cfg["renorm_warmup"] * steps)
    return (
        f"BatchRenorm trains as plain BN (rmax 1, dmax 0) for the first {warm} step(s), "
        "then dmax grows linearly to "
        f"{cfg['renorm_dmax']:g} at step {round(cfg['renorm_dmax_at'] * steps)} and rmax to "
        f"{cfg['renorm_rmax']:g} at step {round(cfg['renorm_rmax_at'] * steps)} (Ioffe 2017's "
        "5k / 25k / 40k-step schedule, scaled to the run); its moving averages use momentum "
        f"{cfg['renorm_momentum']:g}, and the test uses the ranks' average running mean and "
        "std. Same seeds (initial weights, global batches) as the other arms."
    )


def renorm_why(verdict: dict) -> str:
    """Why the BatchRenorm verdict reads as it does (for the console, after the verdict).

    Parameters
    ----------
    verdict : dict
        :func:`batchnorm_demo.experiments.sync_small.renorm_verdict`'s answer.

    Returns
    -------
    str
        The rule, then one indented line per per-rank batch where local BN falls below
        SyncBN beyond the noise (the batches the claim is about): fixed or not, and where
        BatchRenorm lands against local BN and SyncBN; or why no batch is judged.
    """
    hurt = [p for p in verdict["per_batch"] if p["status"] != "nothing to fix"]
    if not hurt:
        return "local BN is not below SyncBN beyond the noise at any batch size: nothing to fix"
    lines = [
        "supported only if, at every per-rank batch where local BN falls below SyncBN beyond "
        "the noise, BatchRenorm rises above local BN beyond it and is not below SyncBN:"
    ]
    for p in hurt:
        gv, dv = p["renorm_vs_local"], p["renorm_vs_sync"]
        lines.append(
            f"  per-rank batch {p['per_rank_batch']}: {p['status']}: BatchRenorm "
            f"{100 * gv['diff']:+.1f} points vs local BN (noise {100 * gv['noise']:.1f}), "
            f"{100 * dv['diff']:+.1f} vs SyncBN (noise {100 * dv['noise']:.1f})"
        )
    return "\n".join(lines)


def _verdict_md(sb: dict) -> list[str]:
    v = sb.get("renorm_verdict")
    if v is None:
        return []
    by_b = {row["per_rank_batch"]: row for row in sb["rows"]}
    lines = [
        f"**Does BatchRenorm fix tiny local batches without communication? {v['verdict']}.** "
        "Two accuracies differ only when their means are further apart than twice the "
        f"combined uncertainty (binomial error on {sb['n_test']} test items plus the spread "
        "over seeds: the noise below). A batch is fixed when renorm beats local BN beyond the "
        "noise and is not below SyncBN beyond it; supported when every batch where local BN "
        "falls below SyncBN is fixed.",
        "",
    ]
    for p in v["per_batch"]:
        row = by_b[p["per_rank_batch"]]
        lv, gv, dv = p["local_vs_sync"], p["renorm_vs_local"], p["renorm_vs_sync"]
        lines.append(
            f"- {p['per_rank_batch']} per rank: **{p['status']}**. BatchRenorm "
            f"{pm(row['renorm_test_accuracy'])}% vs local BN {pm(row['local_bn_test_accuracy'])}% "
            f"({100 * gv['diff']:+.1f} points, noise {100 * gv['noise']:.1f}) and vs SyncBN "
            f"{pm(row['sync_bn_test_accuracy'])}% ({100 * dv['diff']:+.1f}, noise "
            f"{100 * dv['noise']:.1f}); local BN vs SyncBN {100 * lv['diff']:+.1f} (noise "
            f"{100 * lv['noise']:.1f})."
        )
    return lines + [""]


def _small_md(results: dict) -> list[str]:
    sb = results["small_batches"]
    g = sb["global_batch"]
    renorm = any("renorm_test_accuracy" in row for row in sb["rows"])
    head = "| per-rank batch | ranks | local BN | SyncBN |" + (
        " local BatchRenorm |" if renorm else ""
    )
    lines = [
        "## Small per-rank batches",
        "",
        f"Test accuracy after {sb['steps']} steps at a global batch of {g}, mean ± standard "
        f"deviation over {sb['seeds']} seeds.",
        "",
    ]
    if renorm:
        lines += [_schedule_text(results["config"]), ""]
    lines += [head, "|---" * (5 if renorm else 4) + "|"]
    for row in sb["rows"]:
        cells = [
            str(row["per_rank_batch"]),
            _ranks(row, g),
            f"{pm(row['local_bn_test_accuracy'])}%",
            f"{pm(row['sync_bn_test_accuracy'])}%",
        ]
        if renorm:
            acc = row.get("renorm_test_accuracy")
            cells.append(f"{pm(acc)}%" if acc is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", *_verdict_md(sb), "![small batches](small_batches.png)", ""]


def _markdown(results: dict, s: dict) -> str:
    cost, r = results["cost"], results["ranks"]
    lines = [
        "# Synchronized batch norm over MPI: sync-demo",
        "",
        f"{r} rank(s); dataset: {results['dataset'].get('description', '')}; wall time "
        f"{s['wall_seconds']:.1f} s.",
        "",
        *_equivalence_md(results),
        *_small_md(results),
    ]
    m = cost["model_bn_bytes_per_rank"]
    lines += [
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
            json.dump(strict_json({**results, "summary": summary}), f, indent=1, allow_nan=False)
        md = _markdown(results, summary)
        (stage / "report.md").write_text(md)
        (stage / "report.html").write_text(_html(md, stage))
    return summary
