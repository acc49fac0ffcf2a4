"""Batch renorm, ghost and frozen batch norm against references and gradient checks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ref_eval, ref_train, snapshot

import batchnorm as bn
from batchnorm.gradcheck import numerical_gradient, relative_error
from batchnorm.variants import (
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    RenormSchedule,
    batch_renorm_backward,
    batch_renorm_eval,
    batch_renorm_train,
    ghost_slices,
)

pytestmark = pytest.mark.usefixtures("backend")


# ----------------------------------------------------------------------------- renorm
def test_renorm_with_unit_limits_is_batch_norm_exactly(rng):
    x = rng.standard_normal((16, 4, 3)) * 2 + 5
    g, b = rng.standard_normal(4), rng.standard_normal(4)
    mu, sigma = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    y, cache = batch_renorm_train(x, g, b, mu, sigma, rmax=1.0, dmax=0.0)
    y_bn, bn_cache = bn.batch_norm_train(x, g, b)
    np.testing.assert_array_equal(y, y_bn)
    dy = rng.standard_normal(x.shape)
    for a, c in zip(
        batch_renorm_backward(dy, cache), bn.batch_norm_backward(dy, bn_cache), strict=True
    ):
        np.testing.assert_array_equal(a, c)


def test_renorm_forward_hand_formula(rng):
    x = rng.standard_normal((32, 3)) * 3 + 1
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    mu, sigma = np.array([0.0, 1.0, 5.0]), np.array([1.0, 10.0, 0.5])
    y, cache = batch_renorm_train(x, g, b, mu, sigma, rmax=2.0, dmax=1.5, eps=1e-3)
    sb = np.sqrt(x.var(0) + 1e-3)
    r = np.clip(sb / sigma, 0.5, 2.0)
    d = np.clip((x.mean(0) - mu) / sigma, -1.5, 1.5)
    np.testing.assert_allclose(cache.r, r, rtol=1e-14)
    np.testing.assert_allclose(cache.d, d, rtol=1e-14)
    np.testing.assert_allclose(y, g * ((x - x.mean(0)) / sb * r + d) + b, atol=1e-12)
    assert np.any(r != sb / sigma) and np.any(d != (x.mean(0) - mu) / sigma)  # clipping bit


def test_renorm_gradients_treat_r_d_as_constants(rng):
    x = 5 * rng.standard_normal((6, 3)) + 12
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    mu, sigma = rng.standard_normal(3) + 12, rng.uniform(2, 8, 3)
    dy = rng.standard_normal(x.shape)
    _, cache = batch_renorm_train(x, g, b, mu, sigma, rmax=1.5, dmax=0.5)
    dx, dgamma, dbeta = batch_renorm_backward(dy, cache)
    r, d = cache.r, cache.d

    def f(t, g=g, b=b):  # the same map with r and d frozen at the forward values
        m, v = t.mean(0), t.var(0)
        return g * ((t - m) / np.sqrt(v + 1e-5) * r + d) + b

    assert relative_error(dx, numerical_gradient(f, x, dy)) < 1e-7
    assert relative_error(dgamma, numerical_gradient(lambda gg: f(x, g=gg), g, dy)) < 1e-7
    assert relative_error(dbeta, numerical_gradient(lambda bb: f(x, b=bb), b, dy)) < 1e-7


def test_renorm_layer_running_std_and_inference(rng):
    layer = BatchRenorm(3, rmax=3.0, dmax=5.0, momentum=0.9, eps=1e-3)
    mu, sigma = np.zeros(3), np.ones(3)
    for i in range(3):
        x = rng.standard_normal((20, 3)) * (1 + i) + i
        layer(x)
        mu = 0.9 * mu + 0.1 * x.mean(0)
        sigma = 0.9 * sigma + 0.1 * np.sqrt(x.var(0) + 1e-3)
    np.testing.assert_allclose(layer.running_mean, mu, rtol=1e-13)
    np.testing.assert_allclose(layer.running_std, sigma, rtol=1e-13)
    # sigma is stored like every layer's statistics: running_var = sigma^2 - eps
    np.testing.assert_allclose(layer.running_var, sigma**2 - 1e-3, rtol=1e-13)
    assert set(layer.state_dict()) == {
        "gamma",
        "beta",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    x = rng.standard_normal((5, 3))
    y = layer.eval()(x)
    np.testing.assert_allclose(y, (x - mu) / sigma, atol=1e-12)
    np.testing.assert_allclose(batch_renorm_eval(x, None, None, mu, sigma), y, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(layer.backward(dy), dy / sigma, rtol=1e-12)


def test_renorm_schedule_and_layer_bad_input(rng):
    s = RenormSchedule(warmup_steps=10, rmax=3.0, rmax_steps=30, dmax=5.0, dmax_steps=20)
    assert s(0) == (1.0, 0.0) and s(10) == (1.0, 0.0)
    assert s(20) == pytest.approx((2.0, 5.0)) and s(100) == (3.0, 5.0)
    layer = BatchRenorm(2, schedule=s)
    assert layer.limits() == (1.0, 0.0)
    layer(rng.standard_normal((8, 2)))
    before = snapshot(layer)
    with pytest.raises(ValueError, match="non-finite"):
        layer(np.array([[np.nan, 1.0], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(np.ones((1, 2)))
    assert snapshot(layer) == before
    with pytest.raises(ValueError, match="rmax"):
        BatchRenorm(2, rmax=0.5)
    bad = layer.state_dict()
    bad["running_var"] = np.array([1.0, -1.0])
    with pytest.raises(ValueError, match="negative"):
        layer.load_state_dict(bad)
    assert snapshot(layer) == before


# ----------------------------------------------------------------------------- ghost
def test_ghost_slices_uneven():
    assert ghost_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert ghost_slices(9, 4) == [slice(0, 4), slice(4, 9)]  # a lone remainder is merged
    assert ghost_slices(3, 8) == [slice(0, 3)]


def test_ghost_one_virtual_batch_is_batch_norm(rng):
    x = rng.standard_normal((12, 4, 5)) + 2
    ghost = GhostBatchNorm(4, virtual_batch_size=12)
    plain = bn.BatchNorm(4)
    np.testing.assert_array_equal(ghost(x), plain(x))
    np.testing.assert_array_equal(ghost.running_var, plain.running_var)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(ghost.backward(dy), plain.backward(dy))
    np.testing.assert_array_equal(ghost.dgamma, plain.dgamma)


def test_ghost_virtual_batches_and_gradients(rng):
    x = 5 * rng.standard_normal((10, 3)) + 12
    layer = GhostBatchNorm(3, virtual_batch_size=4, convention="torch")
    layer.gamma[:] = rng.standard_normal(3)
    y = layer(x)
    for sl in ghost_slices(10, 4):
        np.testing.assert_allclose(
            y[sl], ref_train(x[sl], layer.gamma, layer.beta, 1, 1e-5), atol=1e-12
        )
    # running stats: one update towards the size-weighted average of the virtual batches
    parts = [x[0:4], x[4:8], x[8:10]]
    w = np.array([4, 4, 2]) / 10
    mean = sum(wi * p.mean(0) for wi, p in zip(w, parts, strict=True))
    uvar = sum(wi * p.var(0, ddof=1) for wi, p in zip(w, parts, strict=True))
    np.testing.assert_allclose(layer.running_mean, 0.1 * mean, rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * uvar, rtol=1e-13)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    num = numerical_gradient(lambda t: layer.forward(t, update_stats=False), x, dy)
    assert relative_error(dx, num) < 1e-7


# ----------------------------------------------------------------------------- frozen
def test_frozen_from_trained_layer(rng):
    layer = bn.BatchNorm(3)
    for _ in range(3):
        layer(rng.standard_normal((8, 3, 2)) + 1)
    layer.gamma[:] = [1.0, -2.0, 0.5]
    frozen = FrozenBatchNorm.from_batchnorm(layer)
    x = rng.standard_normal((4, 3, 2))
    np.testing.assert_allclose(frozen(x), layer.eval()(x), atol=0)
    np.testing.assert_allclose(
        frozen(x),
        ref_eval(x, layer.gamma, layer.beta, layer.running_mean, layer.running_var, 1, 1e-5),
        atol=1e-13,
    )
    dy = rng.standard_normal(x.shape)
    dx = frozen.backward(dy)
    assert relative_error(dx, numerical_gradient(frozen.forward, x, dy)) < 1e-7
    layer.running_mean[:] = 100.0  # frozen holds copies
    assert np.abs(frozen.running_mean).max() < 100
    assert frozen.parameters() == {} and frozen.train() is frozen
    with pytest.raises(ValueError, match="negative"):
        FrozenBatchNorm.from_statistics(np.zeros(2), np.array([1.0, -1.0]))
    direct = FrozenBatchNorm.from_statistics(
        frozen.running_mean, frozen.running_var, frozen.gamma, frozen.beta, eps=1e-5
    )
    np.testing.assert_array_equal(direct(x), frozen(x))
