"""The native extension's output pool (csrc/pool.h; batchnorm.adapters.torch.native
``pool_stats``, ``set_pool_limit``, ``empty_cache``): large outputs of the native node and
of the Python route come from freed blocks when the pool has one, with the same values,
sizes and strides as torch's allocator gives, and never from a block that is still alive.

Skipped when the extension cannot be built here. The pool's counters are the negative
control: with the pool off the same calls count no hit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

torch = pytest.importorskip("torch")

from _native import (  # noqa: E402, F401
    built_extension,
    pool_of_256_mib,
    route_off_after_each_test,
)

import batchnorm.torch as bt  # noqa: E402
from batchnorm.adapters.torch import _cpu, _pool, native  # noqa: E402

CL = torch.channels_last
MIB = 1 << 20


def _hits():
    return native.pool_stats()["hits"]


def _kept(*ts):
    """Copies (torch's allocator) of the tensors and their strides: the originals can be
    freed, so the pool may hand their blocks out again."""
    return [(t.detach().clone(), t.stride()) for t in ts]


def _step(m, x, dy):
    """One training step's outputs (y, dx, dweight, dbias), kept."""
    xr = x.clone().requires_grad_()
    m.zero_grad()
    y = m(xr)
    y.backward(dy)
    return _kept(y, xr.grad, m.weight.grad, m.bias.grad)


# (32, 64, 16, 16) float32 is 2 MiB: the native node (one-call WIDE); (8, 64, 32, 32) NCHW
# and (16, 128, 16, 16) channels-last are 2-4 MiB: the Python route's large kernels
CASES = [((32, 64, 16, 16), None), ((16, 64, 32, 32), None), ((16, 128, 16, 16), CL),
         ((4096, 256), None)]  # fmt: skip


@pytest.mark.parametrize(("shape", "fmt"), CASES)
def test_pooled_outputs_are_those_of_torchs_allocator(pool, shape, fmt):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    dy = torch.randn(shape)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    kind = bt.BatchNorm1d if len(shape) == 2 else bt.BatchNorm2d
    results = {}
    for limit in (0, 256 * MIB):
        native.set_pool_limit(limit)
        m = kind(shape[1])
        before = _hits()
        runs = [_step(m, x, dy) for _ in range(3)]  # (the 2nd and 3rd reuse the 1st's blocks)
        m.eval()
        with torch.no_grad():
            runs.append(_kept(m(x)) + _kept(m(x)))
        results[limit] = (runs, _hits() - before)
    (off, off_hits), (on, on_hits) = results[0], results[256 * MIB]
    assert off_hits == 0
    assert on_hits >= 4  # y and dx of the later steps, the second evaluation's y
    for a, b in zip(off, on, strict=True):
        for (u, su), (v, sv) in zip(a, b, strict=True):
            assert u.shape == v.shape and su == sv and u.dtype == v.dtype
            assert torch.equal(u, v)


def test_a_live_output_is_never_handed_out_again(pool):
    m = bt.BatchNorm2d(64)
    m.eval()
    x = torch.randn(16, 64, 32, 32)
    with torch.no_grad():
        y1 = m(x)
        keep = y1.clone()
        y2 = m(x * 2)
        del y2
        y3 = m(x * 3)  # y2's block, not y1's
    assert y1.data_ptr() != y3.data_ptr()
    assert torch.equal(y1, keep)
    assert _hits() >= 1


def test_small_outputs_are_never_pooled(pool):
    m = bt.BatchNorm1d(256)
    x = torch.randn(64, 256, requires_grad=True)  # 64 KiB
    before = native.pool_stats()
    for _ in range(3):
        m(x).sum().backward()
    after = native.pool_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    big = torch.randn(1024, 256, requires_grad=True)  # 1 MiB: pooled (the control)
    for _ in range(3):
        m(big).sum().backward()
    assert native.pool_stats()["hits"] > after["hits"]


def test_pooled_output_can_be_resized_and_shared(pool):
    m = bt.BatchNorm2d(64).eval()
    x = torch.randn(16, 64, 32, 32)
    before = native.pool_stats()["misses"]
    with torch.no_grad():
        y = m(x)
        first = y.flatten()[:10].clone()
    assert native.pool_stats()["misses"] == before + 1  # (y came from the pool's allocator)
    y.resize_(2 * y.numel())  # the storage grows through the pool's allocator
    assert torch.equal(y[:10], first)
    y.share_memory_()
    assert y.is_shared() and torch.equal(y[:10], first)


def test_limit_bounds_the_cache_and_empty_cache_frees_it(pool):
    m = bt.BatchNorm2d(64).eval()
    x = torch.randn(16, 64, 32, 32)  # 4 MiB outputs
    with torch.no_grad():
        ys = [m(x) for _ in range(6)]
    del ys
    s = native.pool_stats()
    assert s["cached_blocks"] == 6 and s["cached_bytes"] == 6 * x.numel() * 4
    native.set_pool_limit(10 * MIB)  # two blocks fit
    assert native.pool_stats()["cached_bytes"] == 2 * x.numel() * 4
    assert native.empty_cache() == 2 * x.numel() * 4
    assert native.pool_stats()["cached_bytes"] == 0
    native.set_pool_limit(0)
    with torch.no_grad():
        m(x)  # (freed at once)
    assert native.pool_stats()["cached_blocks"] == 0  # off: freed blocks go back at once


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1", None])
def test_set_pool_limit_refuses_what_is_not_a_byte_count(pool, bad):
    before = native.pool_stats()["limit"]
    with pytest.raises(ValueError, match="pool limit"):
        native.set_pool_limit(bad)
    assert native.pool_stats()["limit"] == before


@pytest.mark.parametrize(("value", "expect"), [("0", 0), ("64", 64 * MIB), ("0.5", MIB // 2)])
def test_the_environment_sets_the_limit(monkeypatch, value, expect):
    monkeypatch.setenv(native.POOL_ENV, value)
    assert _pool.env_limit() == expect


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", ""])
def test_the_environment_refuses_a_bad_limit_naming_it(monkeypatch, value):
    monkeypatch.setenv(native.POOL_ENV, value)
    with pytest.raises(ValueError, match=native.POOL_ENV):
        _pool.env_limit()


def test_disable_returns_to_torchs_allocator(pool):
    native.disable()
    assert _cpu.POOLED is None
    m = bt.BatchNorm2d(64)
    x = torch.randn(16, 64, 32, 32, requires_grad=True)
    before = native.pool_stats()
    for _ in range(3):
        m(x).sum().backward()
    after = native.pool_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_threads_share_the_pool_without_mixing_outputs(pool):
    m = bt.BatchNorm2d(64).eval()
    xs = [torch.randn(8, 64, 32, 32) for _ in range(4)]
    with torch.no_grad():
        want = [m(x).clone() for x in xs]
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    y = m(xs[i])
                    if not torch.equal(y, want[i]):
                        errors.append(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _hits() > 0


# (the child trains serially on one thread, as torch's DataLoader workers do: after a fork
# GNU OpenMP is unsafe, numba's parallel kernels end the child and torch's parallel copies
# may hang, with or without the pool)
_CHILD = """
import os, torch, batchnorm.torch as bt
from batchnorm.adapters.torch import native
native.build()
torch.manual_seed(0)
m = bt.BatchNorm1d(256)
x = torch.randn(1024, 256, requires_grad=True)  # 1 MiB: pooled, one serial call
m(x).sum().backward()  # blocks cached when the process forks
hits = native.pool_stats()["hits"]
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)
    ys = [m(x).detach().clone() for _ in range(3)]
    ok = all(torch.equal(y, ys[0]) for y in ys) and native.pool_stats()["hits"] > hits
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_the_pool(ext):
    env = {**os.environ, "BATCHNORM_TORCH_NATIVE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "0"


# (BatchRenorm's outputs come from NumPy: batch_renorm_train takes no ``out``)
@pytest.mark.parametrize("kind", ["GhostBatchNorm", "FrozenBatchNorm2d"])
def test_the_variants_outputs_from_the_pool_are_the_same(pool, kind):
    torch.manual_seed(0)
    x = torch.randn(16, 64, 32, 32) * 2 + 3  # 4 MiB
    dy = torch.randn_like(x)
    make = getattr(bt, kind)
    results = {}
    for limit in (0, 256 * MIB):
        native.set_pool_limit(limit)
        m = make(64, virtual_batch_size=8) if kind.startswith("Ghost") else make(64)
        before = _hits()
        runs = []
        for _ in range(3):
            xr = x.clone().requires_grad_()
            y = m(xr)
            y.backward(dy)
            runs.append(_kept(y, xr.grad))
        results[limit] = (runs, _hits() - before)
    (off, off_hits), (on, on_hits) = results[0], results[256 * MIB]
    assert off_hits == 0 and on_hits >= 2
    for a, b in zip(off, on, strict=True):
        for (u, su), (v, sv) in zip(a, b, strict=True):
            assert su == sv and torch.equal(u, v)
