"""The written report of the demo: ``report.md``, ``report.html`` and ``results.json``.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and
rendered to Markdown (``report.md``, figures as PNG files next to it), to one self-contained
HTML file (``report.html``, figures embedded as base64 data URIs, so it can be mailed as is)
and, for the tables, to plain text for the terminal. The tables are built in
:mod:`.tables`, the figures drawn in :mod:`.figures`. Every number is
formatted by :func:`pm` and the learning-rate sweep by :func:`lr_sweep_table`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

from .._atomic import staged_folder
from .._format import pm, strict_json
from ..experiments.assess import summarize
from ..experiments.ioffe import ARMS
from .figures import write_figures
from .marks import failure_note, unfit_note
from .smoothness import smoothness_table, smoothness_text
from .summary import TERMS, figure_numbers, summary_table
from .tables import (
    cost_table,
    deep_table,
    distribution_table,
    format_table,
    ghost_table,
    ics_table,
    init_table,
    lr_sweep_table,
    main_table,
    regularization_table,
    render_html,
    render_md,
    render_text,
)

__all__ = ["format_table", "lr_sweep_table", "main_table", "pm", "render_text", "write_report"]


def _reproducibility(results: dict, claims: dict) -> str:
    """What a rerun gives: bit-identical here, rounding-level divergence elsewhere."""
    m = results.get("machine", {})
    where = ", ".join(f"{k} {v}" for k, v in m.items()) if m else "this machine"
    border = [c["title"] for c in claims.values() if c["verdict"].startswith("borderline")]
    return (
        f"Reproducibility: every random stream derives from --seed {results.get('seed', 0)}; "
        "runs are trained in groups fixed by the plan, each worker on one thread, so a rerun "
        "on the same machine and library build gives bit-identical numbers with any number "
        f"of workers (this run: {where}). On another machine (other CPU vector width, BLAS or "
        "math library) the last bits of the arithmetic differ and training, which is chaotic, "
        "amplifies them: expect each accuracy to move by about its spread over seeds, and "
        "verdicts to change only where they are marked borderline ("
        + (", ".join(border) if border else "none in this run")
        + ")."
    )


def _run_blocks(results: dict, summary: dict) -> list[tuple]:
    """The run (dataset, network, protocol, reproducibility) and the verdicts in full."""
    cfg, ds = results["config"], results["dataset"]
    claims = summary["claims"]
    arch = f"{ds['n_features']}-" + "-".join(str(h) for h in cfg["hidden"]) + f"-{ds['n_classes']}"
    b: list[tuple] = [
        ("h2", "The run"),
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
        ("p", _reproducibility(results, claims)),
        ("h2", "Verdicts in full"),
    ]
    for c in claims.values():
        b.append(("claim", c["title"], c["verdict"], c["evidence"], c["rests_on"]))
        if c.get("aside"):
            b.append(("p", c["aside"] + "."))
    return b


def _sweep_blocks(results: dict, summary: dict) -> list[tuple]:
    """Each arm at its chosen rate, and the learning-rate sweep."""
    ds = results["dataset"]

    def sweep(*args):
        return lr_sweep_table(*args, summary=summary)

    return [
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
            "Final test accuracy (%); * marks the rate chosen on validation; † marks a rate "
            "at which some seed diverged (its training loss became non-finite; it counts as "
            f"chance, {100 / ds['n_classes']:.0f}%, from then on) or ended below the usable "
            f"threshold of {100 * summary['usable_threshold']:.1f}% test accuracy. The rates "
            "without † are each arm's usable rates; the same marks, judged on final test "
            "accuracy, appear in the sweep tables below. " + failure_note(results, summary),
        ),
        ("table", sweep(results)),
        ("p", "Validation accuracy (%), which chose the rates:"),
        ("table", sweep(results, "val_accuracy")),
        ("p", f"Test accuracy (%) at step {results['ioffe']['bn']['early_step']} (how fast):"),
        ("table", sweep(results, "early_test_accuracy")),
        ("p", "Final training loss (mean over the last evaluation interval):"),
        ("table", sweep(results, "train_loss", 1.0, 4)),
        ("img", "learning_rates.png", "test accuracy and training loss against learning rate"),
        ("img", "accuracy.png", "test accuracy over training at the chosen rates"),
    ]


def _robustness_blocks(results: dict) -> list[tuple]:
    """Initial scale and depth; distribution change and internal covariate shift."""
    cfg = results["config"]
    return [
        ("h2", "Initial scale and depth"),
        (
            "p",
            f"The paper's small initial scale (std {cfg['small_init_std']}) against the "
            f"demo's (std {cfg['init_std']}), each arm at its chosen rate, {cfg['steps']} "
            f"steps. The deep network has {len(cfg['deep_hidden'])} hidden layers of "
            f"{cfg['deep_hidden'][0]}; its rate is chosen on the same validation split from "
            f"{', '.join(f'{x:g}' for x in cfg['deep_lrs'])}, {cfg['deep_steps']} steps.",
        ),
        ("table", init_table(results)),
        ("table", deep_table(results)),
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
        ("table", distribution_table(results)),
        ("img", "distribution.png", "distribution change"),
        (
            "p",
            f"Santurkar et al.'s measure, every {cfg['ics_every']} steps: G = gradient of the "
            "last hidden Linear layer's weights on the step's batch, G' = the same after only "
            "the layers before it took their SGD update on that batch (same noise draw); "
            "averaged over the run, mean ± sd over seeds. The measure grows with the step "
            "size, so it is given at the common rate and at each arm's chosen rate.",
        ),
        ("table", ics_table(results)),
    ]


def _smoothness_blocks(results: dict) -> list[tuple]:
    """The smoothness of the loss landscape, when it was measured."""
    if "smoothness" not in results:
        return []
    return [
        ("h2", "Smoothness of the loss landscape"),
        ("p", smoothness_text(results)),
        ("table", smoothness_table(results)),
        ("img", "smoothness.png", "smoothness along the gradient"),
    ]


def _regularization_blocks(results: dict) -> list[tuple]:
    """Regularization (each arm trained until fitted), ghost batch norm, the costs."""
    cfg, ds = results["config"], results["dataset"]
    reg = results["regularization"]
    fit = cfg["fit_threshold"]
    return [
        ("h2", "Regularization"),
        (
            "p",
            f"On {reg['dataset']['description'] if reg.get('dataset') else '?'}: each arm at "
            f"its chosen rate, trained until it reaches {100 * fit:.0f}% training accuracy "
            f"(checked every {cfg['eval_every']} steps) or for at most {cfg['reg_steps']} "
            "steps, so that test accuracy compares generalization, not under-fitting; ‡ "
            "marks an arm where some seed stopped at that cap without fitting.",
        ),
        ("table", regularization_table(results)),
        ("p", unfit_note({a: reg[a] for a in ARMS}, fit, reg.get("steps", cfg["reg_steps"]))),
        (
            "p",
            f"Ghost batch norm (GhostBatchNorm) on {ds['name']}: the BN arm at its chosen "
            f"rate with batch statistics over virtual batches inside each batch of "
            f"{cfg['batch_size']}, trained until fitted (at most {cfg['ghost_steps']} steps). "
            "The gap is test accuracy in training mode (statistics of each batch of "
            f"{cfg['batch_size']} test items, split the same "
            "way) minus evaluation mode (running statistics); ‡ as above.",
        ),
        ("table", ghost_table(results)),
        (
            "p",
            unfit_note(
                results["ghost"], fit, results["ghost_settings"].get("steps", cfg["ghost_steps"])
            ),
        ),
        ("img", "regularization.png", "regularization"),
        ("h2", "Settings and cost of each sub-experiment"),
        ("table", cost_table(results)),
        ("p", _cost_note(results)),
        ("p", "All numbers come from this run; results.json holds every number and curve."),
    ]


def _blocks(results: dict, summary: dict) -> list[tuple]:
    """The report's details, section by section, without the notes that have nothing to say."""
    b = _run_blocks(results, summary) + _sweep_blocks(results, summary)
    b += _robustness_blocks(results) + _smoothness_blocks(results)
    b += _regularization_blocks(results)
    return [blk for blk in b if blk[0] != "p" or blk[1].strip()]  # notes with nothing to say


def _report_blocks(results: dict, summary: dict) -> list[tuple]:
    """The whole report: the summary table and the terms first, then the details
    (:func:`_blocks`), with the figures numbered in the order they appear."""
    body = _blocks(results, summary)
    numbers = figure_numbers(body)
    body = [
        ("img", blk[1], f"Figure {numbers[blk[1]]}: {blk[2]}") if blk[0] == "img" else blk
        for blk in body
    ]
    intro = (
        "Every claim this run tested: its verdict, the one number it rests on and the figure "
        "that shows it. The verdicts in full, the tables and the figures follow; "
        f"{results['config']['seeds']} seeds per setting on {results['dataset']['name']}."
    )
    return [
        ("h1", "Does batch normalization do what the articles say?"),
        ("p", intro),
        ("table", summary_table(summary["claims"], numbers)),
        ("p", "How to read it:"),
        ("ul", TERMS),
        *body,
    ]


def _cost_note(results: dict) -> str:
    groups = results.get("cpu_seconds", {}).values()
    per_group = any(isinstance(g, dict) and "wall_seconds" in g for g in groups)
    return (
        "CPU seconds: the processor time of every run of a sub-experiment, summed over its "
        "runs (in the worker processes). Wall seconds: elapsed time from start to end. The "
        "two answer different questions: with several workers on otherwise idle cores the "
        "CPU seconds exceed the wall time (the runs share the cores in parallel); on a "
        "machine busy with other work the wall time grows and can exceed the CPU seconds "
        "by far. The CPU seconds are the better measure of the work itself"
        + (
            "."
            if per_group
            else " of the whole training (the sub-experiments' runs share the worker "
            "processes, so they have no wall time of their own)."
        )
    )


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
            out.append(render_md(blk[1]))
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})\n\n*{blk[2]}*")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in blk[1]))
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
            parts.append(render_html(blk[1]))
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in blk[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((folder / blk[1]).read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{esc(blk[2])}'>"
                f"<figcaption>{esc(blk[2])}</figcaption></figure>"
            )
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
        Output folder (created if missing). The files appear there together at the end;
        if writing fails or is interrupted, none of them is changed.

    Returns
    -------
    dict
        The summary (numbers and verdicts) that the report states.
    """
    summary = summarize(results)
    # every file is written to a scratch folder first and moved into place at the end, so an
    # interrupted run never leaves a half-written report (nor mixes it with an older one)
    with staged_folder(out) as stage:
        doc = strict_json({**results, "summary": summary})  # NaN -> null: standard JSON
        (stage / "results.json").write_text(json.dumps(doc, indent=1, allow_nan=False))
        write_figures(results, summary, stage)
        blocks = _report_blocks(results, summary)
        (stage / "report.md").write_text(_markdown(blocks))
        (stage / "report.html").write_text(_html(blocks, stage))
    return summary
