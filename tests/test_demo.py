"""The demo: experiment determinism, assessment logic, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batchnorm.cli import main
from batchnorm.data import Dataset
from batchnorm.experiments import assess, ioffe


def _toy_data(rng=None):
    rng = rng or np.random.default_rng(0)
    centers = rng.standard_normal((3, 12)) * 2
    y = rng.integers(0, 3, 300)
    x = centers[y] + rng.standard_normal((300, 12))
    return Dataset("toy", x[:240], y[:240], x[240:], y[240:], "toy blobs")


TINY = dict(steps=30, eval_every=10, hidden=(8, 8), seeds=2, probe_size=40,
            train_eval_size=100, no_bn_extra_lrs=(1.0,), unit=3)


@pytest.mark.parametrize("workers", [1, 2])
def test_identical_seeds_identical_results(workers):
    data = _toy_data()
    cfg = ioffe.IoffeConfig(**TINY, workers=1)
    a = ioffe.run(cfg, np.random.default_rng(7), data=data)
    b = ioffe.run(ioffe.IoffeConfig(**TINY, workers=workers), np.random.default_rng(7), data=data)
    assert json.dumps(a["ioffe"], sort_keys=True) == json.dumps(b["ioffe"], sort_keys=True)
    c = ioffe.run(cfg, np.random.default_rng(8), data=data)
    assert c["ioffe"]["bn"]["final_train_loss"] != a["ioffe"]["bn"]["final_train_loss"]


def test_results_structure():
    data = _toy_data()
    res = ioffe.run(ioffe.IoffeConfig(**TINY, workers=1), np.random.default_rng(1), data=data)
    assert set(res) == {"config", "dataset", "ioffe"}
    assert set(res["ioffe"]) == {"no_bn", "bn", "noisy_bn"}
    for arm in ("no_bn", "bn", "noisy_bn"):
        r = res["ioffe"][arm]
        assert len(r["final_test_accuracy"]) == 2 and len(r["final_train_accuracy"]) == 2
        curve = r["test_accuracy_curve"]
        assert curve["steps"] == [0, 10, 20, 30]
        assert len(curve["values"]) == 2 and all(len(v) == 4 for v in curve["values"])
        for q in ("15", "50", "85"):
            assert np.shape(r["percentiles"][q]) == (2, 4)
        p = np.asarray([r["percentiles"][q] for q in ("15", "50", "85")])
        assert np.all(p[0] <= p[1]) and np.all(p[1] <= p[2])
    sweep = res["ioffe"]["no_bn"]["lr_sweep"]
    assert sorted(v["lr"] for v in sweep.values()) == [0.5, 1.0]
    chosen = res["ioffe"]["no_bn"]["lr"]
    assert np.mean(sweep[repr(chosen)]["final_train_loss"]) == min(
        np.mean(v["final_train_loss"]) for v in sweep.values())


def test_same_init_across_arms():
    cfg = ioffe.IoffeConfig(**TINY)
    nets = [ioffe.build_network(arm, 12, 3, cfg, np.random.default_rng(5),
                                np.random.default_rng(6)) for arm in ioffe.ARMS]
    weights = [[m.W for m in n.modules if hasattr(m, "W")] for n in nets]
    for w in weights[1:]:
        for a, b in zip(weights[0], w, strict=True):
            np.testing.assert_array_equal(a, b)


def test_instability_metric():
    t = np.linspace(0, 1, 20)[:, None]
    stable = ioffe.instability(np.full((20, 2), -1.0), np.zeros((20, 2)), np.ones((20, 2)))
    assert stable["score"] == 0.0
    drifting = ioffe.instability(t - 1, t, t + 1)
    assert drifting["median_drift"] == pytest.approx(t.std() / 2)
    assert drifting["width_drift"] == 0.0


def _fake_results(gap_bn, gap_nobn, inst_bn, inst_nobn, inst_noisy, test_noisy=0.9):
    def arm(test, gap, inst):
        test = list(test)
        return {"lr": 0.5, "final_test_accuracy": test,
                "final_train_accuracy": [t + g for t, g in zip(test, gap, strict=True)],
                "train_test_gap": list(gap),
                "test_accuracy_curve": {"steps": [0, 10, 100], "values": [[0.1, 0.5, t]
                                                                          for t in test]},
                "instability": [{"score": s} for s in inst]}
    res = {"ioffe": {"no_bn": arm([0.9, 0.91, 0.9], gap_nobn, inst_nobn),
                     "bn": arm([0.9, 0.9, 0.91], gap_bn, inst_bn),
                     "noisy_bn": arm([test_noisy] * 3, gap_bn, inst_noisy)}}
    res["ioffe"]["no_bn"]["lr_sweep"] = {"0.5": {"lr": 0.5}}
    return res


def test_verdicts_follow_the_numbers():
    s = assess.summarize(_fake_results([0.01, 0.02, 0.015], [0.08, 0.09, 0.085],
                                      [0.05, 0.06, 0.055], [0.3, 0.32, 0.31], [0.5, 0.52, 0.51]))
    assert s["claims"]["regularization"]["verdict"] == "supported"
    assert s["claims"]["stable_distributions"]["verdict"] == "supported"
    assert "even less stable than without BN" in s["claims"]["stable_distributions"]["noisy_bn"]
    s = assess.summarize(_fake_results([0.09, 0.1, 0.095], [0.02, 0.03, 0.025],
                                      [0.3, 0.32, 0.31], [0.05, 0.06, 0.055], [0.05, 0.05, 0.05]))
    assert s["claims"]["regularization"]["verdict"] == "not supported"
    assert s["claims"]["stable_distributions"]["verdict"] == "not supported"
    assert "did not make" in s["claims"]["stable_distributions"]["noisy_bn"]


def test_cli_demo_tiny(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("mlxtend")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--steps", "20", "--eval-every", "10", "--seeds", "2",
               "--workers", "1", "--quiet"])
    assert rc == 0
    for name in ("results.json", "report.md", "report.html", "accuracy.png",
                 "percentiles.png", "gap.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["steps"] == 20 and res["dataset"]["name"] == "mnist-subset"
    assert len(res["ioffe"]["bn"]["final_test_accuracy"]) == 2
    md = (out / "report.md").read_text()
    for verdict in res["summary"]["claims"].values():
        assert verdict["verdict"] in md and verdict["evidence"] in md
    printed = capsys.readouterr().out
    assert "noisy BN" in printed and "regularization:" in printed
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_bad_dataset_cleanly(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--dataset", "mnist", "--steps", "2"])
    assert rc == 2
    assert "needs --data" in capsys.readouterr().err
