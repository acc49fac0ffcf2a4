"""The demo report's marks, cost table and figures (issue 16), on small hand-made results.

Each check fails on the report before its fix: no † for a seed that ended at chance without
diverging, no marker for a stop-at-fit run at its cap, CPU and wall time in one column, two
y-axes in the ghost panel, one y-label for four distribution panels, the same style for the
15th and 85th percentiles, BN and noisy-BN stars on one spot.
"""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm_demo.experiments.compare import usable_rates
from batchnorm_demo.report.marks import (
    failed_seeds,
    failure_note,
    steps_cell,
    unfit_note,
    unfitted_seeds,
)
from batchnorm_demo.report.tables import cost_table, lr_sweep_table, regularization_table

ARMS = ("no_bn", "bn", "noisy_bn")
LRS = (0.5, 10.0)


def _sweep_results():
    """no BN at lr 10: one seed at 19 % that did not diverge (the issue's case)."""
    cell = {
        "val_accuracy": [0.9, 0.9],
        "train_accuracy": [0.95, 0.95],
        "train_loss": [0.2, 0.2],
        "early_test_accuracy": [0.8, 0.8],
    }
    sweep = {a: {repr(lr): {**cell, "test_accuracy": [0.90, 0.91]} for lr in LRS} for a in ARMS}
    sweep["no_bn"][repr(10.0)].update(test_accuracy=[0.19, 0.88], diverged=[False, False])
    sweep["bn"][repr(10.0)].update(test_accuracy=[0.10, 0.91], diverged=[True, False])
    for a in ARMS:
        for lr in LRS:
            sweep[a][repr(lr)].setdefault("diverged", [False, False])
    return {
        "config": {"lrs": list(LRS)},
        "lr_sweep": sweep,
        "selected_lr": {a: 0.5 for a in ARMS},
    }


def test_a_seed_at_chance_that_did_not_diverge_is_marked():
    results = _sweep_results()
    cell = results["lr_sweep"]["no_bn"][repr(10.0)]
    assert failed_seeds(cell, 0.85) == [0]
    assert failed_seeds(cell) == []  # divergence alone would miss it (the old rule)
    assert failed_seeds(results["lr_sweep"]["bn"][repr(10.0)]) == [0]  # diverged
    assert failed_seeds({"test_accuracy": [float("nan")], "diverged": [False]}, 0.5) == [0]


def test_the_dagger_marks_exactly_the_rates_that_are_not_usable():
    results = _sweep_results()
    summary = {"usable_threshold": 0.85}
    head, rows = lr_sweep_table(results, summary=summary)
    for arm, row in zip(ARMS, rows, strict=True):
        usable = usable_rates(results["lr_sweep"][arm], 0.85)
        # the diverged seed of BN ended at chance, so both rules agree on it
        marked = [lr for lr, c in zip(LRS, row[1:], strict=True) if "†" in c]
        assert sorted(set(LRS) - set(usable)) == marked, (arm, row)
    assert sum("†" in c for r in rows for c in r) == 2
    # every sweep table carries the same marks, whatever metric it shows
    _, loss_rows = lr_sweep_table(results, "train_loss", 1.0, 4, summary=summary)
    assert ["†" in c for r in loss_rows for c in r] == ["†" in c for r in rows for c in r]
    note = failure_note(results, summary)
    assert "no BN at lr 10: 19.0%, 88.0%" in note and "BN at lr 10: 10.0% (diverged)" in note
    assert "lr 0.5" not in note


def test_a_stop_at_fit_run_at_its_cap_is_marked():
    fitted = {"final_train_accuracy": [0.995, 0.991], "steps_run": [900, 1400]}
    capped = {"final_train_accuracy": [0.995, 0.985], "steps_run": [900, 2000]}
    assert unfitted_seeds(fitted, 0.99, 2000) == []
    assert unfitted_seeds(capped, 0.99, 2000) == [1]
    assert steps_cell(fitted, 0.99, 2000) == "900-1400"
    assert steps_cell(capped, 0.99, 2000) == "900-2000‡"
    note = unfit_note({"bn": fitted, "noisy_bn": capped}, 0.99, 2000)
    assert "noisy BN seed 1 98.5%" in note and "BN seed" not in note.replace("noisy BN", "")
    assert unfit_note({"bn": fitted}, 0.99, 2000) == ""
    results = {
        "config": {"fit_threshold": 0.99, "reg_steps": 2000},
        "regularization": {
            "steps": 2000,
            **{
                a: {"lr": 1.0, "final_test_accuracy": [0.6, 0.6], **e}
                for a, e in zip(ARMS, (fitted, fitted, capped), strict=True)
            },
        },
    }
    _, rows = regularization_table(results)
    assert [r[2].endswith("‡") for r in rows] == [False, False, True]


def _cost_results(extra=False):
    cfg = {
        "seeds": 3,
        "lrs": [0.5, 1.0],
        "steps": 100,
        "small_init_std": 0.01,
        "deep_hidden": [100] * 8,
        "deep_lrs": [0.5],
        "deep_steps": 50,
        "reg_dataset": "mnist1d",
        "reg_steps": 500,
        "ghost_sizes": [2, 60],
        "ghost_steps": 40,
        "workers": 2,
    }
    cpu = {
        k: {"runs": 6, "cpu_seconds": 10.0 * (i + 1)}
        for i, k in enumerate(("lr_sweep", "small_init", "deep", "regularization", "ghost"))
    }
    if extra:
        cpu["smoothness"] = {"runs": 4, "cpu_seconds": 7.0, "wall_seconds": 3.0}
    return {"config": cfg, "cpu_seconds": cpu, "wall_seconds": 83.0}


def test_cpu_seconds_and_wall_time_have_their_own_columns():
    head, rows = cost_table(_cost_results())
    cpu_col, wall_col = head.index("CPU seconds (all runs)"), head.index("wall seconds")
    assert cpu_col != wall_col
    total = rows[-1]
    assert total[cpu_col] == "150" and total[wall_col] == "83"
    assert all("wall" not in r[cpu_col] for r in rows)
    assert [r[cpu_col] for r in rows[:-1]] == ["10", "20", "30", "40", "50"]


def test_the_cost_table_keeps_sub_experiments_it_does_not_know():
    head, rows = cost_table(_cost_results(extra=True))
    row = next(r for r in rows if r[0] == "smoothness")
    assert row[head.index("CPU seconds (all runs)")] == "7"
    assert row[head.index("wall seconds")] == "3"
    assert rows[-1][head.index("CPU seconds (all runs)")] == "157"


# ----------------------------------------------------------------------------- figures
def _figure_results():
    rng = np.random.default_rng(0)
    steps = [0, 10, 20, 30]
    dist = {}
    for arm in ARMS:
        d = {
            "probe_steps": steps,
            "early_window": 20,
            "unit": 0,
            "seen": {
                "curve": rng.random((2, 3)).tolist(),
                "unit_percentiles_seed0": np.sort(rng.normal(size=(4, 3)), 1).tolist(),
            },
        }
        if arm == "noisy_bn":
            d["before_noise"] = {k: v for k, v in d["seen"].items()}
        dist[arm] = d
    sweep = {
        a: {
            repr(lr): {
                "test_accuracy": [0.9, 0.91],
                "early_test_accuracy": [0.8, 0.8],
                "train_loss": [0.2, 0.3],
            }
            for lr in LRS
        }
        for a in ARMS
    }
    acc = {"final_train_accuracy": [0.99, 1.0], "final_test_accuracy": [0.6, 0.62]}
    return {
        "config": {
            "lrs": list(LRS),
            "seeds": 2,
            "fit_threshold": 0.99,
            "batch_size": 60,
            "probe_size": 50,
        },
        "ioffe": {a: {"lr": 10.0, "early_step": 10} for a in ARMS},
        "lr_sweep": sweep,
        "selected_lr": {"no_bn": 0.5, "bn": 10.0, "noisy_bn": 10.0},  # both BN arms at 10
        "distribution_change": dist,
        "regularization": {"dataset": {"name": "mnist1d"}, **{a: acc for a in ARMS}},
        "ghost": {k: {**acc, "train_eval_gap": [-0.1, -0.05]} for k in ("2", "60")},
        "ghost_settings": {"lr": 1.0, "dataset": "mnist-subset"},
    }


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """Draw one figure and return it (kept open instead of closed)."""
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from batchnorm_demo.report import figures as rf

    plt = rf._plt()
    close, kept = plt.close, []
    monkeypatch.setattr(plt, "close", kept.append)

    def draw(name):
        results = _figure_results()
        path = tmp_path / f"{name}.png"
        if name == "lr":
            rf._lr_figure(results, {"usable_threshold": 0.85}, path)
        elif name == "distribution":
            rf._distribution_figure(results, path)
        else:
            rf._regularization_figure(results, path)
        assert path.stat().st_size > 0
        return kept[-1]

    yield draw
    for fig in kept:
        close(fig)


def test_distribution_panels_each_have_a_y_label_and_distinct_percentile_styles(drawn):
    fig = drawn("distribution")
    axes = fig.axes
    assert len(axes) == 4
    assert all(ax.get_ylabel() for ax in axes)
    for ax in axes[1:]:  # the unit panels: 15th, 50th, 85th (then noisy BN's before-noise)
        styles = [line.get_linestyle() for line in ax.get_lines()[:3]]
        assert len(set(styles)) == 3, styles
    assert fig.get_size_inches()[0] <= 12  # not a 16-inch strip of four panels


def test_bn_and_noisy_bn_stars_do_not_share_a_spot(drawn):
    fig = drawn("lr")
    stars = [line for line in fig.axes[0].get_lines() if line.get_marker() == "*"]
    assert len(stars) == 3
    xs = [float(line.get_xdata()[0]) for line in stars]
    assert len(set(xs)) == 3  # BN and noisy BN are both at lr 10, side by side
    assert all(ax.get_ylabel() for ax in fig.axes)


def test_the_ghost_panels_have_one_y_axis_each(drawn):
    fig = drawn("regularization")
    positions = {tuple(np.round(ax.get_position().bounds, 6)) for ax in fig.axes}
    assert len(positions) == len(fig.axes) == 3  # a twin axis shares its panel's position
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert "points" in fig.axes[2].get_ylabel() and "%" in fig.axes[1].get_ylabel()


def test_results_json_is_standard_json(tmp_path):
    """NaN and infinities (a loss before the first step, a spread of one seed) are written as
    null: the file parses with a strict parser."""
    import json
    import math

    from batchnorm_demo._format import strict_json

    doc = {"a": [1.0, math.nan, math.inf, -math.inf, (2.0, math.nan)], "b": {"c": math.nan}}
    out = strict_json(doc)
    assert out == {"a": [1.0, None, None, None, [2.0, None]], "b": {"c": None}}
    assert doc["a"][1] != doc["a"][1]  # the input is untouched
    with pytest.raises(ValueError):
        json.dumps(doc, allow_nan=False)  # the negative control
    json.loads(json.dumps(out, allow_nan=False), parse_constant=lambda c: pytest.fail(c))


# ------------------------------------------------------------------ the report's opening
def _opening():
    """The report of a real default run (3 seeds; results.json with its floats rounded to 4
    digits, tests/fixtures/demo_results_default_run.json), as Markdown."""
    import json
    from pathlib import Path

    from batchnorm_demo.experiments.assess import summarize
    from batchnorm_demo.report import write as report

    fixture = Path(__file__).parent / "fixtures" / "demo_results_default_run.json"
    results = json.loads(fixture.read_text())
    summary = summarize(results)
    return summary, report._markdown(report._report_blocks(results, summary))


def test_the_report_opens_with_one_summary_table_of_every_claim():
    summary, md = _opening()
    lines = md.splitlines()
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    before = [line for line in lines[:first_table] if line.strip()]
    assert before[0].startswith("# ") and len(before) == 2  # the title and one sentence
    assert lines[first_table] == "| claim | verdict | the number it rests on | figure |"
    rows = []
    for line in lines[first_table + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    claims = summary["claims"]
    assert len(rows) == len(claims) and all(len(r) == 4 for r in rows)  # no stray '|'
    for row, c in zip(rows, claims.values(), strict=True):
        assert row[:3] == [c["title"], c["verdict"], c["headline"]] and row[2]
    # each figure the table points to is a numbered caption further down
    for fig in {r[3] for r in rows if r[3].startswith("Figure ")}:
        assert f"*{fig}: " in md
    assert md.index("## Verdicts in full") > md.index("Train-eval gap: test accuracy in train")


def test_the_speed_verdict_does_not_share_its_line_with_the_common_rate_numbers():
    summary, md = _opening()
    c = summary["claims"]["faster_training"]
    assert "common rate" not in c["evidence"] and "common rate" in c["aside"]
    line = next(x for x in md.splitlines() if x.startswith("- **BN trains faster"))
    assert "common rate" not in line


def test_every_term_of_the_tables_is_defined_before_it_is_used():
    _, md = _opening()
    terms = ("train-eval gap", "noise", "usable rate", "common rate", "noisy BN", "effective beta")
    for term in terms:
        first = md.lower().index(term.lower())
        assert first < md.index("## Verdicts in full"), term
    assert "with several workers it exceeds the wall time" not in md
    assert "- Train-eval gap: " not in md and "statistics. Train-eval gap: test accuracy" in md


def test_the_console_summary_is_two_short_lines_per_claim():
    from batchnorm_demo.report.summary import summary_text

    summary, _ = _opening()
    lines = summary_text(summary["claims"]).splitlines()
    assert len(lines) == 2 * len(summary["claims"])
    for (title_line, number_line), c in zip(
        zip(lines[::2], lines[1::2], strict=True), summary["claims"].values(), strict=True
    ):
        assert title_line.startswith(c["verdict"]) and title_line.endswith(c["title"])
        assert number_line.strip().startswith(c["headline"])  # never on the verdict's line
        assert len(number_line) < 200
