"""The library's one line on stderr before numba compiles (batchnorm.backends.compile_notice):
said once per process when a compilation really happens, never when the cache is warm."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchnorm.backends import compile_notice

ROOT = Path(__file__).resolve().parents[1]
numba = pytest.importorskip("numba")

# a NumPy training step and backward (the README's first example), then a PyTorch module's
# forward and backward when torch is importable; markers on stderr around the first call
SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import batchnorm as bn
    x = np.random.default_rng(0).standard_normal((32, 64, 8, 8)).astype(np.float32)
    layer = bn.BatchNorm(64)
    print("before", file=sys.stderr, flush=True)
    layer(x)
    print("after", file=sys.stderr, flush=True)
    layer.backward(x)
    if "torch" in sys.argv[1:]:
        import torch
        import batchnorm.torch as bt
        m = bt.BatchNorm1d(256)
        t = torch.randn(64, 256, dtype=torch.float64, requires_grad=True)
        m(t).sum().backward()
    print("done", file=sys.stderr, flush=True)
    """
)


def _run(cache: Path, *extra: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NUMBA_CACHE_DIR": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *extra],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.slow
def test_an_empty_cache_is_announced_once_at_the_first_call_and_a_warm_one_never(tmp_path):
    extra = ("torch",) if _has("torch") else ()
    cold = _run(tmp_path / "cache", *extra)
    # the line comes at the first call, before its wait, and only once in the process
    # although the backward, the other dtypes and the torch module compile more kernels
    assert cold == ["before", compile_notice.NOTICE, "after", "done"], cold
    warm = _run(tmp_path / "cache", *extra)  # the same cache, now filled: not a word
    assert warm == ["before", "after", "done"], warm


@pytest.mark.slow
def test_a_torch_module_s_first_call_is_announced(tmp_path):
    pytest.importorskip("torch")
    script = textwrap.dedent(
        """
        import sys
        import torch
        import batchnorm.torch as bt
        m = bt.BatchNorm2d(8)
        t = torch.randn(4, 8, 6, 6, requires_grad=True)
        print("before", file=sys.stderr, flush=True)
        m(t).sum().backward()
        print("done", file=sys.stderr, flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "cache")
    err = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stderr.split("\n")
    assert [e for e in err if e] == ["before", compile_notice.NOTICE, "done"]


def _has(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def test_the_notice_says_what_how_long_that_it_is_cached_and_how_to_do_it_ahead():
    text = compile_notice.NOTICE
    assert "\n" not in text and text.startswith("batchnorm: compiling the numba kernels")
    assert " s " in text and "cached" in text and "`batchnorm warmup`" in text


def test_the_first_compilation_calls_the_handler_once_per_process(monkeypatch):
    """In this process: a fresh state, a real compilation, then another one (not said)."""
    monkeypatch.setattr(compile_notice, "_STATE", compile_notice._State())
    assert compile_notice.install()  # registers a second listener on the fresh state
    seen = []
    previous = compile_notice.set_handler(lambda: seen.append(1))
    try:
        assert not compile_notice.shown()
        numba.njit(lambda a: a + 1.0)(1.0)
        assert seen == [1] and compile_notice.shown()
        numba.njit(lambda a: a * 3.0)(1.0)
        assert seen == [1]
    finally:
        compile_notice.set_handler(previous)


def test_the_default_handler_prints_the_line_on_stderr(capsys):
    compile_notice._print()
    assert capsys.readouterr().err == compile_notice.NOTICE + "\n"


def test_a_handler_that_is_not_callable_is_refused_and_the_old_one_kept():
    before = compile_notice.set_handler(None)
    with pytest.raises(TypeError, match="handler must be callable or None; got int"):
        compile_notice.set_handler(3)
    assert compile_notice.set_handler(before) is compile_notice._print
