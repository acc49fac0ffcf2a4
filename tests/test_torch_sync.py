"""batchnorm.torch.SyncBatchNorm with real torch.distributed (gloo) processes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("torch_dist_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def _run(scenario: str, tmp_path, world: int = 3) -> tuple[list[dict], list[str]]:
    init = tmp_path / "init"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(r), str(world), str(init), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=180)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        assert "crashed" not in res, f"rank {r}:\n{res['crashed']}\n{errs[r]}"
    return results, errs


@pytest.mark.slow
def test_exact_against_one_process_with_uneven_and_empty_batches(tmp_path):
    results, _ = _run("exact", tmp_path)
    for res in results:
        for key in ("y", "dx", "dw", "rm", "rv"):
            assert res[key] < 1e-12, (key, res)
    assert results[0]["running_mean"] == results[1]["running_mean"] == results[2]["running_mean"]


@pytest.mark.slow
def test_training_under_ddp_matches_one_process(tmp_path):
    results, _ = _run("ddp", tmp_path)
    for res in results:
        assert res["max_err"] < 1e-10, res


@pytest.mark.slow
def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    results, _ = _run("error", tmp_path)
    for res in results:
        assert res["raised"] == "DistributedError", res
        assert "rank 1" in res["message"] and "num_features=4" in res["message"]
        assert res["unchanged"]


@pytest.mark.slow
def test_a_missing_rank_is_reported_and_times_out(tmp_path):
    results, errs = _run("timeout", tmp_path)
    assert results[2] == {"skipped": True}
    for r in (0, 1):
        assert results[r]["raised"] == "SyncTimeoutError", results[r]
        assert "rank 2 has not arrived" in errs[r], errs[r]
        assert "timeout=2 s reached" in errs[r]


@pytest.mark.slow
def test_evaluation_is_local_and_never_waits(tmp_path):
    """torch's SyncBatchNorm never synchronizes in eval (batch statistics of this rank's
    batch when there are no running statistics); neither does ours (a wait would hang the
    ranks past the harness's timeout)."""
    results, _ = _run("eval_local", tmp_path)
    for track in (False, True):
        assert results[0][f"err_{track}"] < 1e-12, results[0]
