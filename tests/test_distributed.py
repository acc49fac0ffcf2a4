"""Synchronized batch norm under real MPI: pytest launches ``mpiexec -n R`` on the scenario
scripts in tests/mpi/ and checks their results against a single-process reference.

Every launch is bounded by a timeout (the whole process group is killed), so nothing can
hang the test run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import distributed
from batchnorm.nn import SGD, Linear, Sequential
from batchnorm_demo.experiments.sync import SyncConfig, build_model, train_step

HERE = Path(__file__).parent
SCENARIOS = HERE / "mpi"
SRC = HERE.parent / "src"


def _mpiexec() -> str | None:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def _have_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return _mpiexec() is not None


needs_mpi = pytest.mark.skipif(not _have_mpi(), reason="mpi4py / mpiexec not installed")


def mpirun(n: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``mpiexec -n n python args...`` with PYTHONPATH passed through, killed after timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    cmd = [_mpiexec(), "-n", str(n), sys.executable, *args]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} did not finish within {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"{res.args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"


def scenario_ranks(n: int, script: str, out) -> list:
    """Run ``tests/mpi/<script>`` on ``n`` ranks (it must succeed) writing into ``out``; each
    rank's ``rank<r>.json`` record, in rank order."""
    _ok(mpirun(n, str(SCENARIOS / script), str(out)))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


# --------------------------------------------------------------------------- equalities
SPLITS = [(1, "9"), (2, "7,10"), (3, "0,9,8"), (4, "5,0,11,1")]


def _ulps(a, b) -> float:
    """Largest difference in units of the last place of the reference ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.spacing(np.maximum(np.abs(b), 1e-300))))


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize(("n", "sizes"), SPLITS, ids=[s for _, s in SPLITS])
def test_synchronized_equals_single_process(tmp_path, n, sizes):
    _ok(mpirun(n, str(SCENARIOS / "equality.py"), str(tmp_path), sizes))
    inp = np.load(tmp_path / "inputs.npz")
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n)]
    x, bounds, total = inp["x"], inp["bounds"], int(inp["bounds"][-1])

    # bit-identical on every rank
    shared = ["mean", "var", "mean32", "var32", "dgamma", "dbeta", "recal_mean", "recal_var"]
    shared += [
        f"layer{i}_{k}" for i in (0, 1) for k in ("running_mean", "running_var", "dgamma", "dbeta")
    ]
    for key in shared:
        for r in range(1, n):
            assert ranks[r][key].tobytes() == ranks[0][key].tobytes(), (key, r)

    # statistics: those of the concatenated batch, to a few ulps (both of the single-process
    # NumPy path and of an extended-precision reference)
    mean, var = bn.moments(x, backend="numpy")
    assert _ulps(ranks[0]["mean"], mean) <= 8
    assert _ulps(ranks[0]["var"], var) <= 8
    xl = x.astype(np.longdouble)
    assert _ulps(ranks[0]["mean"], xl.mean(0).astype(np.float64)) <= 4
    assert _ulps(ranks[0]["var"], xl.var(0).astype(np.float64)) <= 4
    # float32 at mean 1e6, std 1: within 1e-6 of float64 statistics of the same numbers
    m64, v64 = bn.moments(inp["x32"].astype(np.float64))
    assert np.max(np.abs(ranks[0]["mean32"] - m64)) < 1e-6
    assert np.max(np.abs(ranks[0]["var32"] - v64)) < 1e-6

    # each rank's y and dx are its slice of the single-process ones; dgamma/dbeta global
    y, cache = bn.batch_norm_train(x, inp["gamma"], inp["beta"])
    dx, dgamma, dbeta = bn.batch_norm_backward(inp["dy"], cache)
    for r in range(n):
        lo, hi = bounds[r], bounds[r + 1]
        assert ranks[r]["cache_count"] == total
        np.testing.assert_allclose(ranks[r]["y"], y[lo:hi], rtol=0, atol=1e-13)
        np.testing.assert_allclose(ranks[r]["dx"], dx[lo:hi], rtol=0, atol=1e-13)
    np.testing.assert_allclose(ranks[0]["dgamma"], dgamma, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ranks[0]["dbeta"], dbeta, rtol=1e-13, atol=1e-13)

    # layers over 40 steps: running statistics of a single-process layer (global count in
    # the unbiased correction); last step's y/dx slices and gradients
    layers = (
        bn.BatchNorm(5, convention="torch"),
        bn.BatchRenorm(5, rmax=1.5, dmax=0.5, momentum=0.9),
    )
    for xs, dys in zip(inp["xs"], inp["dys"], strict=True):
        outs = []
        for lay in layers:
            outs.append((lay.forward(xs), lay.backward(dys)))
    for i, lay in enumerate(layers):
        got = ranks[0]
        np.testing.assert_allclose(got[f"layer{i}_running_mean"], lay.running_mean, atol=1e-12)
        np.testing.assert_allclose(got[f"layer{i}_running_var"], lay.running_var, atol=1e-12)
        np.testing.assert_allclose(got[f"layer{i}_dgamma"], lay.dgamma, atol=1e-12)
        np.testing.assert_allclose(got[f"layer{i}_dbeta"], lay.dbeta, atol=1e-12)
        assert got[f"layer{i}_tracked"] == lay.num_batches_tracked == 40
        assert got[f"layer{i}_count"] == total
        for r in range(n):
            lo, hi = bounds[r], bounds[r + 1]
            np.testing.assert_allclose(ranks[r][f"layer{i}_y"], outs[i][0][lo:hi], atol=1e-12)
            np.testing.assert_allclose(ranks[r][f"layer{i}_dx"], outs[i][1][lo:hi], atol=1e-12)

    # evaluation mode: every rank normalizes its slice with the (shared) running statistics
    y_eval = layers[0].eval().forward(x)
    for r in range(n):
        lo, hi = bounds[r], bounds[r + 1]
        np.testing.assert_allclose(ranks[r]["eval_y"], y_eval[lo:hi], atol=1e-12)
        assert ranks[r]["eval_y"].tobytes() == ranks[r]["eval_y_local"].tobytes()

    # recalibration over a data set sharded across ranks = over the whole data set
    pieces = np.split(inp["recal"], np.cumsum(inp["recal_sizes"])[:-1])
    ref = bn.BatchNorm(5)
    bn.recalibrate(ref, pieces)
    np.testing.assert_allclose(ranks[0]["recal_mean"], ref.running_mean, atol=1e-13)
    np.testing.assert_allclose(ranks[0]["recal_var"], ref.running_var, atol=1e-13)

    # no rank holds a sample: nonfinite="skip" skips the update on every rank
    for r in range(n):
        assert ranks[r]["skip_skipped"] == 1 and ranks[r]["skip_tracked"] == 0


# --------------------------------------------------------------------------- errors
@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_errors_raise_on_every_rank_and_change_nothing(tmp_path, n):
    res = scenario_ranks(n, "errors.py", tmp_path)
    bad = n - 1
    expected = {
        "wrong_features": ("DistributedError", ["layer was built for num_features=(4,)"]),
        "integer_dtype": ("DistributedError", ["int64"]),
        "nan_statistics": ("NonFiniteStatisticsError", ["non-finite local statistics"]),
        "eval_mode": ("DistributedError", ["evaluation forward", "training forward"]),
        "update_mismatch": ("DistributedError", ["update_stats=False"]),
        "global_count_one": ("DistributedError", ["at least 2 values per feature"]),
        "global_count_zero": ("DistributedError", ["at least 2 values per feature"]),
        "backward_shape": ("DistributedError", ["dy has shape (2, 4)"]),
        "renorm_bad_limits": ("DistributedError", ["rmax must be finite and >= 1"]),
        "functional_features": ("DistributedError", ["6 features"]),
        "gradients_missing": ("DistributedError", ["run backward() first"]),
        "recalibrate_bad_batch": ("DistributedError", ["recalibrate failed", "(5,) features"]),
    }
    for case, (kind, words) in expected.items():
        outcomes = [r[case] for r in res]
        for o in outcomes:
            assert o["raised"] == kind, (case, o)
            assert o["is_value_error"], case
            assert o["state_unchanged"], case
            assert o["message"] == outcomes[0]["message"], (case, "messages differ")
            for w in words:
                assert w in o["message"], (case, w, o["message"])
        if case != "global_count_zero":
            who = f"rank {bad}" if case != "global_count_one" else "[1, 0"
            assert who in outcomes[0]["message"], (case, outcomes[0]["message"])
    for case in ("nan_statistics_skip", "global_count_zero_skip"):
        for r in res:
            assert r[case]["raised"] is None and r[case]["skipped_updates"] == 1, case
            assert r[case]["state_unchanged"], case
    # the ranks are still in step afterwards: x on rank r is (r + 1) * arange
    base = np.arange(12.0).reshape(3, 4)
    want = np.concatenate([(r + 1) * base for r in range(n)]).mean(axis=0)
    for r in res:
        assert r["after"]["count"] == 3 * n
        np.testing.assert_allclose(r["after"]["mean"], want, rtol=1e-14)


@needs_mpi
@pytest.mark.mpi
def test_a_missing_rank_is_reported_and_the_job_aborted():
    start = time.monotonic()
    res = mpirun(3, str(SCENARIOS / "stall.py"), timeout=60)
    elapsed = time.monotonic() - start
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert elapsed < 20, elapsed
    assert "rank 2 has not arrived" in text
    assert "synchronized call 3" in text
    assert "timeout=2 s reached: aborting the job" in text
    assert "compiling" not in text  # call 3: the first-call hint is not given
    assert "still waiting" in text  # the periodic stall report came first
    assert "rank 0 was not stopped" not in text and "rank 1 was not stopped" not in text


# --------------------------------------------------------------------------- training
@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("n", [3, 4])
def test_data_parallel_training_follows_one_process(tmp_path, n):
    steps = 200
    _ok(mpirun(n, str(SCENARIOS / "train.py"), str(tmp_path), str(steps)))
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n)]
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(400, 12)), rng.integers(0, 3, 400)
    config = SyncConfig(
        global_batch=26, hidden=(16, 8), init_std=0.5, lr=0.3, per_rank_batches=(2,)
    )
    model = build_model(12, 3, config, seed=0)  # rank 0's initial weights, broadcast
    opt = SGD(model, config.lr, momentum=0.5)
    order = np.random.default_rng(6)
    for _ in range(steps):
        idx = order.choice(400, 26, replace=False)
        train_step(model, opt, x[idx], y[idx], None)
    worst = 0.0
    for k, v in model.parameters().items():
        key = k.replace(".", "_")
        for r in range(1, n):
            assert ranks[r][key].tobytes() == ranks[0][key].tobytes(), (k, r)
        worst = max(worst, float(np.max(np.abs(ranks[0][key] - v))))
    assert worst < 1e-10, worst
    running = np.concatenate(
        [
            np.concatenate([m.running_mean, m.running_var])
            for m in model.modules
            if hasattr(m, "running_mean")
        ]
    )
    np.testing.assert_allclose(ranks[0]["running"], running, atol=1e-10)
    rows = [distributed.shard_bounds(26, n, r) for r in range(n)]
    np.testing.assert_array_equal(
        ranks[0]["metrics"], [[r, hi - lo] for r, (lo, hi) in enumerate(rows)]
    )


@needs_mpi
@pytest.mark.mpi
def test_sync_demo_under_mpiexec(tmp_path):
    res = mpirun(
        2,
        "-m",
        "batchnorm",
        "sync-demo",
        "--out",
        str(tmp_path),
        "--steps",
        "20",
        "--seeds",
        "1",
        "--quiet",
        timeout=300,
    )
    _ok(res)
    for name in (
        "results.json",
        "report.md",
        "report.html",
        "equivalence.png",
        "small_batches.png",
    ):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ranks"] == 2
    eq = results["equivalence"]
    assert eq["sync"]["final_max_param_diff"] < 1e-10
    assert eq["sync"]["max_param_diff_between_ranks"] == 0.0
    assert eq["local"]["final_max_param_diff"] < 1e-10
    assert eq["local"]["max_running_diff_mean_over_ranks"] < 1e-10
    assert [r["per_rank_batch"] for r in results["small_batches"]["rows"]] == [2, 4, 8, 15, 30, 60]
    cost = results["cost"]
    # synchronized BN layers send their statistics but leave the gradient sum
    assert cost["sync"]["bytes_per_step_per_rank"][0] > 0
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    assert "SyncBN" in res.stdout
    # the local BatchRenorm arm: its emulation equals real per-rank renorm, its results, the
    # verdict, the real rank split and the spread over seeds in the report
    assert eq["renorm"]["final_max_param_diff"] < 1e-10
    assert eq["renorm"]["max_running_diff_per_rank"] < 1e-10
    assert eq["renorm"]["max_running_spread_between_ranks"] > 1e-6  # the ranks' own statistics
    rows = {r["per_rank_batch"]: r for r in results["small_batches"]["rows"]}
    assert [b for b, r in rows.items() if "renorm_test_accuracy" in r] == [2, 4, 8]
    assert all(0 <= a <= 1 for b in (2, 4, 8) for a in rows[b]["renorm_test_accuracy"])
    assert rows[8]["rank_batches"] == [8] * 7 + [4] and rows[8]["ranks_emulated"] == 8
    verdict = results["small_batches"]["renorm_verdict"]
    assert verdict["verdict"] in ("supported", "not supported", "inconclusive")
    assert [p["per_rank_batch"] for p in verdict["per_batch"]] == [2, 4, 8]
    assert results["summary"]["renorm_fixes_tiny_local_batches"] == verdict["verdict"]
    md = (tmp_path / "report.md").read_text()
    assert f"without communication? {verdict['verdict']}." in md
    assert "| 8 | 8 (7 × 8 + 1 × 4) |" in md and "| 7.5 |" not in md
    assert "±" in md
    assert "BatchRenorm" in res.stdout


# --------------------------------------------------------------------------- no MPI needed
def test_shard_bounds_cover_the_batch_in_order():
    for n in (0, 1, 7, 26, 60):
        for size in (1, 2, 3, 4, 7):
            b = [distributed.shard_bounds(n, size, r) for r in range(size)]
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(b[i][1] == b[i + 1][0] for i in range(size - 1))
            lens = [hi - lo for lo, hi in b]
            assert max(lens) - min(lens) <= 1 and lens == sorted(lens, reverse=True)
    with pytest.raises(ValueError, match="cannot split"):
        distributed.shard_bounds(5, 2, 2)


def test_comm_is_checked_and_set_by_convert_sync():
    class FakeComm:  # has the methods a communicator has; never used for communication
        def Get_rank(self):  # noqa: N802
            return 0

        def Get_size(self):  # noqa: N802
            return 1

        Iallgather = Isend = None

    rng = np.random.default_rng(0)
    model = Sequential(
        Linear(3, 4, rng=rng),
        bn.BatchNorm(4),
        Linear(4, 4, rng=rng),
        bn.BatchRenorm(4),
        bn.FrozenBatchNorm(4),
    )
    comm = FakeComm()
    distributed.convert_sync(model, comm, timeout=5)
    assert model.modules[1].comm is comm and model.modules[3].comm is comm
    assert model.modules[1].timeout == 5.0
    with distributed.unsynchronized(model):
        assert model.modules[1].comm is None and model.modules[3].comm is None
    assert model.modules[1].comm is comm
    distributed.convert_sync(model, None)
    assert model.modules[1].comm is None
    with pytest.raises(TypeError, match="communicator"):
        bn.BatchNorm(4, comm="world")
    with pytest.raises(ValueError, match="cannot synchronize"):
        bn.GhostBatchNorm(4, virtual_batch_size=2, comm=comm)
    with pytest.raises(ValueError, match="timeout"):
        bn.BatchNorm(4, timeout=0)


def test_without_comm_nothing_changes(rng):
    x = rng.normal(size=(10, 3))
    y, cache = bn.batch_norm_train(x, None, None)
    assert not cache.synchronized and cache.count == 10  # the cache never holds a communicator
    layer = bn.BatchNorm(3)
    assert layer.comm is None and layer.timeout is None
    np.testing.assert_array_equal(layer.forward(x), y)


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 3])
def test_synchronized_torch_tensors_equal_one_process(tmp_path, n):
    torch = pytest.importorskip("torch")
    _ok(mpirun(n, str(SCENARIOS / "torch_sync.py"), str(tmp_path)))
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (11, 4, 3))
    dy = rng.normal(size=x.shape)
    y, cache = bn.batch_norm_train(x, None, None)
    dx, _, _ = bn.batch_norm_backward(dy, cache)
    ref = bn.BatchNorm(4)
    for _ in range(2):
        ref.forward(x)
        ref.backward(dy)
    assert torch is not None
    for r in range(n):
        got = np.load(tmp_path / f"rank{r}.npz")
        lo, hi = int(got["lo"]), int(got["hi"])
        np.testing.assert_allclose(got["y"], y[lo:hi], rtol=0, atol=1e-13)
        np.testing.assert_allclose(got["dx"], dx[lo:hi], rtol=0, atol=1e-13)
        np.testing.assert_allclose(got["layer_dx"], dx[lo:hi], rtol=0, atol=1e-13)
        np.testing.assert_allclose(got["running_mean"], ref.running_mean, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(got["running_var"], ref.running_var, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(got["dgamma"], ref.dgamma, rtol=1e-12, atol=1e-12)


@needs_mpi
@pytest.mark.mpi
def test_different_layers_or_arguments_across_ranks_are_refused_everywhere(tmp_path):
    ranks = scenario_ranks(2, "split_brain.py", tmp_path)
    for r in ranks:
        assert r["order"]["error"] == "DistributedError", r["order"]
        assert "different layers" in r["order"]["message"]
        for case in ("momentum", "eps"):
            assert r[case]["error"] == "DistributedError", r[case]
            assert "different arguments" in r[case]["message"]
            assert r[case]["unchanged"]
        assert r["agreeing"]["error"] is None  # the ranks are still in step afterwards


@needs_mpi
@pytest.mark.mpi
def test_helpers_refuse_a_bad_argument_on_one_rank_on_every_rank(tmp_path):
    ranks = scenario_ranks(2, "helpers.py", tmp_path)
    cases = [k for k in ranks[0] if k != "in_step"]
    for r in ranks:
        for case in cases:
            assert r[case]["error"] == "DistributedError", (case, r[case])
        assert r["in_step"]["error"] is None
    assert "not a rank" in ranks[0]["metrics_root"]["message"]
    assert "local_count must be >= 0" in ranks[0]["weight_negative"]["message"]
    assert "method must be" in ranks[0]["recal_method"]["message"]


def test_comm_null_and_bad_timeouts_are_refused_and_convert_sync_is_all_or_nothing():
    MPI = pytest.importorskip("mpi4py.MPI")
    with pytest.raises(ValueError, match="COMM_NULL"):
        bn.BatchNorm(3, comm=MPI.COMM_NULL)
    with pytest.raises(ValueError, match="COMM_NULL"):
        bn.moments(np.ones((4, 3)), comm=MPI.COMM_NULL)
    model = Sequential(bn.BatchNorm(3), bn.GhostBatchNorm(3, virtual_batch_size=2))
    with pytest.raises(ValueError, match="nothing was changed"):
        distributed.convert_sync(model, MPI.COMM_WORLD)
    assert all(m.comm is None for m in model.modules)
    model = Sequential(bn.BatchNorm(3), bn.BatchNorm(3))
    for bad in (-1, 0, float("nan"), float("inf"), "5", True):
        with pytest.raises((TypeError, ValueError)):
            distributed.convert_sync(model, MPI.COMM_WORLD, timeout=bad)
        assert all(m.comm is None for m in model.modules)
