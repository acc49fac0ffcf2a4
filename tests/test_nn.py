"""Gradient checks for every module of the tiny toolkit, the loss and SGD."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.gradcheck import numerical_gradient, relative_error
from batchnorm.nn import (
    SGD,
    Linear,
    NoisyShift,
    ReLU,
    Sequential,
    Sigmoid,
    accuracy,
    softmax_cross_entropy,
)


def _check_module(module, x, rng, tol=1e-7):
    y = module.forward(x, training=True)
    dy = rng.standard_normal(y.shape)
    dx = module.backward(dy)
    num = numerical_gradient(lambda t: module.forward(t, training=True), x, dy)
    assert relative_error(dx, num) < tol
    module.forward(x, training=True)
    module.backward(dy)
    for name, p in module.parameters().items():
        g = module.gradients()[name]

        def f(v, p=p):
            saved = p.copy()
            p[...] = v
            out = module.forward(x, training=True)
            p[...] = saved
            return out

        assert relative_error(g, numerical_gradient(f, p.copy(), dy)) < tol, name


def test_linear_gradients(rng):
    _check_module(Linear(5, 4, rng=rng, std=0.5), rng.standard_normal((6, 5)) * 2 + 1, rng)
    _check_module(Linear(5, 4, rng=rng, bias=False), rng.standard_normal((6, 5)), rng)


def test_sigmoid_and_relu_gradients(rng):
    _check_module(Sigmoid(), rng.standard_normal((5, 4)) * 3, rng)
    x = rng.standard_normal((5, 4))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    _check_module(ReLU(), x, rng)


def test_sigmoid_is_stable_on_tails():
    y = Sigmoid().forward(np.array([[-1000.0, 0.0, 1000.0]]))
    np.testing.assert_array_equal(y, [[0.0, 0.5, 1.0]])


def test_noisy_shift_gradient_with_fixed_noise(rng):
    layer = NoisyShift(np.random.default_rng(3))
    x = rng.standard_normal((6, 4))
    y = layer.forward(x, training=True)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    s = layer._s
    m = y - s * x
    num = numerical_gradient(lambda t: s * t + m, x, dy)  # the same noise draw, held fixed
    assert relative_error(dx, num) < 1e-9
    assert np.array_equal(layer.forward(x, training=False), x)  # identity outside training


def test_noisy_shift_statistics():
    layer = NoisyShift(np.random.default_rng(0))
    x = np.zeros((4000, 3))
    y = layer.forward(x, training=True)  # a <- s * 0 + m: the shifts alone
    mu = y.mean(0)
    assert np.all(np.abs(mu) <= 0.5 + 1e-9) and np.all(y.std(0) < 0.07)
    s = layer._s.mean(0)
    assert np.all((s > 0.98) & (s < 1.27))


def test_sequential_with_batchnorm_gradients(rng):
    net = Sequential(
        Linear(4, 5, rng=rng, bias=False), bn.BatchNorm(5), Sigmoid(), Linear(5, 3, rng=rng)
    )
    net.modules[1].gamma[:] = rng.uniform(0.5, 1.5, 5)
    x = rng.standard_normal((7, 4)) * 2 + 3
    y = net.forward(x, training=True, update_stats=False)
    dy = rng.standard_normal(y.shape)
    dx = net.backward(dy)
    num = numerical_gradient(lambda t: net.forward(t, training=True, update_stats=False), x, dy)
    assert relative_error(dx, num) < 1e-7
    assert net.modules[1].num_batches_tracked == 0
    assert set(net.parameters()) == {"0.W", "1.gamma", "1.beta", "3.W", "3.b"}
    assert set(net.gradients()) == set(net.parameters())


def test_softmax_cross_entropy(rng):
    logits = rng.standard_normal((6, 4)) * 3
    labels = rng.integers(0, 4, 6)
    loss, dlogits = softmax_cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(6), labels]).mean(), rel=1e-12)

    def f(z):
        return np.array(softmax_cross_entropy(z, labels)[0])

    num = numerical_gradient(f, logits, np.array(1.0))
    assert relative_error(dlogits, num) < 1e-7
    big, _ = softmax_cross_entropy(np.array([[1000.0, 0.0]]), np.array([1]))
    assert big == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy(logits, np.full(6, 4))
    assert accuracy(np.eye(3), np.array([0, 1, 0])) == pytest.approx(2 / 3)


def test_sgd_plain_and_momentum(rng):
    lin = Linear(2, 1, rng=rng)
    w0 = lin.W.copy()
    lin.dW, lin.db = np.ones_like(lin.W), np.ones_like(lin.b)
    SGD(lin, lr=0.1).step()
    np.testing.assert_allclose(lin.W, w0 - 0.1)
    opt = SGD(lin, lr=0.1, momentum=0.5)
    w1 = lin.W.copy()
    opt.step()
    opt.step()  # v = 1, then 1.5
    np.testing.assert_allclose(lin.W, w1 - 0.1 * (1 + 1.5))
    with pytest.raises(ValueError, match="learning rate"):
        SGD(lin, lr=-1)


def test_sgd_learns_a_separable_problem(rng):
    x = rng.standard_normal((200, 2))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    net = Sequential(Linear(2, 8, rng=rng), bn.BatchNorm(8), ReLU(), Linear(8, 2, rng=rng))
    opt = SGD(net, lr=0.5, momentum=0.9)
    for _ in range(100):
        _, d = softmax_cross_entropy(net.forward(x, training=True), y)
        net.backward(d)
        opt.step()
    assert accuracy(net.forward(x, training=False), y) > 0.95


def test_backward_before_forward_is_an_error(rng):
    with pytest.raises(ValueError, match="before any forward"):
        Linear(2, 2, rng=rng).backward(np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"\(N, 2\).*\(3, 5\)"):
        Linear(2, 2, rng=rng).forward(np.ones((3, 5)))


def test_nn_building_blocks_check_their_arguments():
    from batchnorm.nn import Linear, Sequential, softmax_cross_entropy

    rng = np.random.default_rng(0)
    for kwargs, error in (
        ({"in_features": 0, "out_features": 3}, ValueError),
        ({"in_features": 3.5, "out_features": 2}, TypeError),
        ({"in_features": True, "out_features": 2}, TypeError),
        ({"in_features": 3, "out_features": 2, "std": -1.0}, ValueError),
        ({"in_features": 3, "out_features": 2, "std": float("nan")}, ValueError),
        ({"in_features": 3, "out_features": 2, "bias": "no"}, TypeError),
    ):
        with pytest.raises(error):
            Linear(rng=rng, **kwargs)
    with pytest.raises(TypeError, match="Generator"):
        Linear(3, 2, rng=None)
    with pytest.raises(TypeError, match="modules"):
        Sequential("x")
    with pytest.raises(TypeError, match="integers"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="empty"):
        softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, int))
