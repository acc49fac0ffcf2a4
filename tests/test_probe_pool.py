"""Hostile probes of the native extension's output pool (csrc/pool.h, ``native.pool_stats``,
``set_pool_limit``, ``empty_cache``).

Eight tests reproduce defects the probe found, each fixed since (they failed on the code
they were written against, branch probe5 from main a9cdb12); each docstring describes the
defect and its cause as found.
The other tests are probes that held, kept as regressions: a block is never handed out
while anything (a NumPy view, a kept storage, a lazy clone) still uses it, a failed
allocation leaves the counters as they were, and tracing never touches the pool.

Skipped when the extension cannot be built here."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from _native import (  # noqa: E402, F401
    built_extension,
    pool_of_256_mib,
    route_off_after_each_test,
)

import batchnorm.torch as bt  # noqa: E402
from batchnorm.adapters.torch import _cpu, native  # noqa: E402

MIB = 1 << 20
SHAPE = (32, 64, 16, 16)  # float32: 2 MiB, pooled


def _live():
    gc.collect()
    return native.pool_stats()["live_blocks"]


# ------------------------------------------------------------------ defects (fixed since)
def test_set_pool_limit_leaves_a_disabled_route_off(pool):
    """``set_pool_limit`` calls ``build()``, which sets ``route = train`` and
    ``_cpu.POOLED`` every time, not only when it loads the extension: after
    ``native.disable()`` any limit change turns the native route (and the Python route's
    pool) back on."""
    native.disable()
    assert not native.enabled()  # (the control: disable works)
    native.set_pool_limit(128 * MIB)
    assert not native.enabled(), "set_pool_limit turned the disabled native route back on"
    assert _cpu.POOLED is None, "set_pool_limit gave the disabled Python route the pool again"


_ENV_OFF = """
from batchnorm.adapters.torch import native
assert not native.enabled()
native.set_pool_limit(0)  # a user turning the pool off too
print(native.enabled())
"""


def test_set_pool_limit_keeps_native_env_zero(ext):
    """``BATCHNORM_TORCH_NATIVE=0`` is documented as "never used", but ``set_pool_limit``
    (even ``set_pool_limit(0)``, turning the pool off) turns the native route on (same
    cause: ``build()``)."""
    env = {**os.environ, "BATCHNORM_TORCH_NATIVE": "0"}
    res = subprocess.run(
        [sys.executable, "-c", _ENV_OFF], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "False", "BATCHNORM_TORCH_NATIVE=0, yet the route is on"


def test_a_too_large_limit_is_refused_as_value_error_changing_nothing(pool):
    """``set_pool_limit(2**63)`` passes the Python check (an int >= 0), calls ``build()``
    (the route turns on) and then fails in pybind's int64 conversion with a TypeError
    ("incompatible function arguments"), unlike every other bad limit (ValueError naming
    it). A rejected call should leave the route and the limit as they were."""
    native.disable()
    before = native.pool_stats()["limit"]
    with pytest.raises(ValueError, match=str(2**63)):
        native.set_pool_limit(2**63)
    assert native.pool_stats()["limit"] == before
    assert not native.enabled(), "a rejected set_pool_limit turned the route on"


def test_stale_blocks_are_evicted_for_a_new_size(pool):
    """The pool never evicts: once freed blocks of old sizes fill the limit, a freed block
    of a new size is returned to the system (``release``: ``cached + n <= limit`` fails),
    so after a shape change for good (another batch size, another resolution) every
    allocation misses and the stale blocks stay resident until ``empty_cache()``."""
    native.set_pool_limit(8 * MIB)
    old = [_cpu.new_like(torch.empty(512, 1024)) for _ in range(4)]  # 4 x 2 MiB
    del old
    assert native.pool_stats()["cached_bytes"] == 8 * MIB  # the cache is full of old blocks
    new = torch.empty(520, 1024)  # the new shape, 2 MiB + 32 KiB
    before = native.pool_stats()["hits"]
    for _ in range(10):
        y = _cpu.new_like(new)
        del y
    stale_hits = native.pool_stats()["hits"] - before
    native.empty_cache()  # the control: without the stale blocks the new size is reused
    before = native.pool_stats()["hits"]
    for _ in range(10):
        y = _cpu.new_like(new)
        del y
    assert native.pool_stats()["hits"] - before == 9
    assert stale_hits > 0, "10 allocations of the new size, 0 hits: stale blocks block it"


def test_storage_resize_never_caches_blocks_below_the_minimum(pool):
    """A pooled tensor's storage keeps the pool as its allocator, so ``resize_`` of the
    tensor or its storage allocates (and on free caches) blocks of any size through
    ``bnpool::Allocator`` (``release`` caches without checking ``MIN_BYTES``), against
    pool.h's "smaller blocks stay on glibc's heap"."""
    y = _cpu.new_like(torch.empty(SHAPE))
    y.untyped_storage().resize_(1000)
    del y
    gc.collect()
    s = native.pool_stats()
    assert s["live_blocks"] == 0
    assert s["cached_bytes"] % MIB == 0, f"a block under 1 MiB is cached: {s}"


# ------------------------------------------------------------------- probes that held
def test_a_numpy_view_keeps_its_block_out_of_the_pool(pool):
    y = _cpu.new_like(torch.empty(SHAPE)).fill_(7.0)
    a = y.numpy()
    del y
    gc.collect()
    z = _cpu.new_like(torch.empty(SHAPE)).fill_(1.0)  # must not reuse a's block
    assert float(a.min()) == float(a.max()) == 7.0
    assert native.pool_stats()["live_blocks"] == 2
    del a, z
    assert _live() == 0


def test_a_kept_storage_or_lazy_clone_keeps_its_block(pool):
    y = _cpu.new_like(torch.empty(SHAPE)).fill_(3.0)
    s = y.untyped_storage()
    c = torch._lazy_clone(y)
    del y
    z = _cpu.new_like(torch.empty(SHAPE)).fill_(4.0)
    assert torch.equal(torch.tensor([], dtype=torch.float32).set_(s).unique(), torch.tensor([3.0]))
    assert bool((c == 3).all())
    c.add_(1)  # materializes the lazy clone
    assert bool((c == 4).all()) and torch.equal(z, c)
    del s, c, z
    assert _live() == 0


def test_a_failed_huge_allocation_records_nothing(pool):
    x = torch.zeros(1, 1, 1, 1).expand(2**44 // (64 * 64), 64, 8, 8)  # 2**44 float32
    before = native.pool_stats()
    with pytest.raises(RuntimeError, match="allocate"):
        _cpu.new_like(x, torch.float32, torch.channels_last)
    after = native.pool_stats()
    assert after["live_blocks"] == before["live_blocks"]
    assert after["cached_bytes"] == before["cached_bytes"]


def test_tracing_never_touches_the_pool(pool):
    from torch._subclasses.fake_tensor import FakeTensorMode

    before = native.pool_stats()
    with FakeTensorMode() as mode:
        y = bt.BatchNorm2d(64)(mode.from_tensor(torch.randn(SHAPE)))
    ym = bt.BatchNorm2d(64).to("meta")(torch.empty(SHAPE, device="meta"))
    torch.export.export(bt.BatchNorm2d(64), (torch.randn(SHAPE),))
    assert y.shape == ym.shape == SHAPE
    assert native.pool_stats() == before
    m = bt.BatchNorm2d(64).eval()  # the control: a real call counts
    with torch.no_grad():
        m(torch.randn(SHAPE))
    assert native.pool_stats() != before


def test_a_reference_cycle_gives_its_outputs_back_on_collection(pool):
    class Holder:
        pass

    m = bt.BatchNorm2d(64)
    x = torch.randn(SHAPE, requires_grad=True)
    h = Holder()
    h.self, h.y = h, m(x)
    h.node = h.y.grad_fn
    del h
    assert _live() == 0


@pytest.mark.parametrize("limit", [0, 256 * MIB])  # 0: the control (torch's allocator)
def test_profile_memory_sees_pooled_outputs(pool, limit):
    """torch's CPU allocator reports each allocation to the profiler
    (``c10::reportMemoryUsageToProfiler``); ``bnpool::Allocator`` does not, so
    ``torch.profiler.profile(profile_memory=True)`` shows no memory for a pooled output
    (about the whole activation memory of a large model's batch-norm layers)."""
    native.set_pool_limit(limit)
    m = bt.BatchNorm2d(64).eval()
    x = torch.randn(SHAPE)
    with torch.profiler.profile(profile_memory=True) as prof, torch.no_grad():
        y = m(x)
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage >= y.nbytes]
    assert allocated, f"the profiler saw no allocation of y ({y.nbytes} bytes), limit {limit}"


def test_disable_on_another_thread_never_breaks_new_like(pool):
    """``_cpu.new_like`` reads the module global ``POOLED`` twice (``POOLED is not None``,
    then ``POOLED(x, ...)``), so a ``native.disable()`` on another thread between the two
    reads makes the call raise ``TypeError: 'NoneType' object is not callable``. Seen with
    two threads (one allocating, one calling disable()/build(), ``sys.setswitchinterval
    (1e-6)``) after about 55,000 allocations; here the thread switch is placed in the
    window deterministically: a profile hook runs ``disable()`` when new_like calls
    ``x.numel()``, as the other thread would."""
    x = torch.empty(512, 1024)  # 2 MiB: the pooled branch
    assert _cpu.POOLED is not None

    def switch(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") == "numel":
            sys.setprofile(None)
            native.disable()  # what the other thread does

    sys.setprofile(switch)
    try:
        y = _cpu.new_like(x)
    finally:
        sys.setprofile(None)
    assert y.shape == x.shape


def test_disable_on_another_thread_never_breaks_a_training_call(pool):
    """The same race in ``fast._direct``: ``if grads and N.route is not None: y =
    N.route(...)`` reads ``native.route`` twice, so a ``native.disable()`` on another
    thread between the reads makes a training call raise ``TypeError: 'NoneType' object
    is not callable``. The thread switch is placed in the window by a line trace."""
    from batchnorm.adapters.torch import fast

    m = bt.BatchNorm2d(64)
    x = torch.randn(SHAPE, requires_grad=True)
    m(x)  # (the route's first call, and the layout cached)
    assert native.enabled()
    code = fast._direct.__code__

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None
        if event == "line":
            if "route(module" in _source_line(frame):  # (after the read)
                native.disable()  # what the other thread does
        return trace

    sys.settrace(trace)
    try:
        y = m(x)
    finally:
        sys.settrace(None)
    assert y.shape == x.shape


def _source_line(frame) -> str:
    import linecache

    return linecache.getline(frame.f_code.co_filename, frame.f_lineno)
