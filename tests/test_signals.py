"""Ctrl-C and SIGTERM stop ``batchnorm demo`` within seconds, its worker processes included.

Each test starts the real command in its own process group, waits until both worker
processes are up and training, sends the signal, and checks the exit status, the time it
took, the one line on stderr, that no worker is left and that no output file was written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_stop import with_default_signals  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(
        not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"),
        reason="needs POSIX process groups and /proc",
    ),
]

# the whole command must be gone this long after the signal
STOP_WITHIN_S = 10.0


def _state(pid: int) -> str | None:
    """The process state letter (R, S, Z, ...) or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _workers(pid: int) -> list[int]:
    """The multiprocessing worker processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if _state(p) not in (None, "Z")]


def _start_demo(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "TMPDIR": str(scratch),
        "MPLBACKEND": "Agg",
    }
    # 400 steps: about half a minute of work on 2 cores, far longer than the stop may take
    cmd = [sys.executable, "-m", "batchnorm", "demo", "--out", str(out), "--quiet"]
    cmd += ["--steps", "400", "--workers", "2"]
    # SIGINT and SIGTERM at their defaults, as in a terminal (a job that a script put in the
    # background inherits SIGINT ignored, and the demo keeps an ignored signal ignored)
    proc = subprocess.Popen(
        with_default_signals(cmd),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a job
    )
    return proc, out


def _wait_for_workers(proc: subprocess.Popen, n: int = 2, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the demo ended before starting its workers: {proc.communicate()[1]}")
        found = _workers(proc.pid)
        if len(found) >= n:
            return found
        time.sleep(0.05)
    pytest.fail("the demo did not start its worker processes")


def _clean_up(proc: subprocess.Popen, workers: list[int], group: bool) -> None:
    """Kill what a failed test left running (the demo, its group, its workers)."""
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    for pid in _alive(workers):
        os.kill(pid, signal.SIGKILL)
    proc.communicate()  # closes the pipes (a no-op once communicate has run)


def _stop_test(tmp_path: Path, signum: int, to_group: bool, status: int, delay: float):
    proc, out = _start_demo(tmp_path)
    workers: list[int] = []
    try:
        workers = _wait_for_workers(proc)
        time.sleep(delay)  # 0: the workers are still starting; else they are training
        assert _alive(workers) == workers, "a worker died before the signal"
        sent = time.monotonic()
        if to_group:
            os.killpg(proc.pid, signum)  # what Ctrl-C in a terminal does
        else:
            os.kill(proc.pid, signum)  # what `kill PID` does: the main process only
        try:
            _, err = proc.communicate(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_WITHIN_S:.0f} s after the signal")
        took = time.monotonic() - sent
        deadline = time.monotonic() + 2
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(workers) == [], "worker processes were left running"
        assert proc.returncode == status, err
        assert took < STOP_WITHIN_S
        lines = [line for line in err.splitlines() if "stopped" in line]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"batchnorm demo: stopped by {signal.Signals(signum).name}")
        assert "Traceback" not in err, err
        assert not out.exists() or list(out.iterdir()) == []  # nothing half-written
        assert list((tmp_path / "tmp").glob("batchnorm-demo-*")) == []  # the workers' data
    finally:
        _clean_up(proc, workers, group=True)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 2.0], ids=["starting", "training"])
def test_ctrl_c_stops_the_demo_and_its_workers(tmp_path, delay):
    _stop_test(tmp_path, signal.SIGINT, to_group=True, status=130, delay=delay)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 2.0], ids=["starting", "training"])
def test_sigterm_to_the_main_process_stops_its_workers_too(tmp_path, delay):
    _stop_test(tmp_path, signal.SIGTERM, to_group=False, status=143, delay=delay)


@pytest.mark.slow
def test_workers_leave_when_the_main_process_is_killed(tmp_path):
    """SIGKILL cannot be handled: the orphaned workers notice and exit by themselves."""
    proc, _ = _start_demo(tmp_path)
    workers: list[int] = []
    try:
        workers = _wait_for_workers(proc)
        time.sleep(1.0)
        proc.kill()
        proc.wait()  # not communicate(): orphaned workers would hold its pipes open
        deadline = time.monotonic() + 5
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(workers) == []
    finally:
        _clean_up(proc, workers, group=False)


def test_an_interrupted_report_leaves_the_old_files_and_no_partial_ones(tmp_path, monkeypatch):
    """Outputs are written to a scratch folder and moved into place only at the end."""
    from batchnorm_demo.report import write as report

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("old")

    def draw_then_interrupt(results, summary, folder):
        (folder / "learning_rates.png").write_bytes(b"half a figure")
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_figures", draw_then_interrupt)
    monkeypatch.setattr(report, "summarize", lambda results: {})
    with pytest.raises(KeyboardInterrupt):
        report.write_report({"config": {}}, out)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == "old"
