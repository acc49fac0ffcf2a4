"""Flax's own BatchNorm tests, ported: each runs on Flax's class (the control, which must
pass for the test to mean anything) and on batchnorm.flax's.

Ported from google/flax (written anew here, not copied): tests/linen/linen_test.py
(NormalizationTest.test_batch_norm, test_batch_norm_complex, test_batch_norm_multi_init),
tests/linen/linen_transforms_test.py (test_vmap_batchnorm), tests/nnx/nn/normalization_test.py
(test_nnx_linen_batchnorm_equivalence), tests/nnx/module_test.py (test_set_attributes,
test_view, the train/eval modes) and tests/nnx/integration_test.py (a jitted training step).
Where this library deliberately differs (``mask``, complex inputs) the port asserts our
clear refusal instead, next to the control's behaviour.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
jnp = jax.numpy
bfl = pytest.importorskip("batchnorm.flax.linen")
bfx = pytest.importorskip("batchnorm.flax.nnx")

LINEN = {"flax": nn.BatchNorm, "ours": bfl.BatchNorm}
NNX = {"flax": nnx.BatchNorm, "ours": bfx.BatchNorm}
impls = pytest.mark.parametrize("impl", ["flax", "ours"])


@impls
def test_batch_norm_normalizes_and_moves_the_running_statistics(impl):
    key1, key3 = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(key1, (4, 3, 2))
    model = LINEN[impl](momentum=0.9, use_running_average=False)
    y, variables = model.init_with_output(key3, x)
    np.testing.assert_allclose(y.mean((0, 1)), [0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(y.var((0, 1)), [1.0, 1.0], rtol=1e-4)
    # init does not move the running statistics; apply does, once
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], [0.0, 0.0])
    _, out = model.apply(variables, x, mutable=["batch_stats"])
    ema = out["batch_stats"]
    np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1)), atol=1e-4)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1)), rtol=1e-4)


def test_batch_norm_mask_works_in_flax_and_is_refused_clearly_by_ours():
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key1, (4, 3, 2))
    m = jax.random.randint(key2, (4, 3, 1), 0, 2).astype(bool)
    x = jnp.where(m, x, jnp.nan)
    y, _ = nn.BatchNorm(momentum=0.9, use_running_average=False).init_with_output(key3, x, mask=m)
    np.testing.assert_allclose(y.mean((0, 1), where=m), [0.0, 0.0], atol=1e-4)  # control
    with pytest.raises(NotImplementedError, match="mask"):
        bfl.BatchNorm(momentum=0.9, use_running_average=False).init_with_output(key3, x, mask=m)
    with pytest.raises(NotImplementedError, match="mask"):
        bfx.BatchNorm(2, rngs=nnx.Rngs(0))(x, mask=m)


def test_batch_norm_complex_works_in_flax_and_is_refused_clearly_by_ours():
    key1, key3 = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(key1, (4, 3, 2), dtype=jnp.complex64)
    kw = {"momentum": 0.9, "use_running_average": False, "dtype": jnp.complex64}
    y, _ = nn.BatchNorm(**kw).init_with_output(key3, x)
    assert y.mean((0, 1)).dtype == jnp.complex64  # control
    with pytest.raises(TypeError, match="complex64"):
        bfl.BatchNorm(**kw).init_with_output(key3, x)


@impls
def test_batch_norm_multi_init_with_an_unbound_axis_name(impl):
    cls = LINEN[impl]

    class Foo(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = cls(name="norm", use_running_average=False, axis_name="batch")
            x = norm(x)
            return x, norm(x)

    x = jax.random.normal(jax.random.key(1), (2, 4))
    (y1, y2), _ = Foo().init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y2, rtol=0.005)


@impls
def test_vmap_batchnorm_equals_the_flat_batch(impl):
    cls = LINEN[impl]
    key1, key2, key3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.uniform(key1, (4, 4))
    x2 = jax.random.uniform(key2, (5, 4, 4))

    class MlpBn(nn.Module):
        axis_name: object = None

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(3)(x)
            return cls(axis_name=self.axis_name, use_running_average=False)(x)

    vmapped = nn.vmap(
        MlpBn,
        in_axes=(0,),
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )(axis_name="batch")
    variables = MlpBn().init(key3, x)
    y1, s1 = MlpBn().apply(variables, x2.reshape((-1, 4)), mutable=["batch_stats"])
    y2, s2 = vmapped.apply(variables, x2, mutable=["batch_stats"])
    np.testing.assert_allclose(y1.reshape((5, 4, 3)), y2, atol=1e-5)
    np.testing.assert_allclose(s1["batch_stats"]["BatchNorm_0"]["mean"],
                               s2["batch_stats"]["BatchNorm_0"]["mean"], atol=1e-6)  # fmt: skip


def _nnx_linen_pair(impl, dtype, param_dtype):
    lin_cls, nnx_cls = LINEN[impl], NNX[impl]

    class NNXModel(nnx.Module):
        def __init__(self, rngs):
            self.norm_layer = nnx_cls(
                5, use_running_average=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            self.linear = nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def __call__(self, x):
            return self.linear(self.norm_layer(x))

    class LinenModel(nn.Module):
        def setup(self):
            self.norm_layer = lin_cls(
                use_running_average=False, dtype=dtype, param_dtype=param_dtype
            )
            self.linear = nn.Dense(4, dtype=dtype, param_dtype=param_dtype)

        def __call__(self, x):
            return self.linear(self.norm_layer(x))

    return NNXModel(nnx.Rngs(42)), LinenModel()


@impls
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
def test_nnx_and_linen_batchnorm_compute_the_same(impl, dtype, param_dtype, request):
    if impl == "flax" and dtype == jnp.float16:
        request.applymarker(
            pytest.mark.xfail(
                reason="the control: with dtype=float16 the installed flax's linen BatchNorm "
                "normalizes in float32 and casts, its nnx BatchNorm casts x to float16 "
                "first, so the two differ by float16 roundings; ours compute alike",
                strict=True,
            )
        )
    nnx_model, linen_model = _nnx_linen_pair(impl, dtype, param_dtype)
    x = jax.random.normal(jax.random.key(0), (10, 5))
    variables = linen_model.init(jax.random.key(1), x)
    linen_out, stats = linen_model.apply(variables, x, mutable=["batch_stats"])
    nnx_model.linear.kernel[...] = variables["params"]["linear"]["kernel"]
    nnx_model.linear.bias[...] = variables["params"]["linear"]["bias"]
    nnx_out = nnx_model(x)
    np.testing.assert_array_equal(linen_out, nnx_out)
    np.testing.assert_array_equal(
        stats["batch_stats"]["norm_layer"]["var"], nnx_model.norm_layer.var[...]
    )


def _block(impl):
    cls = NNX[impl]

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(2, 10, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
            self.batch_norm = cls(10, use_running_average=False, rngs=rngs)

        def __call__(self, x):
            return self.dropout(self.batch_norm(self.linear(x)))

    return Block(nnx.Rngs(0))


@impls
def test_set_attributes_view_train_and_eval(impl):
    block = _block(impl)
    assert block.batch_norm.use_running_average is False
    block.set_attributes(deterministic=True, use_running_average=True)
    assert block.batch_norm.use_running_average is True
    block = _block(impl)
    block.set_attributes(nnx.Dropout, deterministic=True)  # only the dropout changes
    assert block.batch_norm.use_running_average is False
    view = nnx.view(block, use_running_average=True)
    assert view.batch_norm.use_running_average is True
    assert view.linear.kernel is block.linear.kernel
    block.eval()
    assert block.batch_norm.use_running_average is True
    block.train()
    assert block.batch_norm.use_running_average is False


@impls
def test_jitted_nnx_training_step_then_eval(impl):
    block = _block(impl)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    target = jax.random.normal(jax.random.key(1), (8, 10))

    @nnx.jit
    def train_step(model, x, target):
        def loss_fn(model):
            return jnp.mean((model(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
        return loss

    mean0 = np.asarray(block.batch_norm.mean[...])
    losses = [float(train_step(block, x, target)) for _ in range(3)]
    assert not np.array_equal(mean0, block.batch_norm.mean[...])  # the statistics moved
    assert np.all(np.isfinite(losses))
    block.eval()
    frozen = np.asarray(block.batch_norm.mean[...])
    nnx.jit(lambda m, x: m(x))(block, x)
    np.testing.assert_array_equal(frozen, block.batch_norm.mean[...])  # eval leaves them
