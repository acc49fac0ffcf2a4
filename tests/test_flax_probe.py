"""A hostile user's cases against batchnorm.jax and batchnorm.flax that once went wrong
(running statistics that took an overflow, an unchecked renorm momentum, a non-floating
``dtype`` field blamed on ``x``), and gradient checks against finite differences
(``jax.test_util.check_grads``), with Flax or finite differences as the oracle and
negative controls."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
jnp = jax.numpy
bnj = pytest.importorskip("batchnorm.jax")
bfl = pytest.importorskip("batchnorm.flax.linen")
bfx = pytest.importorskip("batchnorm.flax.nnx")
from jax.test_util import check_grads  # noqa: E402

F32_MAX = float(np.finfo(np.float32).max)


def _huge_column(seed=0):
    """(32, 2) float32: column 0 spread over about 1e25 (its variance, 1e50, overflows
    float32 but not float64), column 1 ordinary."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((32, 2))
    x[:, 0] *= 1e25
    return jnp.asarray(x, jnp.float32)


def _run(kind, x, momentum=0.5):
    """``(new running mean, new running var)`` of ``kind`` after one training step on
    ``x`` from mean 0, var 1."""
    zeros, ones = jnp.zeros(2, jnp.float32), jnp.ones(2, jnp.float32)
    if kind == "batch_norm":
        return bnj.batch_norm(x, None, None, zeros, ones, training=True, momentum=momentum)[1]
    if kind == "ghost_batch_norm":
        out = bnj.ghost_batch_norm(
            x, None, None, zeros, ones, training=True, virtual_batch_size=16, momentum=momentum
        )
        return out[1]
    if kind in ("linen", "linen_renorm"):
        cls = bfl.BatchNorm if kind == "linen" else bfl.BatchRenorm
        mdl = cls(use_running_average=False, momentum=momentum)
        v = mdl.init(jax.random.key(0), x)
        stats = mdl.apply(v, x, mutable=["batch_stats"])[1]["batch_stats"]
        return stats["mean"], stats["var"]
    cls = bfx.BatchNorm if kind == "nnx" else bfx.BatchRenorm
    mdl = cls(2, momentum=momentum, rngs=nnx.Rngs(0))
    mdl(x)
    return mdl.mean[...], mdl.var[...]


KINDS = ["batch_norm", "ghost_batch_norm", "linen", "linen_renorm", "nnx", "nnx_renorm"]


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_running_statistics_never_take_a_variance_that_overflows_them(kind, x64):
    x = _huge_column()
    xd = np.asarray(x, np.float64)
    var0 = xd[:, 0].var()
    assert np.isfinite(var0) and var0 > F32_MAX  # the case: finite in float64 only
    with jax.enable_x64(x64):
        mean, var = (np.asarray(v) for v in _run(kind, x))
    assert mean.dtype == var.dtype == np.float32
    # the overflowing feature keeps both its running statistics, exactly
    assert (mean[0], var[0]) == (0.0, 1.0)
    # control: the ordinary feature moves (0.5 old + 0.5 batch)
    if kind.startswith("ghost"):
        bvar = np.mean([xd[:16, 1].var(), xd[16:, 1].var()])
    else:
        bvar = xd[:, 1].var()
    np.testing.assert_allclose(mean[1], 0.5 * xd[:, 1].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[1], 0.5 + 0.5 * bvar, rtol=1e-5)


def test_an_ordinary_large_batch_still_moves_the_running_statistics():
    """Control for the test above: a variance of 1e36 fits float32 and is taken."""
    x = _huge_column() * 1e-7
    with jax.enable_x64(True):
        mean, var = (np.asarray(v) for v in _run("batch_norm", x))
    xd = np.asarray(x, np.float64)
    np.testing.assert_allclose(var[0], 0.5 + 0.5 * xd[:, 0].var(), rtol=1e-5)
    np.testing.assert_allclose(mean[0], 0.5 * xd[:, 0].mean(), rtol=1e-5)


@pytest.mark.parametrize("momentum", [2.0, -0.5, float("nan"), None, "0.9"])
def test_renorm_modules_check_momentum_before_changing_anything(momentum):
    x = jax.random.normal(jax.random.key(1), (8, 3))
    mdl = bfx.BatchRenorm(3, momentum=momentum, rngs=nnx.Rngs(0))
    before = jax.tree_util.tree_map(np.asarray, nnx.state(mdl))
    with pytest.raises((TypeError, ValueError), match="momentum"):
        mdl(x)
    after = jax.tree_util.tree_map(np.asarray, nnx.state(mdl))
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)
    with pytest.raises((TypeError, ValueError), match="momentum"):
        bfl.BatchRenorm(use_running_average=False, momentum=momentum).init(jax.random.key(0), x)


def test_renorm_modules_accept_a_momentum_in_range():
    """Control: momentum 0 takes the batch statistics, as BatchNorm does."""
    x = jax.random.normal(jax.random.key(1), (8, 3)) + 2.0
    mdl = bfx.BatchRenorm(3, momentum=0.0, rngs=nnx.Rngs(0))
    mdl(x)
    np.testing.assert_allclose(mdl.mean[...], np.asarray(x).mean(0), rtol=1e-6)
    lin = bfl.BatchRenorm(use_running_average=False, momentum=0.0)
    stats = lin.apply(lin.init(jax.random.key(0), x), x, mutable=["batch_stats"])[1]
    np.testing.assert_array_equal(stats["batch_stats"]["mean"], mdl.mean[...])


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_a_non_floating_dtype_field_is_named_in_the_error(dtype):
    x = jnp.ones((4, 3))
    name = jnp.dtype(dtype).name
    with pytest.raises(TypeError, match=f"dtype={name}"):
        bfl.BatchNorm(use_running_average=False, dtype=dtype).init(jax.random.key(0), x)
    mdl = bfx.BatchNorm(3, dtype=dtype, rngs=nnx.Rngs(0))
    before = np.asarray(mdl.mean[...])
    with pytest.raises(TypeError, match=f"dtype={name}"):
        mdl(x)
    np.testing.assert_array_equal(mdl.mean[...], before)
    # control: a floating dtype field is honoured
    assert bfx.BatchNorm(3, dtype=jnp.float16, rngs=nnx.Rngs(0))(x).dtype == jnp.float16


def _grad_inputs():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((10, 3)) * 2 + 3, jnp.float64)
    g = jnp.asarray([0.5, 1.0, 1.5], jnp.float64)
    b = jnp.asarray([-1.0, 0.0, 1.0], jnp.float64)
    return x, g, b, jnp.full(3, 0.3, jnp.float64), jnp.full(3, 1.7, jnp.float64)


def test_check_grads_of_the_functions_against_finite_differences():
    with jax.enable_x64(True):
        x, g, b, m, v = _grad_inputs()
        kw = dict(order=2, modes=["rev"], atol=1e-6, rtol=1e-6)
        check_grads(lambda *a: bnj.batch_norm(*a, m, v, training=True)[0], (x, g, b), **kw)
        check_grads(lambda *a: bnj.batch_norm(*a, training=False)[0], (x, g, b, m, v), **kw)
        check_grads(
            lambda *a: bnj.ghost_batch_norm(*a, m, v, training=True, virtual_batch_size=4)[0],
            (x, g, b),
            **kw,
        )
        # renorm with both limits binding (running std 0.1: sigma_B / sigma and
        # |mu_B - mu| / sigma are about 20 and 27): r and d are then constants in truth too
        s = jnp.full(3, 0.1, jnp.float64)
        check_grads(
            lambda *a: bnj.batch_renorm(*a, m, s, training=True, rmax=1.05, dmax=0.01)[0],
            (x, g, b),
            order=1,
            modes=["rev"],
        )
        check_grads(
            lambda *a: bnj.batch_renorm(*a, m, v, training=False, rmax=3.0, dmax=5.0)[0],
            (x, g, b),
            order=1,
            modes=["rev"],
        )


def test_renorm_gradient_treats_r_and_d_as_constants():
    """Negative control of the renorm check above: with limits that do not bind, the
    true derivative includes r's and d's dependence on x, which batch renorm's backward
    pass leaves out by design (Ioffe 2017), so finite differences disagree."""
    with jax.enable_x64(True):
        x, g, b, m, v = _grad_inputs()
        with pytest.raises(AssertionError):
            check_grads(
                lambda xx: bnj.batch_renorm(xx, g, b, m, v, training=True, rmax=9.0, dmax=9.0)[0],
                (x,),
                order=1,
                modes=["rev"],
            )


@pytest.mark.parametrize("cls", [bfl.BatchNorm, bfl.BatchRenorm])
def test_check_grads_of_the_linen_modules(cls):
    with jax.enable_x64(True):
        x, *_ = _grad_inputs()
        kwargs = dict(r_max=1.05, d_max=0.01) if cls is bfl.BatchRenorm else {}
        mdl = cls(use_running_average=False, param_dtype=jnp.float64, **kwargs)
        v = mdl.init(jax.random.key(0), x)
        # running std 0.1: renorm's limits bind (r and d are constants in truth too)
        stats = dict(v["batch_stats"], mean=jnp.full(3, -2.0), var=jnp.full(3, 0.01))

        def f(xx, params):
            return mdl.apply({"params": params, "batch_stats": stats}, xx, mutable=True)[0]

        check_grads(f, (x, v["params"]), order=1, modes=["rev"])


@pytest.mark.parametrize("kind", ["function", "nnx"])
def test_float64_data_at_1e12_with_spread_1e_3_is_exact(kind):
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((1024, 4)) * 1e-3 + 1e12, jnp.float64)
        xd = np.asarray(x)
        c = xd - xd[0]  # exact (Sterbenz): the reference carries no rounding of 1e12
        ref = (c - c.mean(0)) / c.std(0)
        if kind == "function":
            z, o = jnp.zeros(4, jnp.float32), jnp.ones(4, jnp.float32)
            y = bnj.batch_norm(x, None, None, z, o, training=True, eps=0.0)[0]
        else:
            y = bfx.BatchNorm(4, epsilon=0.0, param_dtype=jnp.float64, rngs=nnx.Rngs(0))(x)
        assert y.dtype == jnp.float64
        assert np.max(np.abs(np.asarray(y) - ref)) < 1e-12
        # control: Flax's E[x^2] - E[x]^2 loses every digit here
        fy = nnx.BatchNorm(4, epsilon=0.0, param_dtype=jnp.float64, rngs=nnx.Rngs(0))(x)
        assert not np.max(np.abs(np.asarray(fy) - ref)) < 1e-3


@pytest.mark.parametrize("cls", [bfx.BatchNorm, bfx.BatchRenorm])
def test_nnx_threads_training_one_module_lose_no_update(cls):
    """Four threads, five eager training steps each, on one module: all 20 updates are
    counted, bit-identical to 20 sequential steps (every step sees the same batch, so the
    order does not matter). Without the lock the threads read the same old statistics and
    updates were lost (the mean was off by 0.03 here)."""
    import threading

    x = jax.random.normal(jax.random.key(5), (64, 4)) + 1.0
    shared, ref = cls(4, rngs=nnx.Rngs(0)), cls(4, rngs=nnx.Rngs(0))
    shared(x), ref(x)  # compile once before the threads start
    errors = []

    def work():
        try:
            for _ in range(5):
                shared(x)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(20):
        ref(x)
    assert errors == []
    np.testing.assert_array_equal(shared.mean[...], ref.mean[...])
    np.testing.assert_array_equal(shared.var[...], ref.var[...])
    if cls is bfx.BatchRenorm:
        assert int(shared.steps[...]) == int(ref.steps[...]) == 21
