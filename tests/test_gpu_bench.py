"""Smoke test of ``benchmarks/gpu.py`` on the CPU (``--device cpu --quick``): no GPU needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu():
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
    assert "| case | dtype | pass | ours ms | copy ms |" in res.stdout
    assert "numerics at mean 1e6, std 1, float32 (4096, 64): max |y - y_ref| ours" in res.stdout
    assert "statistics dtype (cache.mean.dtype): torch.float64" in res.stdout
