"""The fixes of issue 24 for JAX users: the Array API path under ``jax.grad`` with concrete
parameters closed over, float16 running statistics, the message for ``jax.grad`` outside a
named ``vmap``; and the compiled pass counts and exactness of :mod:`batchnorm.jax`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
bnj = pytest.importorskip("batchnorm.jax")
from batchnorm.functional import batch_norm_train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import jax_flax  # noqa: E402


def _x(shape=(12, 3), offset=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * 1.5 + offset, jnp.float32)


def test_array_api_path_under_grad_with_closed_over_parameters():
    x = _x()
    g, b = jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.0, 1.0, -1.0])

    def loss(x):
        y, _ = batch_norm_train(x, g, b)
        return jnp.sum(y**3)

    eager, jitted = jax.grad(loss)(x), jax.jit(jax.grad(loss))(x)

    def ours_loss(x):
        return jnp.sum(bnj.batch_norm(x, g, b, jnp.zeros(3), jnp.ones(3), training=True)[0] ** 3)

    ours = jax.grad(ours_loss)(x)
    np.testing.assert_allclose(eager, jitted, rtol=2e-6, atol=1e-5)
    np.testing.assert_allclose(eager, ours, rtol=2e-6, atol=1e-5)


def test_a_real_device_mismatch_is_still_refused():
    from batchnorm._xp import check_same_device

    class Fake:
        def __init__(self, dev):
            self.device = dev

    check_same_device("x", Fake(None), "gamma", Fake("cpu"))  # unknown: accepted
    with pytest.raises(ValueError, match="x is on device 'gpu' but gamma is on device 'cpu'"):
        check_same_device("x", Fake("gpu"), "gamma", Fake("cpu"))


@pytest.mark.parametrize("fn", ["batch_norm", "batch_renorm", "ghost_batch_norm"])
def test_float16_running_statistics_are_refused_and_float32_ones_hold_large_values(fn):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 2)) * 400 + 3e4, jnp.float16)
    kw = {"training": True}
    if fn == "batch_renorm":
        kw.update(rmax=3.0, dmax=5.0)
    if fn == "ghost_batch_norm":
        kw.update(virtual_batch_size=4)
    f = getattr(bnj, fn)
    half = (jnp.zeros(2, jnp.float16), jnp.ones(2, jnp.float16))
    with pytest.raises(TypeError, match="float16.*float32"):
        f(x, None, None, *half, **kw)
    y, (m, v) = f(x, None, None, jnp.zeros(2), jnp.ones(2), momentum=0.0, **kw)
    assert y.dtype == jnp.float16 and m.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(m))) and bool(jnp.all(jnp.isfinite(v)))
    assert float(jnp.max(m)) > 6.5e4 / 3  # a mean of 3e4: float16 would have held it...
    if fn != "batch_renorm":
        assert float(jnp.max(v)) > 65504  # ...but not a variance of 1.6e5


def test_grad_outside_a_named_vmap_gets_a_clear_message_and_inside_works():
    x = _x((4, 8, 3))
    g, b, rm, rv = jnp.ones(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3)

    def f(xi):
        return bnj.batch_norm(xi, g, b, rm, rv, training=True, axis_name="batch")[0]

    def loss(x):
        return jnp.sum(jax.vmap(f, axis_name="batch")(x) ** 3)

    with pytest.raises(ValueError, match="jax.grad outside jax.vmap.*axis_name"):
        jax.grad(loss)(x)
    inside = jax.vmap(jax.grad(lambda xi: jnp.sum(f(xi) ** 3)), axis_name="batch")(x)
    flat = jax.grad(lambda x: jnp.sum(bnj.batch_norm(x, g, b, rm, rv, training=True)[0] ** 3))(
        x.reshape(32, 3)
    )
    np.testing.assert_allclose(inside.reshape(32, 3), flat, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 256), (8, 6, 6, 16)])
def test_compiled_passes_are_no_more_than_flax(shape):
    pytest.importorskip("flax")
    size = int(np.prod(shape))
    x, scale, bias, w = jax_flax._data(shape)
    counts = {}
    for name, fwd in jax_flax.contenders(shape).items():
        f = jax.jit(fwd).lower(x, scale, bias).compile().as_text()
        g = jax.jit(jax_flax._grad_of(fwd)).lower(x, scale, bias, w).compile().as_text()
        counts[name] = (jax_flax.count_passes(f, size), jax_flax.count_passes(g, size))
    flax_fwd, flax_grad = counts["flax.linen"]
    assert flax_fwd["reduction"] >= 1 and flax_fwd["elementwise"] >= 1  # the counter sees
    assert flax_fwd["fallback"] == {k: flax_fwd[k] for k in ("reduction", "elementwise")}
    for name in ("batch_norm", "batch_renorm", "ghost_batch_norm", "batchnorm.flax.linen"):
        fwd, grad = counts[name]
        assert fwd["reduction"] <= flax_fwd["reduction"], counts
        assert fwd["elementwise"] <= flax_fwd["elementwise"], counts
        assert _total(grad) <= _total(flax_grad), counts
        # the shifted sums, taken where a mean is far from zero: two more reductions
        assert fwd["fallback"] == {"reduction": fwd["reduction"] + 2, "elementwise": 1}, counts
        assert grad["fallback"]["reduction"] == grad["reduction"] + 2, counts


def _total(p) -> int:
    return p["reduction"] + p["elementwise"]


def test_pass_counter_follows_both_branches_of_a_conditional():
    x = _x((64, 256))

    def f(x):  # 1 reduction for the predicate, then 1 or 2 more
        one = lambda: jnp.sum(x, 0)  # noqa: E731
        two = lambda: jnp.sum(x, 0) + jnp.sum(x * x, 0)  # noqa: E731
        return jax.lax.cond(jnp.sum(x) > 0, one, two)

    counts = jax_flax.count_passes(jax.jit(f).lower(x).compile().as_text(), x.size)
    assert counts["reduction"] == 2 and counts["elementwise"] == 0, counts
    assert counts["fallback"] == {"reduction": 3, "elementwise": 0}, counts


def test_pass_counter_sees_a_written_out_temporary():
    """Negative control of count_passes: x - s shared by two reductions is written out."""
    x = _x((64, 256))

    def shared(x):
        d = x - x[:1]
        return jnp.sum(d, 0), jnp.sum(d * d, 0)

    counts = jax_flax.count_passes(jax.jit(shared).lower(x).compile().as_text(), x.size)
    assert counts["elementwise"] == 1 and counts["reduction"] == 2, counts


def test_float32_exact_at_mean_1e6_without_x64():
    if _has_flax():
        errs = jax_flax.exactness((1024, 16), 1e6)
        assert errs["batch_norm"] <= 1e-5 and errs["flax.linen"] > 1.0, errs
    x = _x((4096, 8), offset=1e6)
    x64 = np.asarray(x, np.float64)
    y, (m, v) = bnj.batch_norm(x, None, None, jnp.zeros(8), jnp.ones(8), training=True,
                               momentum=0.0)  # fmt: skip
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    assert float(np.max(np.abs(np.asarray(y, np.float64) - ref))) <= 1e-5
    np.testing.assert_allclose(np.asarray(v, np.float64), x64.var(0), rtol=1e-5)


def _has_flax() -> bool:
    try:
        import flax  # noqa: F401
    except ImportError:
        return False
    return True


def _stats_ref(x):
    x64 = np.asarray(x, np.float64)
    return x64.mean(0), x64.var(0)


@pytest.mark.parametrize("mean_over_std", [0.0, 1.0, 2.0, 2.5, 8.0, 1e6])
def test_both_paths_are_exact_on_either_side_of_the_switch(mean_over_std):
    """The plain sums (a mean within two standard deviations of zero) and the shifted sums
    (beyond) both give statistics, outputs and input gradients within float32 accuracy
    of float64; the predicate picks the plain path exactly where it is well conditioned."""
    from batchnorm._validation import layout
    from batchnorm.adapters.jax import _kernel

    rng = np.random.default_rng(7)
    shape, std = (2048, 32), 3.0
    x = jnp.asarray(rng.standard_normal(shape) * std + mean_over_std * std, jnp.float32)
    s1, s2 = _kernel.plain_sums(x, layout(shape, -1))
    plain = bool(_kernel.well_conditioned(s1, s2, shape[0]))
    m_ref, v_ref = _stats_ref(x)
    assert plain == bool(np.all(m_ref**2 <= _kernel.WELL * v_ref * (1 + 1e-3))), (m_ref, v_ref)
    g = jnp.asarray(rng.uniform(0.5, 1.5, 32), jnp.float32)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def f(x):
        y, (m, v) = bnj.batch_norm(x, g, None, jnp.zeros(32), jnp.ones(32), training=True,
                                   momentum=0.0)  # fmt: skip
        return jnp.sum(y * w), (y, m, v)

    dx, (y, m, v) = jax.jit(jax.grad(f, has_aux=True))(x)
    x64, g64, w64 = (np.asarray(a, np.float64) for a in (x, g, w))
    inv = 1.0 / np.sqrt(v_ref + 1e-5)
    xhat = (x64 - m_ref) * inv
    dxhat = w64 * g64
    dx_ref = inv * (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0))
    # (measured: y 5e-7 to 2.2e-6, var 1e-7 to 1e-6; the plain sums at mean/std 8 would be
    # 3.5e-5 and 1.7e-5, which is why that case takes the shifted sums)
    assert np.max(np.abs(np.asarray(y, np.float64) - xhat * g64)) <= 4e-6
    assert np.max(np.abs(np.asarray(v, np.float64) / v_ref - 1)) <= 2e-6
    assert np.max(np.abs(np.asarray(m, np.float64) - m_ref)) <= 2e-7 * (abs(m_ref).max() + std)
    assert np.max(np.abs(np.asarray(dx, np.float64) - dx_ref)) <= 4e-6 * np.abs(dx_ref).max()


@pytest.mark.parametrize("poison", [np.nan, np.inf, 3e19], ids=["nan", "inf", "square-overflows"])
def test_a_non_finite_sum_takes_the_shifted_path(poison):
    from batchnorm._validation import layout
    from batchnorm.adapters.jax import _kernel

    x = _x((64, 8), offset=0.0)
    x = x.at[5, 3].set(poison)
    s1, s2 = _kernel.plain_sums(x, layout(x.shape, -1))
    assert not bool(_kernel.well_conditioned(s1, s2, 64))
    clean = _x((64, 8), offset=0.0)
    s1, s2 = _kernel.plain_sums(clean, layout(clean.shape, -1))
    assert bool(_kernel.well_conditioned(s1, s2, 64))


def test_vmap_keeps_one_conditional_and_each_instance_its_result():
    """Under jax.vmap the predicate is the AND over the instances (unbatched), so the
    compiled module keeps a conditional; an instance far from zero sends every instance
    to the shifted sums, each still normalized with its own statistics."""
    xs = jnp.stack([_x((64, 16), offset=0.0, seed=s) for s in range(3)])
    xs = xs.at[2].add(1e6)
    z, o = jnp.zeros(16), jnp.ones(16)

    def f(x):
        return bnj.batch_norm(x, None, None, z, o, training=True)[0]

    text = jax.jit(jax.vmap(f)).lower(xs).compile().as_text()
    assert " conditional(" in text
    ys = jax.jit(jax.vmap(f))(xs)
    for i in range(3):
        np.testing.assert_allclose(ys[i], jax.jit(f)(xs[i]), atol=2e-6)
        x64 = np.asarray(xs[i], np.float64)
        ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
        assert np.max(np.abs(np.asarray(ys[i], np.float64) - ref)) <= 1e-5


@pytest.mark.parametrize("n_features", [64, 96, 2048])
def test_one_feature_far_from_zero_is_seen_beside_blocks_of_wide_features(n_features):
    """The check combines its blocks' maxima without letting one block's wide features
    (very negative margins) hide another block's feature far from zero: a sum of the
    maxima did, and normalized that feature from the plain sums, 9e2 off."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, n_features)).astype(np.float32)
    x[:, 0] += 1e4  # one feature far from zero, alone in its block
    x[:, 32:] *= 1e5  # every feature of the other blocks wide
    ones, zeros = jnp.ones(n_features), jnp.zeros(n_features)
    y = bnj.batch_norm(jnp.asarray(x), ones, zeros, zeros, ones, training=True)[0]
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    assert np.max(np.abs(np.asarray(y, np.float64) - ref)) <= 1e-5


@pytest.mark.parametrize("n_features", [4096, 40000])
def test_a_square_overflow_among_many_features_takes_the_shifted_path(n_features):
    """The check sees a NaN margin among thousands of features (XLA CPU's YNNPACK maximum
    drops NaNs: from 4096 features the batch took the plain sums, whose variance was
    inf - inf, and the feature came out NaN); here that feature (values near 1e19, whose
    squares overflow float32) is normalized from the shifted sums. The other features'
    results are checked too (negative control: the plain sums give NaN there)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, n_features)).astype(np.float32)
    x[:, 5] = (1e19 + 1e18 * rng.standard_normal(16)).astype(np.float32)
    ones, zeros = jnp.ones(n_features), jnp.zeros(n_features)
    y = jax.jit(lambda x: bnj.batch_norm(x, ones, zeros, zeros, ones, training=True)[0])(x)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    assert np.max(np.abs(np.asarray(y, np.float64) - ref)) <= 1e-5
    from batchnorm._validation import layout
    from batchnorm.adapters.jax import _kernel

    s1, s2 = _kernel.plain_sums(jnp.asarray(x), layout(x.shape, -1))
    assert not np.isfinite(np.asarray(s2)[0, 5])  # the plain sums cannot give feature 5
