"""The demo's batched training (R runs as one model) against the same runs trained one by one
on the library's Sequential (the reference), over a short horizon: parameters, curves,
measurements, stopping and divergence agree to float rounding."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm_demo.data import Dataset, load_dataset, validation_split
from batchnorm_demo.experiments.ioffe import train_arm
from batchnorm_demo.experiments.ioffe_config import IoffeConfig, RunSpec
from batchnorm_demo.experiments.lockstep import group_key, train_group

ENTROPIES = (123, 456)


@pytest.fixture(scope="module")
def main_data():
    d = load_dataset("mnist-subset")
    tr, xv, yv = validation_split(d, 1000, np.random.default_rng(0))
    return tr, (xv, yv)


def _compare(group, alone, *, rtol=1e-9):
    worst = 0.0
    for g, o in zip(group, alone, strict=True):
        assert g["spec"] == o["spec"]
        assert g["diverged"] == o["diverged"] and g["steps_run"] == o["steps_run"]
        assert g["curves"]["steps"] == o["curves"]["steps"]
        for k, v in o["curves"].items():
            np.testing.assert_allclose(g["curves"][k], v, rtol=rtol, err_msg=k)
        for k in ("final_train_accuracy", "final_test_accuracy", "train_mode_test_accuracy"):
            if k in o:
                assert g[k] == pytest.approx(o[k], rel=rtol), k
        assert set(g) == set(o), set(g) ^ set(o)
        for a, b in zip(g["parameters"], o["parameters"], strict=True):
            assert a.shape == b.shape
            if np.all(np.isfinite(b)):
                worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["no_bn", "bn", "noisy_bn"])
def test_measured_sweep_runs_equal_one_by_one(main_data, arm):
    tr, val = main_data
    cfg = IoffeConfig(dtype="float64", steps=30, eval_every=10, probe_every=10, ics_every=10,
                      smooth_every=10, early_step=20, early_window=20)  # fmt: skip
    specs = [RunSpec(arm, lr, s, e, 30, measure=True) for s, e in enumerate(ENTROPIES)
             for lr in (0.5, 10.0)]  # fmt: skip
    group = train_group(specs, tr, cfg, val=val, keep_parameters=True)
    alone = [train_arm(s, tr, cfg, val=val, keep_parameters=True) for s in specs]
    assert _compare(group, alone) < 1e-10
    for g, o in zip(group, alone, strict=True):
        np.testing.assert_allclose(g["ics"]["relative"], o["ics"]["relative"], rtol=1e-7)
        assert g["ics"]["count"] == o["ics"]["count"] == 2
        for k in ("loss_min", "loss_max", "grad_change_min", "grad_change_max", "beta"):
            assert len(g["smoothness"][k]) == 3  # steps 0, 10, 20
            np.testing.assert_allclose(g["smoothness"][k], o["smoothness"][k], rtol=1e-7)
        for key, d in o["distribution"].items():
            np.testing.assert_allclose(g["distribution"][key]["curve"], d["curve"], rtol=1e-7)
    # the runs differ from each other (a mix-up of rows would not pass the comparison above
    # unless they were equal): the rates and seeds give different networks
    assert len({g["parameter_digest"] for g in group}) == len(group)


@pytest.mark.slow
def test_ghost_runs_stop_at_fit_like_one_by_one(main_data):
    tr, _ = main_data
    cfg = IoffeConfig(dtype="float64", steps=40, eval_every=10, early_step=20, fit_threshold=0.3)
    # virtual batches of 2 are left out: they normalize every unit to about +-1, so the
    # gradient reaching the layers below is rounding noise and the runs part ways at once
    specs = [RunSpec("bn", 10.0, s, e, 40, ghost=k, stop_at_fit=True)
             for s, e in enumerate(ENTROPIES) for k in (4, 10, 20, 60)]  # fmt: skip
    group = train_group(specs, tr, cfg, keep_parameters=True)
    alone = [train_arm(s, tr, cfg, keep_parameters=True) for s in specs]
    assert _compare(group, alone) < 1e-8
    runs = [g["steps_run"] for g in group]
    assert min(runs) < 40 and len(set(runs)) > 1  # some stopped early, at different steps
    assert all("train_mode_test_accuracy" in g for g in group)


@pytest.mark.parametrize("arm", ["no_bn", "bn"])
def test_divergence_leaves_the_batch_like_one_by_one(main_data, arm):
    tr, _ = main_data
    x = tr.x_train.copy()
    x[[5, 900, 1700, 2500]] = np.nan  # a batch holding one of these rows makes the loss NaN
    bad = Dataset("nan rows", x, tr.y_train, tr.x_test, tr.y_test, "test data")
    cfg = IoffeConfig(dtype="float64", steps=40, eval_every=10, early_step=20)
    specs = [RunSpec(arm, lr, s, e, 40) for s, e in enumerate((1, 2, 3)) for lr in (1.0, 2.0)]
    group = train_group(specs, bad, cfg, keep_parameters=True)
    alone = [train_arm(s, bad, cfg, keep_parameters=True) for s in specs]
    assert _compare(group, alone) < 1e-10
    assert all(g["diverged"] for g in group)
    assert all(g["final_test_accuracy"] == 0.1 for g in group)
    first_inf = {g["curves"]["train_loss"].index(np.inf) for g in group}
    assert len(first_inf) >= 1


@pytest.mark.slow
def test_regularization_runs_on_mnist1d_equal_one_by_one():
    data = load_dataset("mnist1d")
    cfg = IoffeConfig(dtype="float64", steps=60, eval_every=10, early_step=20)
    for arm in ("no_bn", "noisy_bn"):
        specs = [RunSpec(arm, 2.0, s, e, 60, dataset="reg", stop_at_fit=True)
                 for s, e in enumerate(ENTROPIES)]  # fmt: skip
        group = train_group(specs, data, cfg, keep_parameters=True)
        alone = [train_arm(s, data, cfg, keep_parameters=True) for s in specs]
        assert _compare(group, alone) < 1e-10


def test_group_order_does_not_matter(main_data):
    tr, val = main_data
    cfg = IoffeConfig(dtype="float64", steps=20, eval_every=10, early_step=10)
    specs = [RunSpec("bn", lr, s, e, 20) for s, e in enumerate(ENTROPIES) for lr in (0.5, 2.0)]
    a = train_group(specs, tr, cfg, val=val)
    b = train_group(specs[::-1], tr, cfg, val=val)[::-1]
    assert [x["parameter_digest"] for x in a] == [x["parameter_digest"] for x in b]


def test_mixed_groups_are_refused(main_data):
    tr, _ = main_data
    cfg = IoffeConfig(dtype="float64", steps=20, eval_every=10, early_step=10)
    specs = [RunSpec("bn", 1.0, 0, 1, 20), RunSpec("no_bn", 1.0, 0, 1, 20)]
    assert group_key(specs[0]) != group_key(specs[1])
    with pytest.raises(ValueError, match="share arm"):
        train_group(specs, tr, cfg)


def test_float32_training_follows_float64(main_data):
    """The demo's default precision: float32 runs track the float64 ones to float32 rounding
    over a short horizon (and are not bit-identical to them: the negative control)."""
    tr, val = main_data
    specs = [RunSpec(a, 1.0, 0, 5, 20) for a in ("no_bn", "bn", "noisy_bn")]
    out = {}
    for dt in ("float32", "float64"):
        cfg = IoffeConfig(dtype=dt, steps=20, eval_every=10, early_step=10)
        out[dt] = [train_group([s], tr, cfg, val=val, keep_parameters=True)[0] for s in specs]
    for a, b in zip(out["float32"], out["float64"], strict=True):
        assert a["parameters"][0].dtype == np.float32
        assert a["parameter_digest"] != b["parameter_digest"]
        for p32, p64 in zip(a["parameters"], b["parameters"], strict=True):
            scale = np.max(np.abs(p64))
            assert np.max(np.abs(p32 - p64)) <= 1e-4 * scale
        assert abs(a["final_train_loss"] - b["final_train_loss"]) < 1e-3


def test_reference_refuses_float32(main_data):
    tr, _ = main_data
    with pytest.raises(ValueError, match="float64"):
        train_arm(RunSpec("bn", 1.0, 0, 5, 5), tr, IoffeConfig(steps=5, eval_every=5, early_step=5))


@pytest.mark.parametrize(("dtype", "tol"), [(np.float32, 1e-7), (np.float64, 3e-16)])
def test_sigmoid_matches_the_stable_formula(dtype, tol):
    from batchnorm.nn import Sigmoid
    from batchnorm_demo.experiments._fused import sigmoid, sigmoid_backward

    x = np.concatenate([np.linspace(-40, 40, 4001), [-745.0, 710.0, 0.0]]).astype(dtype)
    ref = Sigmoid().forward(x.astype(np.float64))
    y = sigmoid(x)
    assert y.dtype == dtype and np.max(np.abs(y - ref)) <= tol
    dy = np.linspace(-1, 1, x.size).astype(dtype)
    g = sigmoid_backward(dy, y)
    assert g.dtype == dtype
    np.testing.assert_allclose(g, dy * y * (1 - y), rtol=1e-6, atol=tol)
