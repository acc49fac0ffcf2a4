"""The range of float32 (and float64) data under JAX, for :mod:`batchnorm.jax` and the
Array API passes on JAX arrays: data near the ends of the range are summed again on data
scaled by a power of two (a ``jax.lax.cond``, so jit-able), squares lost to underflow
likewise, a variance that overflows the statistics dtype gives NaN outputs, and NaN
propagates through every max-based check (XLA CPU's maximum reduction drops NaNs)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
bnj = pytest.importorskip("batchnorm.jax")
from batchnorm.core import passes, sums  # noqa: E402

BIG = float(np.float32(3.4e38))


def _adapter(x, x64):
    """``(y, var)`` from batchnorm.jax.batch_norm under jit (eps 0, momentum 0: the new
    running variance is the batch variance where it is finite)."""
    c = x.shape[1]
    with jax.enable_x64(x64):
        dt = jnp.float64 if x64 else jnp.float32
        z, o = jnp.zeros(c, dt), jnp.ones(c, dt)

        def f(x):
            y, (_, v) = bnj.batch_norm(x, None, None, z, o, training=True, momentum=0.0, eps=0.0)
            return y, v

        y, v = jax.jit(f)(jnp.asarray(x))
        return np.asarray(y, np.float64), np.asarray(v, np.float64)


def _passes(x, x64):
    with jax.enable_x64(x64):
        f = jax.jit(functools.partial(passes.train, jnp, axes=1, eps=0.0))
        y, _, v, _ = f(jnp.asarray(x))
        return np.asarray(y, np.float64), np.asarray(v, np.float64)


def _ref(x):
    x64 = x.astype(np.float64)
    return (x64 - x64.mean(0)) / x64.std(0), x64.var(0)


PATHS = {"adapter": _adapter, "passes": _passes}


def _outlier(rng):
    """Squares overflow float32 (values 3e19 and 1e20) but the variance (~1e37) fits."""
    x = rng.standard_normal((1024, 3)).astype(np.float32)
    x[5] = [3e19, 1e20, 2.0]
    return x


def _small(rng):
    """Data of scale 3e-19: squares near or below float32's smallest normal (lost)."""
    return (rng.standard_normal((256, 3)) * 3e-19).astype(np.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make", [_outlier, _small], ids=["outlier", "small"])
def test_float32_statistics_survive_squares_out_of_range(path, make, rng):
    """Without x64 (float32 statistics): before, the outlier gave an infinite variance
    (y off by 32) and scale 3e-19 a variance 0.35-1.8% low; now rescaled sums."""
    x = make(rng)
    y, v = PATHS[path](x, False)
    y_ref, v_ref = _ref(x)
    np.testing.assert_allclose(v, v_ref, rtol=2e-6)
    assert np.max(np.abs(y - y_ref)) <= 5e-6


@pytest.mark.parametrize("path", PATHS)
def test_whole_float32_range_under_x64(path):
    """float32 data spanning [-3.4e38, 3.4e38] with float64 statistics: x - mean
    overflows float32, the rescaled sums give exact statistics and a finite y (the
    second feature is unaffected). The adapter keeps its running variance, whose float32
    cannot hold 1e77 (documented), so only y is checked there."""
    x = np.array([[BIG, 1.0], [BIG, 2.0], [-BIG, 4.0]] * 2, np.float32)
    y, v = PATHS[path](x, True)
    y_ref, v_ref = _ref(x)
    assert np.max(np.abs(y - y_ref)) <= 1e-6
    if path == "passes":
        np.testing.assert_allclose(v, v_ref, rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_a_variance_that_overflows_float32_gives_nan_outputs(path):
    """Without x64 a variance of 1e77 cannot be held: the feature's outputs are NaN (not
    beta, which a zero 1/std would give), the other feature is exact."""
    x = np.array([[BIG, 1.0], [BIG, 2.0], [-BIG, 4.0]] * 2, np.float32)
    y, _ = PATHS[path](x, False)
    y_ref, _ = _ref(x)
    assert np.isnan(y[:, 0]).all()
    assert np.max(np.abs(y[:, 1] - y_ref[:, 1])) <= 1e-6


def test_tiny_float32_data_under_x64_keep_their_variance(rng):
    """Scale 1e-25: float32 squares underflow to 0 (the passes returned variance 0);
    the rescaled sums give it to float32 accuracy (the adapter sums in float64)."""
    x = (rng.standard_normal((64, 3)) * 1e-25).astype(np.float32)
    _, v_ref = _ref(x)
    for path in PATHS.values():
        y, v = path(x, True)
        np.testing.assert_allclose(v, v_ref, rtol=1e-6)
        assert np.max(np.abs(y - _ref(x)[0])) <= 1e-5


def test_the_range_scale_treats_a_nan_as_infinite():
    """XLA CPU's maximum of 40,000 values drops a NaN (negative control, asserted so the
    test shows what it guards); the range scale of a NaN feature is then 1, not a scale
    chosen from its other values."""
    x = np.random.default_rng(1).standard_normal((40000, 2)).astype(np.float32)
    x[123, 1] = np.nan
    top = np.asarray(jax.jit(lambda v: jnp.max(jnp.abs(v), axis=0))(x))
    if np.isfinite(top[1]):  # the control: this backend's maximum dropped the NaN, and a
        # scale from that top (what range_scale did before) would not have been 1
        assert float(np.exp2(np.ceil(np.log2(top[1])) - 40.0)) != 1.0
    h = np.asarray(jax.jit(lambda v: sums.range_scale(jnp, v, (0,), jnp.float32))(x))
    assert np.ravel(h)[1] == 1.0 and np.ravel(h)[0] != 1.0


@pytest.mark.parametrize("offset", [0.0, 1e6], ids=["plain", "shifted"])
@pytest.mark.parametrize("path", PATHS)
def test_a_nan_in_x_gives_nan_outputs_for_its_feature_only(path, offset):
    """40,000 rows (where XLA CPU's maximum drops NaNs), beside a feature whose squares
    overflow float32 (so the rescaled sums run): the NaN feature's outputs are all NaN,
    the others finite and exact."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((40000, 3)) + offset).astype(np.float32)
    x[7, 1] = np.nan
    x[9, 2] = 1e20
    y, _ = PATHS[path](x, False)
    y_ref, _ = _ref(x)
    assert np.isnan(y[:, 1]).all()
    for j in (0, 2):
        assert np.max(np.abs(y[:, j] - y_ref[:, j])) <= 2e-5
