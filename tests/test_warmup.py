"""``batchnorm warmup`` and the one-line notice printed when the numba kernels compile."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from batchnorm_demo import warmup as wu
from batchnorm_demo.cli import main

ROOT = Path(__file__).resolve().parents[1]
numba = pytest.importorskip("numba")


def _fresh_kernel():
    """A numba function never compiled before (a new function object each call)."""
    return numba.njit(lambda a: a + 1.0)


def test_watch_compiles_calls_back_once_at_the_first_compilation():
    seen = []
    with wu.watch_compiles(lambda: seen.append(1)) as counter:
        f = _fresh_kernel()
        f(1.0)
        assert seen == [1] and counter.count >= 1
        f(2.0)  # compiled already: no new event
        g = _fresh_kernel()
        g(1.0)
        assert seen == [1] and counter.count >= 2  # called once only
    _fresh_kernel()(1.0)  # outside the block: not watched
    assert seen == [1]


@pytest.mark.slow
def test_a_load_from_numba_s_disk_cache_is_not_announced(tmp_path):
    """The notice means compiling: a kernel loaded from the on-disk cache says nothing."""
    (tmp_path / "cached_kernel.py").write_text(
        "import numba\n\n@numba.njit(cache=True)\ndef twice(a):\n    return 2.0 * a\n"
    )
    script = textwrap.dedent(
        """
        import cached_kernel
        from batchnorm_demo.warmup import watch_compiles
        with watch_compiles(lambda: print("compiling")) as counter:
            cached_kernel.twice(1.5)
        print("compilations", counter.count)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])}
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "cache")
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0] == ["compiling", "compilations", "1"]
    assert runs[1] == ["compilations", "0"]


def test_warmup_covers_every_dtype_and_layout_on_both_sides_of_the_threshold():
    from batchnorm.backends import AUTO_NUMBA_MIN_SIZE

    cases = wu.warmup_cases()
    small = [c for c in cases if c.size < AUTO_NUMBA_MIN_SIZE]
    large = [c for c in cases if c.size >= AUTO_NUMBA_MIN_SIZE]
    layouts = {"NCHW", "(N, D)", "NHWC"}
    assert layouts <= {c.layout for c in small} and layouts <= {c.layout for c in large}
    assert {c.axis for c in cases} == {1, -1}
    assert wu.DTYPES == ("float16", "float32", "float64")


def test_the_warmup_command_announces_compiling_and_says_how_long(monkeypatch, capsys):
    def fake_warmup(dtypes, cases, progress=None):
        printed_before = capsys.readouterr()
        _fresh_kernel()(1.0)  # a real compilation: the notice must appear now
        assert wu.COMPILE_NOTICE not in printed_before.err
        assert wu.COMPILE_NOTICE in capsys.readouterr().err
        return {"seconds": 12.34, "calls": 3, "compiled": 2, "cases": []}

    monkeypatch.setattr(wu, "warmup", fake_warmup)
    assert main(["warmup", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "compiled the numba kernels in 12.3 s" in out


def test_the_warmup_command_says_when_everything_was_cached(monkeypatch, capsys):
    monkeypatch.setattr(
        wu, "warmup", lambda *a, **k: {"seconds": 0.5, "calls": 3, "compiled": 0, "cases": []}
    )
    assert main(["warmup", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "already cached" in captured.out and "0.5 s" in captured.out
    assert wu.COMPILE_NOTICE not in captured.err


@pytest.mark.slow
def test_warmup_compiles_every_kernel_so_that_a_new_process_compiles_nothing():
    """The real warmup, then a fresh ``batchnorm warmup``: everything comes from the cache."""
    result = wu.warmup()
    assert result["calls"] == 3 * 2 * len(wu.DTYPES) * len(wu.warmup_cases())
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    again = subprocess.run(
        [sys.executable, "-m", "batchnorm", "warmup", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "every kernel was already cached" in again.stdout, again.stdout
    assert wu.COMPILE_NOTICE not in again.stderr


@pytest.mark.slow
def _compile_in_child(queue):
    """A worker-like process: announce compilations on ``queue``, then compile a kernel."""
    import batchnorm as bn
    from batchnorm_demo.warmup import announce_compiles

    announce_compiles(lambda: queue.put("compiling"))
    x = np.random.default_rng(0).standard_normal((64, 3, 5, 5)).astype(np.float32)
    bn.batch_norm_train(x, None, None, axis=1, backend="numba")
    queue.put("done")


def test_worker_processes_announce_compiling(tmp_path, monkeypatch):
    """With an empty numba cache a spawned process (as the demo's workers are) reports that
    it compiles through the hook the workers install (:func:`runner._worker_init`); the
    demo's batched training itself runs on the NumPy backend for its small arrays."""
    import multiprocessing as mp

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "empty-cache"))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_compile_in_child, args=(q,))
    p.start()
    got = [q.get(timeout=600), q.get(timeout=600)]
    p.join(timeout=60)
    assert got == ["compiling", "done"] and p.exitcode == 0
