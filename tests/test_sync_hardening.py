"""Hardening of synchronization from a hostile probe: a layer's position in synchronized
calls whichever way its reducer was installed, a layer's timeout against its reducer's, and
the checks of what a user reducer returns. Refused calls and assignments change nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from test_distributed import SCENARIOS, mpirun, needs_mpi, scenario_ranks

import batchnorm as bn
from batchnorm import distributed
from batchnorm.core.reduce import LocalReducer, SyncBatchStats
from batchnorm.nn import Sequential


class Recording(LocalReducer):
    """A distributed reducer of one participant that records the calls it merges."""

    distributed = True

    def __init__(self, timeout: float | None = None) -> None:
        self.labels: list[str] = []
        self.timeout = timeout

    def merge(self, call, local, error, dtype):
        self.labels.append(call.label)
        return super().merge(call, local, error, dtype)

    def sum(self, call, arrays, error=None):
        self.labels.append(call.label)
        return super().sum(call, arrays, error)


def _label(layer, x) -> str:
    layer.forward(x)
    return layer.reducer.labels[-1].split()[0]


# --------------------------------------------------------------------------- positions
def test_every_route_that_synchronizes_a_layer_numbers_it(rng):
    """reducer= and an assigned reducer number the layer like comm= does (they all kept
    position 0: two such layers looked alike to the other ranks, a split brain)."""
    x = rng.standard_normal((6, 3))
    a, b = bn.BatchNorm(3), bn.BatchNorm(3)
    a.forward(x)  # ran locally first
    a.reducer, b.reducer = Recording(), Recording()
    c, d = bn.BatchNorm(3, reducer=Recording()), bn.BatchNorm(3, reducer=Recording())
    layers = [a, b, c, d]
    positions = [m.sync_position for m in layers]
    assert positions == sorted(positions) and len(set(positions)) == 4
    assert len({_label(m, x) for m in layers}) == 4  # the names other ranks compare


def test_a_layer_keeps_its_position_across_reducers_and_unsynchronized(rng):
    x = rng.standard_normal((6, 3))
    layer = bn.BatchNorm(3, reducer=Recording())
    pos = layer.sync_position
    layer.reducer = Recording()  # a new reducer: a new call sequence, the same name
    layer.reducer = None
    layer.reducer = Recording()
    assert layer.sync_position == pos
    other = bn.BatchNorm(3)
    model = Sequential(layer, other)
    red = Recording()
    layer.reducer = other.reducer = red
    free = bn.BatchNorm(3, reducer=Recording()).sync_position + 100  # held by no layer
    layer.sync_position, other.sync_position = free, free + 1
    before = bn.BatchNorm(3, reducer=Recording()).sync_position
    with distributed.unsynchronized(model):
        model.forward(x)
    assert (layer.sync_position, other.sync_position) == (free, free + 1)
    assert layer.reducer is red and other.reducer is red
    # the block drew no position: the next layer is numbered right after the one before it
    assert bn.BatchNorm(3, reducer=Recording()).sync_position == before + 1


def test_a_copy_is_a_new_layer_numbered_when_synchronized(rng):
    layer = bn.BatchNorm(3, reducer=Recording())
    layer.reducer = None
    twin = copy.deepcopy(layer)
    twin.reducer = Recording()
    assert twin.sync_position > layer.sync_position


def test_refused_reducers_and_positions_change_nothing():
    layer = bn.BatchNorm(3, reducer=Recording())
    pos, red = layer.sync_position, layer.reducer
    for bad in (object(), LocalReducer, "mpi"):
        with pytest.raises(TypeError):
            layer.reducer = bad
    with pytest.raises(ValueError, match="sync_position"):
        layer.sync_position = -1
    with pytest.raises(ValueError, match="cannot synchronize"):
        bn.GhostBatchNorm(3, virtual_batch_size=2).reducer = Recording()
    assert layer.reducer is red and layer.sync_position == pos


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_assigned_reducers_are_refused_at_different_layers_under_mpi(tmp_path, n):
    ranks = scenario_ranks(n, "reassign.py", tmp_path)
    for r in ranks:
        assert r["positions_assigned"] == [r["positions_assigned"][0] + i for i in range(2)]
        for case in ("assigned", "constructed"):
            assert r[case]["error"] == "DistributedError", r[case]
            assert "different layers" in r[case]["message"]
            assert r[case]["unchanged"]
        assert r["reassigned_on_one_rank"]["error"] == "DistributedError"
        assert "out of step" in r["reassigned_on_one_rank"]["message"]
        assert r["reassigned_on_one_rank"]["unchanged"]
        assert r["positions_reassigned"] == ranks[0]["positions_reassigned"]
        assert r["position_last"] == ranks[0]["position_last"]
        assert r["agreeing"]["error"] is None  # the ranks are still in step
        assert r["running_mean"] == ranks[0]["running_mean"]
    # the out-of-step error reads the same on every rank
    assert len({r["reassigned_on_one_rank"]["message"].split(": ", 1)[1] for r in ranks}) == 1


def test_positions_are_one_namespace_for_every_route(rng):
    """convert_sync numbered a model 0..k, positions comm=/reducer= layers of the same
    process had drawn: two layers with one name, merged with each other across ranks."""
    alone = bn.BatchNorm(3, reducer=Recording())
    model = Sequential(bn.BatchNorm(3), bn.BatchNorm(3), bn.BatchNorm(3))
    distributed.convert_sync(model, _FakeComm())
    later = bn.BatchNorm(3, reducer=Recording())
    positions = [alone.sync_position, *(m.sync_position for m in model.modules)]
    positions.append(later.sync_position)
    assert len(set(positions)) == len(positions)
    block = positions[1:4]
    assert block == list(range(block[0], block[0] + 3))  # model order, consecutive
    assert later.sync_position > max(block)
    distributed.convert_sync(model, None)  # made local: the positions are kept
    assert [m.sync_position for m in model.modules] == block


def test_an_assigned_position_held_by_another_layer_is_refused():
    alone = bn.BatchNorm(3, reducer=Recording())
    other = bn.BatchNorm(3, reducer=Recording())
    pos, red = other.sync_position, other.reducer
    with pytest.raises(ValueError, match=f"holds position {alone.sync_position}"):
        other.sync_position = alone.sync_position
    assert other.sync_position == pos and other.reducer is red  # nothing changed
    # the control: a free position is taken, and the next draw comes after it
    free = bn.BatchNorm(3, reducer=Recording()).sync_position + 50
    other.sync_position = free
    assert other.sync_position == free
    assert bn.BatchNorm(3, reducer=Recording()).sync_position > free
    other.sync_position = free  # its own position again: fine
    alone.sync_position = pos  # the position other gave up is free again
    assert alone.sync_position == pos


class _FakeComm:
    """Enough of a one-rank communicator for a reducer that is never called."""

    def Get_rank(self) -> int:  # noqa: N802
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    Iallgather = Isend = None  # noqa: N815


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_convert_sync_and_comm_layers_never_share_a_name_under_mpi(tmp_path, n):
    ranks = scenario_ranks(n, "positions.py", tmp_path)
    for r in ranks:
        assert r["positions"] == ranks[0]["positions"]
        assert len(set(r["positions"])) == 3
        assert r["control_counts"] == [6 * n, 6 * n]
        assert r["crossed"]["error"] == "DistributedError", r["crossed"]
        assert "different layers" in r["crossed"]["message"]
        assert r["unchanged"]


# --------------------------------------------------------------------------- backward
@pytest.mark.parametrize("cls", [bn.BatchNorm, bn.BatchRenorm])
def test_the_backward_of_a_synchronized_forward_sums_through_its_reducer(rng, cls):
    """A reducer removed or replaced between forward and backward (an unsynchronized block,
    comm = None) made the backward local: partial sums reported as global sums
    (gradients_reduced), the other ranks left waiting in theirs."""
    x = rng.standard_normal((8, 3))
    ref = cls(3)
    ref.forward(x)
    want = ref.backward(np.ones_like(x) + x)
    for replacement in (None, Recording()):
        first = Recording()
        layer = cls(3, reducer=first)
        layer.forward(x)
        layer.reducer = replacement
        dx = layer.backward(np.ones_like(x) + x)
        assert [lab.split()[-1] for lab in first.labels] == ["forward", "backward"]
        assert replacement is None or replacement.labels == []
        assert layer.gradients_reduced
        np.testing.assert_allclose(dx, want, atol=1e-12)


def test_a_copy_made_after_a_synchronized_forward_refuses_its_backward(rng):
    x = rng.standard_normal((8, 3))
    layer = bn.BatchNorm(3, reducer=Recording())
    layer.forward(x)
    layer.reducer = None  # a synchronized layer cannot be copied
    twin = copy.deepcopy(layer)
    with pytest.raises(ValueError, match="does not hold the reducer it merged through"):
        twin.backward(np.ones_like(x))
    assert twin.dgamma is None
    layer.backward(np.ones_like(x))  # the original still can


# --------------------------------------------------------------------------- timeout
class ReadOnlyTimeout(LocalReducer):
    distributed = True

    @property
    def timeout(self) -> float:
        return 7.0


class NoTimeout(LocalReducer):
    distributed = True
    timeout = property(lambda self: (_ for _ in ()).throw(AttributeError("no timeout")))


def test_a_reducer_with_a_read_only_timeout_is_accepted_and_kept():
    layer = bn.BatchNorm(3, reducer=ReadOnlyTimeout())  # crashed: AttributeError
    assert layer.timeout == 7.0
    with pytest.raises(TypeError, match="does not let its timeout be set.*nothing changed"):
        layer.timeout = 5
    assert layer.timeout == 7.0 and layer._sync.timeout is None  # nothing changed
    layer.reducer = None  # local again: the timeout waits for a later comm=
    layer.timeout = 5
    assert layer.timeout == 5.0


def test_a_reducer_without_a_timeout_refuses_one():
    layer = bn.BatchNorm(3, reducer=NoTimeout())
    assert layer.timeout is None
    with pytest.raises(TypeError, match="has no timeout"):
        layer.timeout = 5
    assert layer._sync.timeout is None


def test_a_layer_keeps_its_reducers_timeout_and_refuses_one_beside_it():
    red = Recording(timeout=30.0)
    layer = bn.BatchNorm(3, reducer=red)
    assert red.timeout == 30.0 and layer.timeout == 30.0  # was set to None: a hang
    with pytest.raises(TypeError, match="timeout=5 applies to comm="):
        bn.BatchNorm(3, reducer=Recording(), timeout=5)
    layer.timeout = 12
    assert red.timeout == 12.0 and layer.timeout == 12.0
    for bad in (-1, 0, float("nan"), "5", True):
        with pytest.raises((TypeError, ValueError)):
            layer.timeout = bad
        assert red.timeout == 12.0 and layer.timeout == 12.0


def test_the_mpi_reducer_keeps_its_timeout_in_a_layer():
    MPI = pytest.importorskip("mpi4py.MPI")
    red = distributed.MpiReducer(MPI.COMM_WORLD, 30)
    layer = bn.BatchNorm(3, reducer=red)
    assert red.timeout == 30.0 and layer.timeout == 30.0
    built = bn.BatchNorm(3, comm=MPI.COMM_WORLD, timeout=4)
    assert built.timeout == 4.0 and built.reducer.timeout == 4.0


# --------------------------------------------------------------------------- merge results
def _returning(fn):
    class Custom(LocalReducer):
        distributed = True

        def merge(self, call, local, error, dtype):
            st = super().merge(call, local, error, dtype)
            return fn(st)

    return Custom()


BAD_MERGES = [
    (
        lambda st: SyncBatchStats(st.count, st.mean, -st.var - 1.0, st.counts),
        ValueError,
        r"Custom\(\) returned a negative variance: features \[0, 1, 2\] have var \[-",
    ),
    (lambda st: (st.mean, st.var), TypeError, "returned tuple .* expected statistics"),
    (
        lambda st: SyncBatchStats(st.count, st.mean[:2], st.var, st.counts),
        TypeError,
        r"mean of shape \(2,\)",
    ),
    (
        lambda st: SyncBatchStats(st.count, st.mean.astype(int), st.var, st.counts),
        TypeError,
        "dtype int64",
    ),
    (
        lambda st: SyncBatchStats(st.count, "mean", st.var, st.counts),
        TypeError,
        "mean of (type|shape)",
    ),
    (lambda st: SyncBatchStats(1.5, st.mean, st.var, st.counts), TypeError, "count=1.5"),
    (lambda st: SyncBatchStats(2, st.mean, st.var, st.counts), ValueError, "fewer than"),
    (
        lambda st: SyncBatchStats(st.count, st.mean + np.nan, st.var, st.counts),
        ValueError,
        "non-finite statistics from finite local ones",
    ),
]


@pytest.mark.parametrize(("fn", "error", "match"), BAD_MERGES)
def test_what_a_reducer_merges_is_checked_and_changes_nothing(rng, fn, error, match):
    x = rng.standard_normal((8, 3))
    layer = bn.BatchNorm(3, reducer=_returning(fn))
    before = layer.state_dict()
    with pytest.raises(error, match=match):
        layer.forward(x)
    after = layer.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert layer.last_batch_stats is None and layer._cache is None
    with pytest.raises(error, match=match):
        bn.batch_norm_train(x, None, None, reducer=_returning(fn))
    with pytest.raises(error, match=match):
        bn.moments(x, reducer=_returning(fn))


def test_good_merges_pass_the_check(rng):
    """Negative control: the same reducer returning what it merged, and non-finite
    statistics a reducer attributes to a participant, are accepted."""
    x = rng.standard_normal((8, 3))
    y, _ = bn.batch_norm_train(x, None, None, reducer=_returning(lambda st: st))
    np.testing.assert_allclose(y, bn.batch_norm_train(x, None, None)[0], atol=1e-12)
    nan = _returning(lambda st: SyncBatchStats(st.count, st.mean + np.nan, st.var, st.counts, (1,)))
    layer = bn.BatchNorm(3, reducer=nan, nonfinite="skip")
    layer.forward(x)
    assert layer.skipped_updates == 1


def test_what_a_reducer_sums_is_checked(rng):
    class Short(LocalReducer):
        distributed = True

        def sum(self, call, arrays, error=None):
            return [arrays[0]]

    x = rng.standard_normal((8, 3))
    layer = bn.BatchNorm(3, reducer=Short())
    layer.forward(x)
    with pytest.raises(TypeError, match=r"Short\(\) returned 1 sums for 2 arrays"):
        layer.backward(np.ones_like(x))
    assert layer.dgamma is None


# --------------------------------------------------------------------------- odd inputs
@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_odd_dtypes_and_huge_values_across_ranks_are_refused_everywhere(tmp_path, n):
    """A torch bfloat16 batch failed on its rank alone (NumPy has no bfloat16) while the
    others waited; 1e308 on one rank and -1e308 on another overflowed the merge's mean."""
    ranks = scenario_ranks(n, "odd_inputs.py", tmp_path)
    for r in ranks:
        assert r["dtypes"]["error"] == "DistributedError"
        assert "rank 0: float32" in r["dtypes"]["message"]
        assert r["overflow_across_ranks"]["error"] == "ValueError"
        assert "overflows float64" in r["overflow_across_ranks"]["message"]
        if "bfloat16_on_rank_0" in r:
            assert r["bfloat16_on_rank_0"]["error"] == "DistributedError"
            assert "rank 0: bfloat16" in r["bfloat16_on_rank_0"]["message"]
            assert r["bfloat16_everywhere"]["error"] is None
        assert r["count_too_big"]["error"] == "DistributedError"  # was rank 0's alone
        assert "does not fit in a 64-bit integer" in r["count_too_big"]["message"]
        assert r["weight_of_huge_counts"] == 1 / n  # the int64 total wrapped around
        assert all(v["unchanged"] for v in r.values() if isinstance(v, dict) and v["error"])
        assert r["agreeing"]["error"] is None


def test_the_merge_of_opposite_huge_means_keeps_a_finite_mean():
    from batchnorm.core.stats import merge

    with np.errstate(over="ignore"):  # the variance overflows
        n, mean, m2 = merge(4, np.array([1e308, 1.0]), np.zeros(2), 4, np.array([-1e308, 3.0]), 0)
    np.testing.assert_array_equal(mean, [0.0, 2.0])
    assert m2[0] == np.inf and m2[1] == 8.0  # the variance 1e616 overflows, as it must
    with np.errstate(over="ignore"):  # negative control: the textbook difference overflows
        assert np.isinf(np.float64(-1e308) - np.float64(1e308))


def test_the_merge_equals_the_textbook_form_bit_for_bit(rng):
    from batchnorm.core.stats import merge

    for _ in range(200):
        scale = 10.0 ** rng.uniform(-100, 100)
        ma, mb = rng.standard_normal((2, 20)) * scale
        m2a, m2b = np.abs(rng.standard_normal((2, 20))) * scale**2
        na, nb = (int(v) for v in rng.integers(1, 10**6, 2))
        delta = mb - ma
        n, mean, m2 = merge(na, ma, m2a, nb, mb, m2b)
        np.testing.assert_array_equal(mean, ma + delta * (nb / (na + nb)))
        np.testing.assert_array_equal(m2, m2a + m2b + delta * delta * (na * nb / (na + nb)))


def test_an_mpi_reducers_timeout_is_checked_when_assigned():
    MPI = pytest.importorskip("mpi4py.MPI")
    red = distributed.MpiReducer(MPI.COMM_WORLD, 3)
    for bad in ("5", -1, 0, float("nan"), True):
        with pytest.raises((TypeError, ValueError), match="timeout"):
            red.timeout = bad  # was stored, and failed inside the next synchronized call
        assert red.timeout == 3.0
    red.timeout = None
    assert red.timeout is None


# --------------------------------------------------------------------------- threads
def test_a_synchronized_exchange_holds_the_process_lock_throughout(monkeypatch, rng):
    """Threads take turns: a thread's header agreement and payload exchange are one
    critical section (MPI matches collectives by order, so two threads' exchanges on one
    communicator could swap payloads between layers)."""
    MPI = pytest.importorskip("mpi4py.MPI")
    import threading

    from batchnorm._sync import protocol

    seen = []
    real = protocol.allgather

    def spy(red, send, call, seq):
        # another thread cannot take the lock while this exchange runs
        box = []

        def probe():
            box.append(protocol.EXCHANGE_LOCK.acquire(False))
            if box[0]:
                protocol.EXCHANGE_LOCK.release()

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        seen.append((call.label, not box[0]))
        return real(red, send, call, seq)

    monkeypatch.setattr(protocol, "allgather", spy)
    layer = bn.BatchNorm(3, comm=MPI.COMM_WORLD)
    x = rng.standard_normal((6, 3))
    layer.forward(x)
    layer.backward(np.ones_like(x))
    distributed.allreduce_gradients(Sequential(bn.nn.Linear(3, 2, rng=rng)), MPI.COMM_WORLD)
    assert [held for _, held in seen] == [True] * 3, seen  # forward, backward, gradients


def test_the_stall_warning_period_is_checked_and_a_refusal_changes_nothing(monkeypatch):
    from batchnorm._sync import protocol

    monkeypatch.setattr(protocol, "STALL_WARNING_SECONDS", 60.0)
    for bad in ("x", -1, 0, float("nan"), float("inf"), None, True):
        with pytest.raises((TypeError, ValueError), match="STALL_WARNING_SECONDS"):
            distributed.STALL_WARNING_SECONDS = bad  # NaN never warned, -1 at every poll
        assert protocol.STALL_WARNING_SECONDS == 60.0
    distributed.STALL_WARNING_SECONDS = 0.5
    assert protocol.STALL_WARNING_SECONDS == 0.5
    distributed.STALL_WARNING_SECONDS = 60.0


def test_a_header_field_beyond_int64_is_refused_through_the_agreement():
    MPI = pytest.importorskip("mpi4py.MPI")
    with pytest.raises(distributed.DistributedError, match="does not fit in a 64-bit integer"):
        distributed.local_weight(2**63, MPI.COMM_WORLD)  # was a raw OverflowError, alone
    assert distributed.local_weight(2**62, MPI.COMM_WORLD) == 1.0


# --------------------------------------------------------------------------- state files
@pytest.mark.parametrize("cls", [bn.BatchNorm, bn.BatchRenorm])
def test_a_layer_never_counts_past_what_its_checkpoint_can_hold(rng, tmp_path, cls):
    """num_batches_tracked = 2**63 - 1 then one more batch gave 2**63: saved (as uint64)
    into a file that load refused."""
    x = rng.standard_normal((8, 3))
    layer = cls(3)
    state = layer.state_dict()
    state["num_batches_tracked"] = 2**63 - 1
    layer.load_state_dict(state)
    before = layer.state_dict()
    with pytest.raises(ValueError, match="would reach 2\\*\\*63"):
        layer.forward(x)
    after = layer.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    layer.save(tmp_path / "full.npz")
    assert cls(3).load(tmp_path / "full.npz").num_batches_tracked == 2**63 - 1
    state["num_batches_tracked"] = 2**63 - 2  # negative control: one more batch fits
    layer.load_state_dict(state)
    layer.forward(x)
    assert layer.num_batches_tracked == 2**63 - 1


def test_a_refused_constructor_draws_no_position():
    """A bad timeout beside comm= was checked after the layer had been numbered: a rank
    whose constructor failed (and was retried) numbered its later layers differently."""
    MPI = pytest.importorskip("mpi4py.MPI")
    first = bn.BatchNorm(3, reducer=Recording()).sync_position
    for bad in (-1, "5"):
        with pytest.raises((TypeError, ValueError)):
            bn.BatchNorm(3, comm=MPI.COMM_WORLD, timeout=bad)
    with pytest.raises(TypeError, match="applies to comm="):
        bn.BatchNorm(3, reducer=Recording(), timeout=5)
    assert bn.BatchNorm(3, reducer=Recording()).sync_position == first + 1


@needs_mpi
@pytest.mark.mpi
def test_a_reducers_own_timeout_aborts_a_job_with_a_missing_rank():
    import time

    start = time.monotonic()
    res = mpirun(2, str(SCENARIOS / "stall_reducer.py"), timeout=60)
    elapsed = time.monotonic() - start
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert elapsed < 25, elapsed  # the missing rank sleeps 30 s
    assert "rank 1 has not arrived" in text
    assert "timeout=2 s reached: aborting the job" in text
    assert "rank 0 was not stopped" not in text


@pytest.mark.parametrize("big", [2**63, 2**63 + 5, 2**100, np.uint64(2**63)])
def test_a_position_beyond_int64_is_refused_naming_it(big):
    """Positions are int64 like every count of the library; 2**63 and beyond were taken
    (and moved every later draw of the process past int64). Refused naming the value, with
    the layer's position and the process's next draw unchanged."""
    layer = bn.BatchNorm(3, reducer=Recording())
    pos, red = layer.sync_position, layer.reducer
    with pytest.raises(ValueError, match=f"sync_position.*{int(big)}"):
        layer.sync_position = big
    assert layer.sync_position == pos and layer.reducer is red
    assert bn.BatchNorm(3, reducer=Recording()).sync_position == pos + 1  # draws unmoved
    layer.sync_position = pos + 100  # the control: an int64 position is taken
    assert layer.sync_position == pos + 100


def test_the_last_int64_position_is_taken_and_then_no_draw_is_left():
    """2**63 - 1 is a position; after it no draw can give an int64 one: a layer that would
    need one, and a convert_sync block, are refused naming the reason, nothing changed.
    In a process of its own (the namespace is process-wide)."""
    import subprocess
    import sys

    code = (
        "import batchnorm as bn\n"
        "from batchnorm import distributed\n"
        "from batchnorm.core.reduce import LocalReducer\n"
        "from batchnorm.nn import Sequential\n"
        "class R(LocalReducer):\n    distributed = True\n"
        "last = bn.BatchNorm(3, reducer=R())\n"
        "last.sync_position = 2**63 - 1\n"
        "assert last.sync_position == 2**63 - 1\n"
        "layer = bn.BatchNorm(3)\n"
        "acts = (lambda: setattr(layer, 'reducer', R()), lambda: bn.BatchNorm(3, reducer=R()))\n"
        "for act in acts:\n"
        "    try:\n        act()\n    except ValueError as e:\n        print('refused:', e)\n"
        "assert not layer.reducer.distributed\n"
        "model = Sequential(bn.BatchNorm(3), bn.BatchNorm(3))\n"
        "class C:\n"
        "    def Get_rank(self): return 0\n"
        "    def Get_size(self): return 1\n"
        "    Iallgather = Isend = None\n"
        "try:\n    distributed.convert_sync(model, C())\n"
        "except ValueError as e:\n    print('refused:', e)\n"
        "assert not any(m.reducer.distributed for m in model.modules)\n"
        "print('done')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "done" in res.stdout, res.stderr
    refusals = [line for line in res.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 3, res.stdout
    assert all("no sync position" in line and "2**63" in line for line in refusals), refusals
