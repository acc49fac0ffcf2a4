"""Reproducers from a hostile probe of round 4's changes (2026-12-07), now regression tests.

Each test states the expected behaviour and what was seen before the fix ("Seen: ..."); each
failed on the tree it was written against (f0275f2 plus that day's merges) and passes since.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.core.reduce import LocalReducer, SyncBatchStats


class EditingReducer(LocalReducer):
    """A user reducer (declared distributed) whose merge returns ``edit(local)``."""

    distributed = True

    def __init__(self, edit):
        self.edit = edit

    def agree(self, call, error, **fields):
        if error is not None:
            raise error

    def merge(self, call, local, error, dtype):
        if error is not None:
            raise error
        return self.edit(local)

    def sum(self, call, arrays, error=None):
        if error is not None:
            raise error
        return list(arrays)


def _x(dtype):
    return np.random.default_rng(1).standard_normal((8, 3)).astype(dtype)


def _merged(local, **fields):
    kw = {"count": local.count, "mean": local.mean, "var": local.var}
    kw.update(fields)
    return SyncBatchStats(kw["count"], kw["mean"], kw["var"], (local.count,), ())


def test_reducer_infinite_variance_for_float32_data_is_refused():
    """A reducer that returns var = +inf (finite mean, finite local statistics) for float32
    data: no float32 data can have a float64 variance beyond ~1.2e77, so this is a broken
    reducer. Expected: a ValueError naming the reducer or the variance, as for float64 data
    (where check_variance refuses the same merged result). Seen: the functional call
    returns y = beta (0) everywhere and cache.var = inf, silently."""
    red = EditingReducer(lambda s: _merged(s, var=np.full_like(np.asarray(s.var), np.inf)))
    with pytest.raises(ValueError):  # control: float64 data are refused today
        bn.batch_norm_train(_x(np.float64), None, None, reducer=red)
    with pytest.raises((ValueError, TypeError)):
        y, cache = bn.batch_norm_train(_x(np.float32), None, None, reducer=red)
        print("y[0] =", y[0], "var =", cache.var)


def test_reducer_huge_python_int_count_gives_a_clear_error():
    """A reducer returning count = 10**400 (a Python int >= the local count, so the count
    check passes). Expected: a TypeError/ValueError naming the reducer and the count, like
    the other checks of reducer results. Seen: a raw OverflowError 'int too large to
    convert to float' from inside the pass."""
    red = EditingReducer(lambda s: _merged(s, count=10**400))
    with pytest.raises((ValueError, TypeError), match="count"):
        bn.batch_norm_train(_x(np.float64), None, None, reducer=red)


def _wide_feature(channels, scale=1e19, seed=0):
    """float32 (64, channels) data, feature 5 with std ``scale`` (its variance, ~1e38, is
    below float32's max 3.4e38; the sum of its 64 squares, ~6e39, is not)."""
    x = np.random.default_rng(seed).standard_normal((64, channels)).astype(np.float32)
    x[:, 5] *= np.float32(scale)
    x64 = x[:, 5].astype(np.float64)
    ref = (x64 - x64.mean()) / np.sqrt(x64.var() + 1e-5)
    return x, ref, x64.var()


def _jax_without_x64():
    jax = pytest.importorskip("jax")
    if jax.config.jax_enable_x64:
        pytest.skip("float32 statistics only without x64")
    return jax


@pytest.mark.parametrize("channels", [8, 4095, 4096])
def test_jax_float32_without_x64_normalizes_a_feature_of_std_1e19(channels):
    """batchnorm.jax.batch_norm, float32 data, no x64 (float32 statistics). One feature has
    std ~1e19: its variance (~1e38) fits float32, the sum of its squares (~6e39) does not.
    The numerics guide says centred data whose squares would overflow are scaled by a power
    of two first, "so float32 data at 10^20 still normalize". Expected: y of that feature
    within 1e-5 of the float64 x_hat and the new running_var ~ the batch variance.
    Seen: y = 0 everywhere and the running statistics left as they were (8 and 4095
    features; the same at f0275f2, before today's changes); from 4096 features (the
    many-feature check changed today) y of order 1e21 and running_var 0 *stored* (at
    f0275f2: y = 0 and running_var kept, as for 8 features)."""
    jax = _jax_without_x64()
    import batchnorm.jax as bnj

    x, ref, var = _wide_feature(channels)
    zeros, ones = jax.numpy.zeros(channels), jax.numpy.ones(channels)
    y, (_, rv) = bnj.batch_norm(x, None, None, zeros, ones, training=True, momentum=0.0)
    np.testing.assert_allclose(np.asarray(y[:, 0], np.float64), 0.0, atol=10)  # control
    np.testing.assert_allclose(np.asarray(y[:, 5], np.float64), ref, atol=1e-5)
    np.testing.assert_allclose(float(rv[5]), var, rtol=1e-4)


def test_array_api_path_jax_float32_without_x64_normalizes_a_feature_of_std_1e19():
    """batch_norm_train on a JAX float32 array without x64 (the array-API path, whose traced
    passes scale the squares: core.sums.square_scale). Same data as above (variance ~1e38,
    representable in float32). Expected: cache.var ~ the float64 variance, y ~ x_hat.
    Seen: cache.var = inf and y = 0 (beta) for that feature: the scaled sum of squares is
    divided by h**2 before it is divided by n, and overflows there."""
    _jax_without_x64()
    import jax.numpy as jnp

    x, ref, var = _wide_feature(8)
    y, cache = bn.batch_norm_train(jnp.asarray(x), None, None, axis=1)
    np.testing.assert_allclose(float(cache.var[5]), var, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(y[:, 5], np.float64), ref, atol=1e-5)


def test_jax_float32_without_x64_feature_of_std_1e18_is_fine():
    """Control for the two tests above: std 1e18 (sum of squares ~6e37 < 3.4e38) passes."""
    jax = _jax_without_x64()
    import batchnorm.jax as bnj

    x, ref, var = _wide_feature(8, scale=1e18)
    zeros, ones = jax.numpy.zeros(8), jax.numpy.ones(8)
    y, (_, rv) = bnj.batch_norm(x, None, None, zeros, ones, training=True, momentum=0.0)
    np.testing.assert_allclose(np.asarray(y[:, 5], np.float64), ref, atol=1e-5)
    np.testing.assert_allclose(float(rv[5]), var, rtol=1e-4)


@pytest.mark.parametrize("shape", [(8, 3), (2, 3, 4, 4)])
def test_torch_module_at_the_counter_limit_refuses_clearly_and_changes_nothing(shape):
    """A batchnorm.torch module whose num_batches_tracked is 2**63 - 1 (int64's max), trained
    on one more batch (momentum 0.1). The NumPy layers refuse such a batch naming
    num_batches_tracked, state unchanged (commit 0716908). Expected here: the same (an error
    that names num_batches_tracked; running_mean/var and the counter unchanged). Seen: a raw
    OverflowError 'Python int too large to convert to C long' from writing the counter,
    raised after running_mean and running_var were already blended (state changed by a
    refused call). (torch.nn wraps the counter to -2**63 silently.)"""
    torch = pytest.importorskip("torch")
    import batchnorm.torch as bt

    cls = bt.BatchNorm1d if len(shape) == 2 else bt.BatchNorm2d
    module = cls(shape[1], momentum=0.1)
    with torch.no_grad():
        module.running_mean.copy_(torch.arange(3.0))
        module.num_batches_tracked.fill_(2**63 - 1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) + 5.0
    with pytest.raises(ValueError, match="num_batches_tracked"):
        module(x)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by the refused call"


def test_torch_module_below_the_counter_limit_counts_on():
    """Control: at 2**63 - 2 the batch is counted (2**63 - 1) and the statistics move."""
    torch = pytest.importorskip("torch")
    import batchnorm.torch as bt

    module = bt.BatchNorm1d(3, momentum=0.1)
    with torch.no_grad():
        module.num_batches_tracked.fill_(2**63 - 2)
    module(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) + 5.0)
    assert module.num_batches_tracked.item() == 2**63 - 1
    assert float(module.running_mean.min()) > 0.0


@pytest.mark.parametrize("channels", [8, 4095, 4096])
def test_jax_feature_with_an_inf_is_nan_whatever_the_feature_count(channels):
    """batchnorm.jax.batch_norm (training), float32, one +inf in feature 1. Its mean is inf
    and its variance NaN (inf - inf), so every x_hat of that feature is NaN: what
    flax.linen.BatchNorm, torch.nn and this library's NumPy path return, and what
    batchnorm.jax returns up to 4095 features. Expected: NaN for every row of feature 1.
    Seen from 4096 features (the many-feature check of the plain-or-shifted sums): -inf for
    the finite rows (NaN only at the inf itself), eagerly and under jit. A regression of
    today's changes: this test passes on f0275f2."""
    jax = pytest.importorskip("jax")
    import batchnorm.jax as bnj

    x = np.random.default_rng(0).standard_normal((16, channels)).astype(np.float32)
    x[2, 1] = np.inf
    zeros, ones = jax.numpy.zeros(channels), jax.numpy.ones(channels)
    y, _ = bnj.batch_norm(x, None, None, zeros, ones, training=True)
    y = np.asarray(y)
    assert np.isfinite(np.delete(y, 1, axis=1)).all()  # control: the others are untouched
    assert np.isnan(y[:, 1]).all(), y[:4, 1]


def test_a_timeout_beyond_float_range_gets_the_timeout_message():
    """MpiReducer(comm, timeout=10**400) and layer.timeout = 10**400: a Python int no float
    holds. Expected: the checked setter's own error (TypeError/ValueError 'timeout must be
    ...'), as for timeout=inf or nan, and as eps=10**400 gets ('eps must be finite').
    Seen: a raw OverflowError 'int too large to convert to float' (nothing changed)."""
    mpi4py = pytest.importorskip("mpi4py.MPI")
    from batchnorm.distributed import MpiReducer

    with pytest.raises(ValueError, match="timeout must be"):  # control: inf is checked
        MpiReducer(mpi4py.COMM_SELF, float("inf"))
    with pytest.raises((ValueError, TypeError), match="timeout must be"):
        MpiReducer(mpi4py.COMM_SELF, 10**400)


def test_sync_position_takes_a_numpy_integer_like_the_other_integer_arguments():
    """layer.sync_position = np.int64(7) (e.g. a position computed with NumPy). num_features
    and axis accept NumPy integers. Expected: position 7 taken (or, if only Python ints are
    meant, a TypeError that says so). Seen: ValueError 'sync_position must be an integer
    >= 0; got np.int64(7)', which is an integer >= 0 (misleading); nothing changed."""

    class Distributed(LocalReducer):
        distributed = True

    layer = bn.BatchNorm(3, reducer=Distributed())
    free = layer.sync_position + 10_000
    layer.sync_position = free  # control: a Python int is taken
    assert layer.sync_position == free
    try:
        layer.sync_position = np.int64(free + 1)
    except TypeError:
        return  # a clear refusal of NumPy integers would do too
    assert layer.sync_position == free + 1


@pytest.mark.parametrize("channels", [8, 4096])
def test_jax_ghost_virtual_batch_with_an_inf_is_nan_whatever_the_feature_count(channels):
    """batchnorm.jax.ghost_batch_norm (virtual batches of 16), one +inf in feature 1 of the
    first virtual batch. Expected: NaN for all 16 rows of that virtual batch in feature 1
    (its mean is inf, its variance NaN), the other virtual batches finite. Seen from 4096
    features: -inf for the finite rows. Passes on f0275f2 (a regression of today's
    changes); passes at 8 features (control)."""
    jax = pytest.importorskip("jax")
    import batchnorm.jax as bnj

    x = np.random.default_rng(0).standard_normal((64, channels)).astype(np.float32)
    x[2, 1] = np.inf
    zeros, ones = jax.numpy.zeros(channels), jax.numpy.ones(channels)
    y = bnj.ghost_batch_norm(x, None, None, zeros, ones, training=True, virtual_batch_size=16)[0]
    y = np.asarray(y)
    assert np.isfinite(y[16:, 1]).all()  # control: the other virtual batches
    assert np.isnan(y[:16, 1]).all(), y[:4, 1]
