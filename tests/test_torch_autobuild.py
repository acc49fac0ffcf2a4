"""The native node's background build (batchnorm.adapters.torch._autobuild): by default the
first eligible call without a built extension starts one detached build and returns at
once on the Python route; later calls pick the extension up; one build at a time across
processes (the lock, taken over when stale); a failed build is not retried.

Most tests replace the build's command line by a fake build (a small script: no compiler,
no torch), which waits for a file the test writes, then writes the extension's file and
releases the lock, or fails, or never ends. One test (marked slow) really compiles in the
background into a temporary cache directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from _native import built_extension  # noqa: E402, F401

import batchnorm.torch as bt  # noqa: E402
from batchnorm.adapters.torch import _autobuild as A  # noqa: E402
from batchnorm.adapters.torch import native  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
PYTHON_NODE, NATIVE_NODE = "_LeanBackward", "CppFunction"

# The fake build: argv = token, cache directory, mode. "wait": wait for the file "go", then
# write the extension's file (atomically) and release the lock; "fail": exit with status 3;
# "partial": write half a temporary file, then sleep until killed.
FAKE = textwrap.dedent(
    """
    import json, os, sys, time
    token, where, mode, so = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    with open(os.path.join(where, "starts"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    if mode == "fail":
        sys.exit(3)
    if mode == "partial":
        with open(so + ".tmp", "wb") as f:
            f.write(b"half")
        time.sleep(120)
    for _ in range(6000):
        if os.path.exists(os.path.join(where, "go")):
            break
        time.sleep(0.01)
    with open(so + ".tmp", "wb") as f:
        f.write(b"fake")
    os.replace(so + ".tmp", so)
    lock = os.path.join(where, "build.lock")
    if json.load(open(lock))["token"] == token:
        os.unlink(lock)
    """
)


def _so(where: Path) -> Path:
    """The file the direct (no ninja) build writes."""
    return where / ("batchnorm_native_" + native._digest() + sysconfig.get_config_var("EXT_SUFFIX"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory (``XDG_CACHE_HOME``); the extension's directory in it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return native.cache_dir()


@pytest.fixture
def fake(cache, tmp_path, monkeypatch):
    """The default route with a fresh watcher that looks at every call, and the fake build
    as its command (``fake.mode`` picks the fake's behaviour); its processes ended after."""
    script = tmp_path / "fake_build.py"
    script.write_text(FAKE)

    class Fake:
        mode = "wait"

        def command(self, token):
            return [sys.executable, str(script), token, str(cache), self.mode, str(_so(cache))]

        def starts(self):
            path = cache / "starts"
            return path.read_text().split() if path.exists() else []

    f = Fake()
    monkeypatch.setattr(A, "command", f.command)
    monkeypatch.setattr(A, "CHECK_S", 0.0)
    monkeypatch.setattr(native, "_WATCH", A.Watcher(native.built, native.cache_dir))
    monkeypatch.setattr(native, "route", native._cached)
    yield f
    proc = native._WATCH._proc
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    native.disable()


def _call(m=None):
    """One training call of a small module (the native route's kind); its node's name."""
    m = bt.BatchNorm1d(4) if m is None else m
    y = m(torch.randn(6, 4, requires_grad=True))
    return type(y.grad_fn).__name__


def _wait_for_the_build():
    proc = native._WATCH._proc
    assert proc is not None
    proc.wait(timeout=60)


def test_the_first_call_returns_while_the_build_runs(fake, cache, capsys):
    """Never blocks: the fake build cannot end before the test writes "go", and the first
    call has returned (on the Python route) while it runs; one line on stderr."""
    assert _call() == PYTHON_NODE
    proc = native._WATCH._proc
    assert proc is not None and proc.poll() is None  # still running: the call did not wait
    err = capsys.readouterr().err
    assert err.count("batchnorm:") == 1 and "in the background" in err
    assert str(cache / A.LOG) in err and f"{native.ENV}=0" in err
    lock = json.loads((cache / A.LOCK).read_text())
    assert lock["pid"] == proc.pid and lock["host"] == socket.gethostname()
    assert _call() == PYTHON_NODE and capsys.readouterr().err == ""  # nothing said again
    (cache / "go").touch()
    _wait_for_the_build()
    assert len(fake.starts()) == 1


def test_later_calls_pick_the_extension_up(fake, cache, monkeypatch):
    """Once the build is done, the next call loads the extension (build(), which only
    loads), and the route serves from then on."""
    loads = []

    def load():  # what build() does once the file is there: the route on
        loads.append(1)
        native.route = native.train

    def served(*args):
        served.calls += 1

    served.calls = 0
    monkeypatch.setattr(native, "build", load)
    monkeypatch.setattr(native, "train", served)
    m = bt.BatchNorm1d(4)
    _call(m)
    _call(m)
    assert loads == [] and native.route is native._cached  # built() is false meanwhile
    (cache / "go").touch()
    _wait_for_the_build()
    assert native.built()
    _call(m)
    assert loads == [1] and served.calls == 1  # the picking call itself took the route
    _call(m)
    assert loads == [1] and served.calls == 2


def test_the_picked_up_extension_serves(ext, fake, cache, monkeypatch):
    """The same with the real extension (loaded in this process before, by the ``ext``
    fixture: build() then only routes): the module's node becomes the C++ one."""
    monkeypatch.setattr(native, "_EXT", ext)
    m = bt.BatchNorm1d(4)
    assert _call(m) == PYTHON_NODE
    (cache / "go").touch()
    _wait_for_the_build()
    assert _call(m) == NATIVE_NODE and native.enabled()


def test_files_are_looked_at_every_few_seconds_only(fake, cache, monkeypatch):
    looks = []
    watch = A.Watcher(native.built, lambda: looks.append(1) or cache)
    monkeypatch.setattr(native, "_WATCH", watch)
    monkeypatch.setattr(A, "CHECK_S", 3600.0)
    m = bt.BatchNorm1d(4)
    for _ in range(20):
        _call(m)
    assert len(looks) == 1
    monkeypatch.setattr(A, "CHECK_S", 0.0)  # the negative control: every call looks
    watch.due = 0.0
    for _ in range(20):
        _call(m)
    assert len(looks) == 21
    (cache / "go").touch()


def test_one_build_while_the_lock_is_held(fake, cache, capsys):
    """A live build's lock (another process's here): no second build, no line; the
    extension is picked up when that build is done."""
    cache.mkdir(parents=True)
    (cache / A.LOCK).write_text(A._record(os.getppid(), "theirs"))
    assert _call() == PYTHON_NODE and _call() == PYTHON_NODE
    assert native._WATCH._proc is None and fake.starts() == []
    assert capsys.readouterr().err == ""
    _so(cache).write_bytes(b"fake")  # their build wrote the extension and still runs
    assert native._pickup() is False
    (cache / A.LOCK).unlink()  # and is done
    assert native._pickup() is True


def test_threads_first_calls_at_once_start_one_build(fake, cache):
    """Eight threads' first looks at once: one build (the watcher's mutex lets one thread
    look, and the lock file would refuse a second; without both, 2-8 builds started)."""
    import threading

    gate = threading.Barrier(8)
    states = []

    def first():
        gate.wait()
        states.append(native._WATCH.poll())

    threads = [threading.Thread(target=first) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert states == [A.WAIT] * 8
    (cache / "go").touch()
    _wait_for_the_build()
    assert len(fake.starts()) == 1


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("how", ["dead pid", "too old", "fresh", "other host", "being written"])
def test_a_stale_lock_is_taken_over(fake, cache, how):
    cache.mkdir(parents=True)
    lock = cache / A.LOCK
    pid = _dead_pid() if how == "dead pid" else os.getppid()
    record = json.loads(A._record(pid, "old"))
    if how == "other host":
        record["host"] = "elsewhere"
        record["pid"] = _dead_pid()
    before = "" if how == "being written" else json.dumps(record)
    lock.write_text(before)
    if how == "too old":
        old = time.time() - A.STALE_S - 60
        os.utime(lock, (old, old))
    _call()
    taken = how in ("dead pid", "too old")
    assert (native._WATCH._proc is not None) == taken
    assert (lock.read_text() != before) == taken  # the new builder's record
    (cache / "go").touch()
    if taken:
        _wait_for_the_build()
    assert len(fake.starts()) == int(taken)


def test_two_processes_start_one_build(cache, tmp_path):
    """Three processes' first calls at once (they wait for a file, then call): one starts
    the (fake) build, the others wait for it quietly."""
    script = tmp_path / "fake_build.py"
    script.write_text(FAKE)
    probe = textwrap.dedent(
        f"""
        import os, sys, time, torch, batchnorm.torch as bt
        from batchnorm.adapters.torch import _autobuild as A
        A.command = lambda t: [sys.executable, {str(script)!r}, t, {str(cache)!r}, "wait",
                               {str(_so(cache))!r}]
        m = bt.BatchNorm1d(4)
        x = torch.randn(6, 4, requires_grad=True)
        open({str(tmp_path)!r} + f"/ready-{{os.getpid()}}", "w").close()
        while not os.path.exists({str(tmp_path / "start")!r}):
            time.sleep(0.005)
        m(x)
        from batchnorm.adapters.torch import native
        print("started" if native._WATCH._proc is not None else "waits")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop(native.ENV, None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", probe],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for _ in range(30000):  # all three at the starting line (they import torch first)
        if len(list(tmp_path.glob("ready-*"))) == 3 or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    (tmp_path / "start").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    said = sorted(o[0].split()[-1] for o in outs)
    assert said == ["started", "waits", "waits"]
    assert sum("in the background" in o[1] for o in outs) == 1
    (cache / "go").touch()
    for _ in range(6000):  # the fake build ends once "go" is there
        if not (cache / A.LOCK).exists():
            break
        time.sleep(0.01)
    assert len((cache / "starts").read_text().split()) == 1


def test_a_failed_build_is_not_retried(fake, cache, capsys):
    fake.mode = "fail"
    _call()
    _wait_for_the_build()
    assert _call() == PYTHON_NODE
    err = capsys.readouterr().err
    assert "in the background" in err and "could not be built" in err
    assert native.route is None and (cache / A.FAILED).exists()
    assert "status 3" in (cache / A.FAILED).read_text()
    assert not (cache / A.LOCK).exists()
    # a later process (a fresh watcher): one line, no build
    native._WATCH = A.Watcher(native.built, native.cache_dir)
    native.route = native._cached
    _call()
    _call()
    err = capsys.readouterr().err
    assert err.count("batchnorm:") == 1 and "could not be built earlier" in err
    assert native.route is None and len(fake.starts()) == 1


def test_a_foreground_build_clears_the_failure_mark(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / A.FAILED).write_text("failed")
    monkeypatch.setattr(native, "_EXT", None)
    monkeypatch.setattr(native, "_PARALLEL", native._PARALLEL)  # (the fake build sets them)
    monkeypatch.setattr(native._cpu, "POOLED", native._cpu.POOLED)

    def broken(verbose, use_ninja):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(native, "_setup", broken)
    with pytest.raises(RuntimeError):
        native.build()
    assert (cache / A.FAILED).exists()  # a failed foreground build leaves it
    monkeypatch.setattr(native, "_setup", lambda verbose, use_ninja: (_Ext(), False))
    native.build()
    native.disable()
    assert not (cache / A.FAILED).exists()


class _Ext:
    empty_pooled = None


def test_without_a_compiler_the_real_build_fails_once(cache, tmp_path, monkeypatch, capsys):
    """The real build command with ``CXX=/nonexistent`` (it never uses ninja): a marker
    with the error, one line, and no retry by a later process."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(A, "CHECK_S", 0.0)
    monkeypatch.setattr(native, "_WATCH", A.Watcher(native.built, native.cache_dir))
    monkeypatch.setattr(native, "route", native._cached)
    _call()
    _wait_for_the_build()
    _call()
    marker = (cache / A.FAILED).read_text()
    assert "nonexistent" in marker and str(cache / A.LOG) in marker
    assert "could not be built" in capsys.readouterr().err
    assert native.route is None and not (cache / A.LOCK).exists() and not native.built()


def test_a_killed_build_is_retried_later_and_never_loaded_half(fake, cache, capsys):
    fake.mode = "partial"
    _call()
    proc = native._WATCH._proc
    for _ in range(6000):
        if _so(cache).with_name(_so(cache).name + ".tmp").exists():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _call() == PYTHON_NODE
    assert "stopped" in capsys.readouterr().err and native.route is None
    assert not native.built() and not (cache / A.FAILED).exists()
    assert not (cache / A.LOCK).exists()  # released by the process that started it
    # a later process: a new build, not the half-written file
    fake.mode = "wait"
    native._WATCH = A.Watcher(native.built, native.cache_dir)
    native.route = native._cached
    assert _call() == PYTHON_NODE and native._WATCH._proc is not None
    (cache / "go").touch()
    _wait_for_the_build()
    assert len(fake.starts()) == 2


@pytest.mark.parametrize("how", ["a file", "read-only"])
def test_an_unwritable_cache_directory(fake, tmp_path, monkeypatch, capsys, how):
    base = tmp_path / "base"
    if how == "a file":
        base.write_text("not a directory")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        base.mkdir(mode=0o500)
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    assert _call() == PYTHON_NODE
    err = capsys.readouterr().err
    assert err.count("batchnorm:") == 1 and "cannot be built in the background" in err
    assert native.route is None and native._WATCH._proc is None and fake.starts() == []
    assert _call() == PYTHON_NODE and capsys.readouterr().err == ""


def test_a_build_that_cannot_start_leaves_no_lock(fake, cache, monkeypatch, capsys):
    monkeypatch.setattr(A, "command", lambda token: [str(cache / "no-such-python")])
    assert _call() == PYTHON_NODE
    err = capsys.readouterr().err
    assert err.count("batchnorm:") == 1 and "cannot be built in the background" in err
    assert native.route is None and not (cache / A.LOCK).exists()
    assert not (cache / A.FAILED).exists()  # (not a failed build: a later process tries)


def test_environment_1_builds_in_the_foreground_only(fake, cache, monkeypatch):
    """``BATCHNORM_TORCH_NATIVE=1``: the first call builds (here a failing build()), no
    background process, no lock."""
    tried = []

    def broken():
        tried.append(1)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(native, "build", broken)
    monkeypatch.setattr(native, "route", native._initial("1"))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert _call() == PYTHON_NODE
    assert tried == [1] and native.route is None
    assert native._WATCH._proc is None and not (cache / A.LOCK).exists()


def test_environment_0_never_builds(tmp_path):
    """``BATCHNORM_TORCH_NATIVE=0`` in a fresh process: the Python node, no line, no cache
    directory; unset (the negative control): the background build starts (a fake one)."""
    probe = textwrap.dedent(
        """
        import sys, torch, batchnorm.torch as bt
        from batchnorm.adapters.torch import _autobuild as A, native
        A.command = lambda t: [sys.executable, "-c", "pass"]
        y = bt.BatchNorm1d(4)(torch.randn(6, 4, requires_grad=True))
        loaded = native._EXT is not None or any("batchnorm_native" in k for k in sys.modules)
        print(loaded, type(y.grad_fn).__name__)
        """
    )
    base = {**os.environ, "PYTHONPATH": str(SRC), "XDG_CACHE_HOME": str(tmp_path)}
    for value in ("0", None):
        env = dict(base)
        env.pop(native.ENV, None)
        if value is not None:
            env[native.ENV] = value
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-2:] == ["False", PYTHON_NODE]
        assert ("in the background" in out.stderr) == (value is None)
        assert (tmp_path / "batchnorm").exists() == (value is None)


@pytest.mark.slow
def test_a_real_background_build_is_picked_up(tmp_path):
    """The real build in the background into a fresh cache directory: the first call on the
    Python route at once, a later call of the same process on the C++ node; a later
    process loads it at its first call and builds nothing."""
    probe = textwrap.dedent(
        """
        import sys, time, torch, batchnorm.torch as bt
        from batchnorm.adapters.torch import _autobuild as A
        A.CHECK_S = 0.5
        m = bt.BatchNorm1d(4)
        x = torch.randn(6, 4, requires_grad=True)
        nodes = [type(m(x).grad_fn).__name__]
        for _ in range(2400):
            nodes.append(type(m(x).grad_fn).__name__)
            if nodes[-1] == "CppFunction":
                break
            time.sleep(0.25)
        print(nodes[0], nodes[-1])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "XDG_CACHE_HOME": str(tmp_path)}
    env.pop(native.ENV, None)
    run = [sys.executable, "-c", probe]
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == [PYTHON_NODE, NATIVE_NODE]
    assert "in the background" in out.stderr
    where = next((tmp_path / "batchnorm" / "torch-native").iterdir())
    assert (where / A.LOG).exists() and not (where / A.LOCK).exists()
    assert not (where / A.FAILED).exists()
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[-2:] == [NATIVE_NODE, NATIVE_NODE]
    assert "building" not in again.stderr
