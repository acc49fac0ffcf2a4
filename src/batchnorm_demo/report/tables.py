"""The demo report's tables, each built once as ``(head, rows)`` of strings and rendered as
plain text (the terminal), Markdown or HTML. Every number is formatted by
:func:`batchnorm_demo._format.pm`; the learning-rate sweep by :func:`lr_sweep_table`.
"""

from __future__ import annotations

import numpy as np

from .._format import pm
from .._table_render import Table, render_html, render_md, render_text
from ..experiments.assess import LABELS
from ..experiments.ioffe import ARMS
from .marks import failed_seeds, steps_cell

__all__ = [
    "Table",
    "cost_table",
    "deep_table",
    "distribution_table",
    "format_table",
    "ghost_table",
    "ics_table",
    "init_table",
    "lr_sweep_table",
    "main_table",
    "regularization_table",
    "render_html",
    "render_md",
    "render_text",
]


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
    results: dict,
    metric: str = "test_accuracy",
    scale: float = 100.0,
    digits: int = 1,
    summary: dict | None = None,
) -> Table:
    """The learning-rate sweep: one row per arm, one column per rate, ``metric`` mean ± sd.

    The chosen rate of each arm is marked with ``*``; a rate at which some seed diverged, or
    (given ``summary``) ended below the usable threshold, with ``†`` (see
    :func:`failed_seeds`), whatever ``metric`` is shown.

    Parameters
    ----------
    results : dict
    metric : str
        ``"test_accuracy"``, ``"val_accuracy"``, ``"train_accuracy"``, ``"train_loss"`` or
        ``"early_test_accuracy"``.
    scale, digits : float, int
        As in :func:`pm`.
    summary : dict, optional
        The summary, for its ``usable_threshold``.

    Returns
    -------
    (head, rows)
    """
    lrs = [float(x) for x in results["config"]["lrs"]]
    threshold = None if summary is None else summary.get("usable_threshold")
    head = ["arm"] + [f"lr {x:g}" for x in lrs]
    rows = []
    for arm in ARMS:
        row = [LABELS[arm]]
        for lr in lrs:
            v = results["lr_sweep"][arm][repr(lr)]
            mark = "*" if lr == results["selected_lr"][arm] else ""
            mark += "†" if failed_seeds(v, threshold) else ""
            row.append(pm(v[metric], scale, digits) + mark)
        rows.append(row)
    return head, rows


def init_table(results: dict) -> Table:
    """Test accuracy (final and early) at each initial scale, each arm at its chosen rate."""
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


def deep_table(results: dict) -> Table:
    """The deep network: chosen rate, test and training accuracy, validation accuracy per rate."""
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


def distribution_table(results: dict) -> Table:
    """Distribution change early and late, each arm (noisy BN also before its noise)."""
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


def ics_table(results: dict) -> Table:
    """Santurkar et al.'s ICS at the common rate and at each arm's chosen rate."""
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


def regularization_table(results: dict) -> Table:
    """The regularization runs: steps (``‡``: some seed hit the cap unfitted), training and
    test accuracy and their gap."""
    reg, fit = results["regularization"], results["config"]["fit_threshold"]
    cap = reg.get("steps", results["config"].get("reg_steps"))
    head = ["arm", "lr", "steps", "train acc (%)", "test acc (%)", "train − test (points)"]
    rows = []
    for a in ARMS:
        r = reg[a]
        gap = np.subtract(r["final_train_accuracy"], r["final_test_accuracy"])
        rows.append(
            [
                LABELS[a],
                f"{r['lr']:g}",
                steps_cell(r, fit, cap),
                pm(r["final_train_accuracy"]),
                pm(r["final_test_accuracy"]),
                pm(gap),
            ]
        )
    return head, rows


def ghost_table(results: dict) -> Table:
    """The ghost-batch sweep: steps (``‡`` as in :func:`regularization_table`), accuracies and
    the train-mode minus eval-mode gap per virtual batch size."""
    g, fit = results["ghost"], results["config"]["fit_threshold"]
    cap = results.get("ghost_settings", {}).get("steps", results["config"].get("ghost_steps"))
    head = [
        "virtual batch",
        "steps",
        "train acc (%)",
        "test acc (%)",
        "train-mode − eval-mode test acc (points)",
    ]
    rows = [
        [
            k,
            steps_cell(g[k], fit, cap),
            pm(g[k]["final_train_accuracy"]),
            pm(g[k]["final_test_accuracy"]),
            pm(g[k]["train_eval_gap"]),
        ]
        for k in sorted(g, key=int)
    ]
    return head, rows


def _cost_rows(cfg: dict) -> list[tuple[str, str, str, str]]:
    """(key in cpu_seconds, what, runs, steps per run) of each known sub-experiment."""
    seeds = cfg["seeds"]
    return [
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


def cost_table(results: dict) -> Table:
    """Runs, steps, CPU seconds and wall seconds of each sub-experiment, and in all.

    Sub-experiments in ``results["cpu_seconds"]`` beyond the known ones get a row of their
    own (named by their key); a wall time per sub-experiment is shown where results have one.
    """
    cfg = results["config"]
    cpu = results.get("cpu_seconds", {})
    rows = _cost_rows(cfg)
    known = {key for key, *_ in rows}
    rows += [
        (k, k.replace("_", " "), f"{v.get('runs', '?')} runs", "")
        for k, v in cpu.items()
        if k not in known and isinstance(v, dict)
    ]

    def seconds(value) -> str:
        return "" if value is None else f"{value:.0f}"

    head = ["sub-experiment", "runs", "steps per run", "CPU seconds (all runs)", "wall seconds"]
    out = []
    for key, name, runs, steps in rows:
        c = cpu.get(key, {})
        out.append(
            [
                name,
                runs,
                steps,
                seconds(c.get("cpu_seconds")) or "n/a",
                seconds(c.get("wall_seconds")),
            ]
        )
    known_cpu = [
        c["cpu_seconds"]
        for c in cpu.values()
        if isinstance(c, dict) and c.get("cpu_seconds") is not None
    ]
    wall = results.get("wall_seconds")
    if wall is not None or known_cpu:
        out.append(
            [
                f"all of the above ({cfg['workers']} worker process"
                + ("es)" if cfg["workers"] != 1 else ")"),
                "",
                "",
                seconds(sum(known_cpu)) if known_cpu else "n/a",
                seconds(wall) or "n/a",
            ]
        )
    return head, out


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
        + "\n\nTest accuracy (%) by learning rate (* = chosen on validation, † = some seed "
        f"diverged or ended below {100 * summary['usable_threshold']:.1f}%):\n"
        + render_text(lr_sweep_table(results, summary=summary))
    )
