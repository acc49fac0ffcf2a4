"""The demo: determinism, fair tuning, measures, verdict logic and the CLI end to end."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from batchnorm_demo.cli import main
from batchnorm_demo.data import Dataset, validation_split
from batchnorm_demo.experiments import assess, ioffe, runner
from batchnorm_demo.report import lr_sweep_table, pm


def _toy_data(seed=0, n=300, d=12, k=3, name="toy"):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 2
    y = rng.integers(0, k, n)
    x = centers[y] + rng.standard_normal((n, d)) * 1.5
    cut = int(0.8 * n)
    return Dataset(name, x[:cut], y[:cut], x[cut:], y[cut:], f"{name} blobs")


TINY = dict(
    steps=30,
    batch_size=12,
    hidden=(8, 8),
    lrs=(0.5, 2.0),
    seeds=2,
    val_size=40,
    eval_every=10,
    early_step=10,
    probe_every=5,
    probe_size=40,
    early_window=15,
    ics_every=5,
    train_eval_size=100,
    deep_hidden=(8, 8, 8),
    deep_lrs=(0.5, 2.0),
    deep_steps=20,
    reg_steps=40,
    ghost_sizes=(4, 12),
    ghost_steps=20,
    unit=3,
)


def _run(workers=1, seed=7, **kw):
    cfg = ioffe.IoffeConfig(**{**TINY, **kw}, workers=workers)
    return runner.run(
        cfg, np.random.default_rng(seed), data=_toy_data(), reg_data=_toy_data(1, d=10, name="toy2")
    )


@pytest.fixture(scope="module")
def tiny_results():
    return _run()


def _strip(res):
    res = copy.deepcopy(res)
    res.pop("cpu_seconds")
    res["config"].pop("workers")
    return json.dumps(res, sort_keys=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_identical_seeds_identical_results(tiny_results, workers):
    b = _run(workers=workers)
    assert _strip(tiny_results) == _strip(b)
    c = _run(seed=8)
    assert c["ioffe"]["bn"]["final_train_loss"] != tiny_results["ioffe"]["bn"]["final_train_loss"]


def test_results_have_every_required_key(tiny_results):
    res = tiny_results
    arms = ("no_bn", "bn", "noisy_bn")
    for arm in arms:
        r = res["ioffe"][arm]
        assert len(r["final_test_accuracy"]) == 2 and len(r["final_train_accuracy"]) == 2
        assert r["lr"] in TINY["lrs"]
        assert set(res["lr_sweep"][arm]) == {"0.5", "2.0"}
        for v in res["lr_sweep"][arm].values():
            assert len(v["val_accuracy"]) == 2 and len(v["test_accuracy"]) == 2
        assert res["selected_lr"][arm] == r["lr"]
        for std in ("0.1", "0.01"):
            assert len(res["init"][std][arm]["final_test_accuracy"]) == 2
        d = res["distribution_change"][arm]
        assert len(d["early"]) == 2 and len(d["late"]) == 2
        assert np.all(np.isfinite(d["early"])) and np.all(np.isfinite(d["late"]))
        assert len(res["ics"][arm]["relative"]) == 2 and len(res["ics"][arm]["cosine"]) == 2
        assert all(-1 <= c <= 1 for c in res["ics"][arm]["cosine"])
        reg = res["regularization"][arm]
        assert len(reg["final_test_accuracy"]) == 2 and len(reg["final_train_accuracy"]) == 2
    assert "before_noise" in res["distribution_change"]["noisy_bn"]
    assert "before_noise" not in res["distribution_change"]["bn"]
    assert set(res["deep"]) == {"no_bn", "bn"}
    assert all(len(res["deep"][a]["final_test_accuracy"]) == 2 for a in res["deep"])
    assert res["regularization"]["dataset"]["name"] == "toy2"
    assert set(res["ghost"]) == {"4", "12"}
    for g in res["ghost"].values():
        assert len(g["final_test_accuracy"]) == 2 and len(g["train_eval_gap"]) == 2


def test_selected_rate_is_the_validation_argmax_not_test(tiny_results):
    for arm, sweep in tiny_results["lr_sweep"].items():
        best = max(sorted(sweep, key=float), key=lambda lr: np.mean(sweep[lr]["val_accuracy"]))
        assert tiny_results["selected_lr"][arm] == float(best)
    # validation and test disagree: validation decides
    assert runner.select_lr({0.5: [0.9, 0.9], 2.0: [0.8, 0.8]}) == 0.5
    assert runner.select_lr({0.5: [0.5], 2.0: [0.5]}) == 0.5  # ties: the smaller rate


def test_validation_split_is_held_out_of_training():
    data = _toy_data()
    train, x_val, y_val = validation_split(data, 40, np.random.default_rng(0))
    assert train.x_train.shape[0] + x_val.shape[0] == data.x_train.shape[0]
    rows = {r.tobytes() for r in train.x_train}
    assert not any(r.tobytes() in rows for r in x_val)
    np.testing.assert_array_equal(train.x_test, data.x_test)
    assert np.bincount(y_val, minlength=3).min() > 0


def _spec(arm, **kw):
    base = dict(arm=arm, lr=2.0, seed=0, seed_entropy=123, steps=40, hidden=(8, 8), measure=True)
    return ioffe.RunSpec(**{**base, **kw})


@pytest.mark.parametrize("arm", ["bn", "noisy_bn"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_probing_and_evaluation_do_not_change_training(arm, dtype):
    # the one-by-one reference (float64) and the batched path the demo uses (both dtypes)
    from batchnorm_demo.experiments.lockstep import train_group

    data = _toy_data()
    other = {"eval_every": 7, "probe_every": 3, "ics_every": 4, "smooth_every": 5}
    cfg = ioffe.IoffeConfig(**TINY, dtype=dtype)
    cfg2 = ioffe.IoffeConfig(**{**TINY, **other}, dtype=dtype)
    if dtype == "float64":
        ref = ioffe.train_arm(_spec(arm), data, cfg)
        assert (
            ref["parameter_digest"] == ioffe.train_arm(_spec(arm), data, cfg2)["parameter_digest"]
        )

    def train(spec, c):
        return train_group([spec], data, c)[0]["parameter_digest"]

    a = train(_spec(arm), cfg)
    assert a == train(_spec(arm), cfg2) == train(_spec(arm, measure=False), cfg)
    assert train(_spec(arm, seed_entropy=124), cfg) != a


def test_percentile_change():
    steady = np.tile(np.array([[-1.0], [0.0], [1.0]]), (5, 1, 1))  # (probes, 3, 1 unit)
    np.testing.assert_array_equal(ioffe.percentile_change(steady), 0.0)
    moving = steady + np.arange(5)[:, None, None] * 0.5  # shifts by a quarter width per probe
    np.testing.assert_allclose(ioffe.percentile_change(moving), 0.25)
    widening = steady * (1 + np.arange(5))[:, None, None]  # 15th/85th move by 1, median 0
    np.testing.assert_allclose(ioffe.percentile_change(widening)[0, 0], (2 / 3) / 3)


def test_ics_measure_leaves_the_network_alone():
    data = _toy_data()
    cfg = ioffe.IoffeConfig(**TINY, dtype="float64")
    rngs = [np.random.default_rng(i) for i in (1, 2)]
    net = ioffe.build_network("noisy_bn", 12, 3, (8, 8), 0.1, cfg, *rngs)
    before = {k: v.copy() for k, v in net.parameters().items()}
    state = rngs[1].bit_generator.state
    layer = [i for i, m in enumerate(net.modules) if hasattr(m, "W")][-2]
    x, y = data.x_train[:12], data.y_train[:12]
    small = ioffe.ics_measure(net, x, y, 1e-9, layer)
    big = ioffe.ics_measure(net, x, y, 5.0, layer)
    assert small["relative"] < 1e-6 and small["cosine"] > 1 - 1e-9
    assert big["relative"] > small["relative"]
    for k, v in net.parameters().items():
        np.testing.assert_array_equal(v, before[k])
    assert rngs[1].bit_generator.state == state


# ----------------------------------------------------------------------------- verdicts
def _fake(acc=None, train=None, reg_train=None, reg_test=None, dist=None, seeds=3):
    """A results dict with every section, built from a few numbers per arm."""
    arms = ("no_bn", "bn", "noisy_bn")
    acc = acc or {a: 0.9 for a in arms}
    train = train or dict.fromkeys(arms, 1.0)
    reg_train = reg_train or dict.fromkeys(arms, 1.0)
    reg_test = reg_test or {a: 0.6 for a in arms}
    dist = dist or {a: (0.1, 0.02) for a in arms}
    jitter = [-0.001, 0.0, 0.001][:seeds]

    def per_seed(v):
        return [v + j for j in jitter]

    res = {
        "config": {
            "fit_threshold": 0.99,
            "lrs": [0.5, 2.0],
            "seeds": seeds,
            "steps": 2000,
            "small_init_std": 0.01,
            "init_std": 0.1,
            "deep_hidden": [100] * 8,
            "deep_steps": 1500,
            "deep_lrs": [0.5, 2.0],
            "probe_every": 50,
            "batch_size": 60,
            "ghost_steps": 1000,
        },
        "dataset": {"n_test": 1000, "name": "toy"},
        "ghost_settings": {"dataset": "toy"},
    }
    res["ioffe"] = {
        a: {
            "lr": 0.5,
            "final_test_accuracy": per_seed(acc[a]),
            "final_train_accuracy": per_seed(train[a]),
            "early_step": 500,
            "early_test_accuracy": per_seed(acc[a]),
        }
        for a in arms
    }
    res["lr_sweep"] = {
        a: {
            lr: {"test_accuracy": per_seed(acc[a]), "early_test_accuracy": per_seed(acc[a])}
            for lr in ("0.5", "2.0")
        }
        for a in arms
    }
    res["init"] = {
        s: {
            a: {"final_test_accuracy": per_seed(acc[a]), "final_train_accuracy": per_seed(train[a])}
            for a in arms
        }
        for s in ("0.1", "0.01")
    }
    res["deep"] = {
        a: {
            "lr": 0.5,
            "final_test_accuracy": per_seed(acc[a]),
            "final_train_accuracy": per_seed(train[a]),
        }
        for a in ("no_bn", "bn")
    }
    res["distribution_change"] = {
        a: {
            "early_window": 1000,
            **{
                k: {"early": per_seed(dist[a][0]), "late": per_seed(dist[a][1])}
                for k in ("seen", "before_noise")
            },
        }
        for a in arms
    }
    res["ics"] = {
        a: {
            "lr": 0.5,
            "relative": per_seed(0.5),
            "cosine": per_seed(0.8),
            "by_lr": {"0.5": {"relative": per_seed(0.5), "cosine": per_seed(0.8)}},
        }
        for a in arms
    }
    res["regularization"] = {
        "dataset": {"n_test": 1000, "name": "toy"},
        "steps": 100,
        **{
            a: {
                "lr": 0.5,
                "final_test_accuracy": per_seed(reg_test[a]),
                "final_train_accuracy": per_seed(reg_train[a]),
                "steps_run": [100] * seeds,
            }
            for a in arms
        },
    }
    res["ghost"] = {
        k: {
            "final_test_accuracy": per_seed(0.9),
            "final_train_accuracy": per_seed(1.0),
            "train_eval_gap": per_seed(0.0),
        }
        for k in ("2", "60")
    }
    return res


def test_verdicts_supported_when_clear_and_fitted():
    s = assess.summarize(
        _fake(
            acc={"no_bn": 0.80, "bn": 0.95, "noisy_bn": 0.95},
            reg_test={"no_bn": 0.55, "bn": 0.65, "noisy_bn": 0.64},
            dist={"no_bn": (1.0, 0.5), "bn": (0.1, 0.02), "noisy_bn": (0.3, 0.2)},
        )
    )
    c = s["claims"]
    assert c["accuracy"]["verdict"] == "supported"
    assert c["regularization"]["verdict"] == "supported"
    assert c["stable_distributions"]["verdict"] == "supported"
    assert c["santurkar_control"]["verdict"] == "supported"
    assert c["depth"]["verdict"] == "supported"
    s = assess.summarize(_fake(acc={"no_bn": 0.95, "bn": 0.80, "noisy_bn": 0.80}))
    assert s["claims"]["accuracy"]["verdict"] == "not supported"


def test_verdicts_inconclusive_within_noise():
    # 1 point apart on 1,000 test items: inside the binomial standard error
    s = assess.summarize(
        _fake(
            acc={"no_bn": 0.90, "bn": 0.91, "noisy_bn": 0.905},
            reg_test={"no_bn": 0.60, "bn": 0.61, "noisy_bn": 0.6},
        )
    )
    for key in (
        "accuracy",
        "regularization",
        "small_init",
        "depth",
        "faster_training",
        "ics_gradient",
        "learning_rates",
    ):
        assert s["claims"][key]["verdict"] == "inconclusive", key


def test_verdicts_inconclusive_when_an_arm_did_not_fit():
    s = assess.summarize(
        _fake(
            reg_train={"no_bn": 0.48, "bn": 1.0, "noisy_bn": 1.0},
            reg_test={"no_bn": 0.40, "bn": 0.65, "noisy_bn": 0.64},
            acc={"no_bn": 0.80, "bn": 0.95, "noisy_bn": 0.95},
            train={"no_bn": 0.85, "bn": 1.0, "noisy_bn": 1.0},
        )
    )
    assert s["claims"]["regularization"]["verdict"] == "inconclusive"
    assert "did not fit" in s["claims"]["regularization"]["evidence"]
    assert s["claims"]["accuracy"]["verdict"] == "inconclusive"


def test_no_verdict_from_a_run_too_short_for_bn_to_fit():
    arms = ("no_bn", "bn", "noisy_bn")
    clear = {"no_bn": 0.30, "bn": 0.85, "noisy_bn": 0.85}
    s = assess.summarize(_fake(acc=clear, train=dict.fromkeys(arms, 0.9)))
    for key in ("accuracy", "small_init", "depth", "santurkar_control", "learning_rates"):
        assert s["claims"][key]["verdict"] == "inconclusive", key
        assert "too short" in s["claims"][key]["evidence"], key
    s = assess.summarize(_fake(acc=clear, train={"no_bn": 0.3, "bn": 1.0, "noisy_bn": 1.0}))
    assert s["claims"]["depth"]["verdict"] == "supported"  # BN fits, no BN does not train


def test_compare_accuracy_noise_model():
    c = assess.compare_accuracy([0.9, 0.9], [0.9, 0.9], 1000)
    assert c["noise"] == pytest.approx(2 * np.sqrt(2 * 0.09 / 1000))
    assert assess.compare_accuracy([0.95] * 3, [0.90] * 3, 1000)["outcome"] == "higher"
    assert assess.compare_accuracy([0.95] * 3, [0.90] * 3, 50)["outcome"] == "within noise"
    assert assess.compare_measure([1.0], [2.0])["outcome"] == "within noise"  # one seed
    assert assess.usable_rates(
        {"1.0": {"test_accuracy": [0.9, 0.5]}, "0.5": {"test_accuracy": [0.9, 0.91]}}, 0.85
    ) == [0.5]


def test_one_formatter_and_one_sweep_table(tiny_results):
    assert pm([0.9, 0.92]) == "91.0 ± 1.4"
    assert pm([1.0, 3.0], 1, 3) == "2.000 ± 1.414"
    head, rows = lr_sweep_table(tiny_results)
    assert head == ["arm", "lr 0.5", "lr 2"]
    assert [r[0] for r in rows] == ["no BN", "BN", "noisy BN"]
    assert sum(c.count("*") for r in rows for c in r) == 3  # one chosen rate per arm


# ----------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_demo_tiny(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("mlxtend")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import batchnorm_demo.experiments.ioffe as mod

    monkeypatch.setattr(mod, "IoffeConfig", _tiny_config_factory(mod.IoffeConfig))
    out = tmp_path / "demo"
    rc = main(
        ["demo", "--out", str(out), "--steps", "12", "--seeds", "2", "--workers", "1", "--quiet"]
    )
    assert rc == 0
    for name in (
        "results.json",
        "report.md",
        "report.html",
        "learning_rates.png",
        "accuracy.png",
        "distribution.png",
        "robustness.png",
        "regularization.png",
        "smoothness.png",
    ):
        assert (out / name).stat().st_size > 0, name

    def no_constants(c):  # NaN / Infinity are not JSON
        raise AssertionError(f"results.json holds {c}")

    res = json.loads((out / "results.json").read_text(), parse_constant=no_constants)
    assert res["dataset"]["name"] == "mnist-subset"
    assert len(res["ioffe"]["bn"]["final_test_accuracy"]) == 2
    md = (out / "report.md").read_text()
    for claim in res["summary"]["claims"].values():
        assert claim["verdict"] in md and claim["evidence"] in md
    page = (out / "report.html").read_text()
    srcs = re.findall(r"<img[^>]*src=['\"]([^'\"]*)", page)
    assert len(srcs) == 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "smoothness" in res and res["summary"]["claims"]["smoothness"]["verdict"]
    assert not re.search(r"(href|src)=['\"](?!data:)", page)
    printed = capsys.readouterr().out
    assert "noisy BN" in printed
    # the console ends with the report's summary table: one row per claim, with its verdict
    for claim in res["summary"]["claims"].values():
        assert re.search(rf"{re.escape(claim['verdict'])} +{re.escape(claim['title'])}\n", printed)
        assert claim["headline"] in printed
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_config_factory(base):
    """IoffeConfig with tiny defaults for the CLI test (network and data sizes)."""

    def make(**kw):
        return base(
            **{
                **TINY,
                "hidden": (8, 8),
                "val_size": 200,
                "probe_size": 50,
                "train_eval_size": 100,
                "reg_steps": 30,
                **kw,
            }
        )

    make.full = base.full
    return make


def test_cli_reports_bad_dataset_cleanly(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--dataset", "mnist", "--steps", "2"])
    assert rc == 2
    assert "needs --data" in capsys.readouterr().err


def test_serial_runs_use_one_numba_thread_and_restore_it():
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    with runner._one_numba_thread():
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before


def test_each_claim_is_one_small_function_in_the_report_s_order():
    """assess.summarize runs the list of claims (claims.CLAIMS): one function per claim
    (measure, decide, say), each returning every field the report reads."""
    import ast
    import inspect
    from pathlib import Path

    from batchnorm_demo.experiments import claims as claims_mod
    from batchnorm_demo.experiments.claim_rules import context

    fixture = Path(__file__).parent / "fixtures" / "demo_results_default_run.json"
    results = json.loads(fixture.read_text())
    summary = assess.summarize(results)
    assert list(summary["claims"]) == [key for key, _ in claims_mod.CLAIMS]
    k = context(results)
    for key, claim in claims_mod.CLAIMS:
        c = claim(k)
        assert {"title", "verdict", "evidence", "rests_on", "headline"} <= set(c), key
        assert summary["claims"][key]["title"] == c["title"]
        body = ast.parse(inspect.getsource(claim)).body[0]
        assert body.end_lineno - body.lineno <= 60, key
    # a run without the smoothness measurements has no smoothness claim (not an error)
    del results["smoothness"]
    assert "smoothness" not in assess.summarize(results)["claims"]
