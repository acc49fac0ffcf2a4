"""sync-demo's local BatchRenorm arm, its verdict, and fatal errors under mpiexec."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from test_distributed import mpirun, needs_mpi

from batchnorm.distributed import DistributedError
from batchnorm.nn import SGD
from batchnorm.renorm import BatchRenorm
from batchnorm_demo import _ranks
from batchnorm_demo.experiments.sync_model import (
    LocalRenorm,
    SyncConfig,
    build_model,
    renorm_schedule,
    train_step,
)
from batchnorm_demo.experiments.sync_small import assignment, plan, renorm_verdict
from batchnorm_demo.report.sync import _ranks as ranks_cell

SCHEDULE = renorm_schedule(SyncConfig(), 20)  # plain BN for 1 step, full limits at step 8


def _per_rank_reference(x_steps, dys, split, c):
    """One BatchRenorm per rank, gamma/beta shared, trained by the summed gradient."""
    layers = [BatchRenorm(c, schedule=SCHEDULE, momentum=0.9) for _ in split]
    gamma, beta = np.ones(c), np.zeros(c)
    for x, dy in zip(x_steps, dys, strict=True):
        bounds = np.cumsum([0, *split])
        dg, db = np.zeros(c), np.zeros(c)
        for layer, lo, hi in zip(layers, bounds[:-1], bounds[1:], strict=True):
            layer.gamma[...], layer.beta[...] = gamma, beta
            layer.forward(x[lo:hi], training=True)
            layer.backward(dy[lo:hi])
            dg, db = dg + layer.dgamma, db + layer.dbeta
        gamma -= 0.1 * dg
        beta -= 0.1 * db
    return layers, gamma


@pytest.mark.parametrize("b, split", [(4, [4] * 5), (8, [8, 8, 4])])
def test_local_renorm_is_one_batch_renorm_per_rank(b, split):
    rng = np.random.default_rng(0)
    c, n = 3, 20
    xs = [rng.normal(2.0, 3.0, (n, c)) for _ in range(12)]
    dys = [rng.normal(size=(n, c)) for _ in range(12)]
    layers, gamma = _per_rank_reference(xs, dys, split, c)
    emu = LocalRenorm(c, per_rank_batch=b, global_batch=n, schedule=SCHEDULE, momentum=0.9)
    assert emu.rank_batches == tuple(split)
    for x, dy in zip(xs, dys, strict=True):
        emu.forward(x, training=True)
        emu.backward(dy)
        for name, g in emu.gradients().items():
            emu.parameters()[name][...] -= 0.1 * g
    np.testing.assert_allclose(emu.gamma, gamma, rtol=1e-12)
    mean, var = emu.running()
    np.testing.assert_allclose(mean, [m.running_mean for m in layers], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, [m.running_var for m in layers], rtol=1e-12)
    assert np.ptp(mean, axis=0).max() > 1e-3  # the ranks' statistics really differ
    # the limits were relaxed, so renorm differed from BN (negative control for the schedule)
    assert layers[0].limits() == (SyncConfig().renorm_rmax, SyncConfig().renorm_dmax)
    # evaluation: the ranks' average running mean and std
    x = xs[0]
    std = np.mean([m.running_std for m in layers], axis=0)
    want = emu.gamma * (x - mean.mean(0)) / std + emu.beta
    np.testing.assert_allclose(emu.forward(x, training=False), want, rtol=1e-12)


def test_local_renorm_refuses_another_batch_and_keeps_its_state():
    emu = LocalRenorm(3, per_rank_batch=4, global_batch=8, schedule=SCHEDULE, momentum=0.9)
    before = [m.state_dict() for m in emu.layers]
    with pytest.raises(
        ValueError, match=r"global batch of 8 rows split as \[4, 4\]; got x of shape \(6, 3\)"
    ):
        emu.forward(np.ones((6, 3)), training=True)
    for m, s in zip(emu.layers, before, strict=True):
        assert m.num_batches_tracked == s["num_batches_tracked"] == 0
        np.testing.assert_array_equal(m.running_mean, s["running_mean"])


def test_one_rank_of_local_renorm_is_the_renorm_model_and_the_plan_is_balanced():
    config = SyncConfig(small_batch_steps=5, seeds=2)
    rng = np.random.default_rng(1)
    one = build_model(6, 3, config, seed=0, norm="local-renorm", virtual_batch=60)
    ref = build_model(6, 3, config, seed=0, norm="renorm")
    eight = build_model(6, 3, config, seed=0, norm="local-renorm", virtual_batch=8)
    x, y = rng.normal(size=(60, 6)), rng.integers(0, 3, 60)
    for model in (one, ref, eight):
        opt = SGD(model, 0.5)
        for _ in range(5):
            train_step(model, opt, x, y, None)
    p = [np.concatenate([v.ravel() for v in m.parameters().values()]) for m in (one, ref, eight)]
    np.testing.assert_allclose(p[0], p[1], rtol=1e-12, atol=1e-14)
    assert np.max(np.abs(p[2] - p[1])) > 1e-6  # 8 ranks of their own are another model
    tasks = plan(config)
    assert sum(t[0] == "renorm" for t in tasks) == 2 * len(config.renorm_batches)
    owner = assignment(config, 2)
    assert set(owner) == {0, 1} and owner == assignment(config, 2)  # deterministic
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model(6, 3, config, seed=0, norm="renrom")


def test_rank_column_shows_the_real_split():
    assert ranks_cell({"per_rank_batch": 8, "rank_batches": [8] * 7 + [4]}, 60) == (
        "8 (7 × 8 + 1 × 4)"
    )
    assert ranks_cell({"per_rank_batch": 15, "rank_batches": [15] * 4}, 60) == "4"


def _row(b, local, sync, renorm):
    return {
        "per_rank_batch": b,
        "local_bn_test_accuracy": local,
        "sync_bn_test_accuracy": sync,
        "renorm_test_accuracy": renorm,
    }


SYNC = [0.913, 0.912, 0.914]
HURT = [0.65, 0.64, 0.66]


def test_renorm_verdict_follows_the_noise_rule():
    fixed = _row(2, HURT, SYNC, [0.91, 0.912, 0.911])
    partly = _row(2, HURT, SYNC, [0.80, 0.81, 0.805])
    healthy = _row(8, SYNC, SYNC, SYNC)
    v = renorm_verdict([fixed, healthy], 1000)
    assert v["verdict"] == "supported"
    assert [p["status"] for p in v["per_batch"]] == ["fixed", "nothing to fix"]
    v = renorm_verdict([partly, healthy], 1000)
    assert v["verdict"] == "not supported" and v["per_batch"][0]["status"] == "partly fixed"
    assert renorm_verdict([_row(2, HURT, SYNC, HURT)], 1000)["per_batch"][0]["status"] == (
        "not fixed"
    )
    # nothing hurt: nothing to decide
    assert renorm_verdict([healthy], 1000)["verdict"] == "inconclusive"
    # a spread over seeds this wide makes the same means undecidable
    wide = _row(2, [0.3, 0.9, 0.6], SYNC, [0.5, 0.95, 0.9])
    assert renorm_verdict([wide], 1000)["verdict"] == "inconclusive"


def test_the_console_says_why_the_renorm_verdict_reads_as_it_does():
    from batchnorm_demo.report.sync import renorm_why

    partly = _row(2, HURT, SYNC, [0.80, 0.81, 0.805])
    healthy = _row(8, SYNC, SYNC, SYNC)
    lines = renorm_why(renorm_verdict([partly, healthy], 1000)).splitlines()
    assert lines[0].startswith("supported only if, at every per-rank batch where local BN")
    assert len(lines) == 2  # batch 8 is not hurt: nothing to say about it
    assert lines[1].startswith("  per-rank batch 2: partly fixed: BatchRenorm +")
    assert "points vs local BN (noise " in lines[1] and "vs SyncBN (noise " in lines[1]
    fixed = renorm_why(renorm_verdict([_row(2, HURT, SYNC, [0.91, 0.912, 0.911])], 1000))
    assert "per-rank batch 2: fixed: " in fixed
    assert "nothing to fix" in renorm_why(renorm_verdict([healthy], 1000))


def test_print_fatal_once_across_ranks(monkeypatch):
    # the launcher's environment decides (another test may have initialized MPI in-process)
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    for rank, err, printed in [
        ("0", DistributedError("same everywhere"), True),
        ("1", DistributedError("same everywhere"), False),
        ("1", OSError("only here"), True),
    ]:
        monkeypatch.setenv("PMI_RANK", rank)
        monkeypatch.setenv("PMI_SIZE", "2")
        out = io.StringIO()
        assert _ranks.print_fatal("sync-demo", err, out) is printed
        lines = [line for line in out.getvalue().splitlines() if line]
        assert len(lines) == int(printed)
        if printed:
            assert lines[0].startswith("batchnorm sync-demo") and str(err) in lines[0]
            assert ("(rank 1 of 2)" in lines[0]) == (rank == "1")


@needs_mpi
@pytest.mark.mpi
def test_a_fatal_error_under_mpiexec_is_printed_once_on_its_own_line(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    res = mpirun(2, "-m", "batchnorm", "sync-demo", "--out", str(not_a_folder), timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    hits = [line for line in lines if "error:" in line]
    assert len(hits) == 1, res.stderr
    assert hits[0].startswith("batchnorm sync-demo: error: ") and hits[0].count("error:") == 1
    assert str(not_a_folder) in hits[0]
    assert not any(tmp_path.glob("*/results.json"))
