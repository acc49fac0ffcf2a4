"""A reducer's timeout is a deadline for the whole synchronized call (it applied to each
wait, so one call could take about twice the timeout), and an abort on a reducer's first
calls names the likely cause: a rank still compiling the numba kernels."""

from __future__ import annotations

import pytest
from test_distributed import SCENARIOS, _ok, mpirun, needs_mpi


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_the_timeout_is_a_deadline_for_the_whole_call(n):
    res = mpirun(n, str(SCENARIOS / "deadline.py"), "2.8", timeout=60)
    text = res.stdout + res.stderr
    assert res.returncode != 0, text
    assert "timeout=4 s reached: aborting the job" in text
    assert "rank 0 completed" not in text
    # the first call of the reducer: the message names the likely cause
    assert "still compiling the numba kernels" in text


@needs_mpi
@pytest.mark.mpi
def test_a_call_within_the_deadline_completes():
    res = mpirun(2, str(SCENARIOS / "deadline.py"), "1.0", timeout=60)
    _ok(res)
    assert "rank 0 completed" in res.stdout and "rank 1 completed" in res.stdout


@needs_mpi
@pytest.mark.mpi
def test_a_partner_compiling_on_its_first_call_is_named_as_the_likely_cause(tmp_path):
    res = mpirun(2, str(SCENARIOS / "compiling.py"), str(tmp_path), timeout=120)
    text = res.stdout + res.stderr
    assert res.returncode != 0, text
    assert "rank 1 has not arrived" in text
    assert "synchronized call 1 " in text or "synchronized call 2 " in text
    assert "still compiling the numba kernels" in text
    assert "rank 0 was not stopped" not in text
