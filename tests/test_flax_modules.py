"""batchnorm.flax's modules against Flax's as the oracle: variables, outputs, gradients,
transforms, and where they deliberately differ (exactness at a large offset, non-finite
batches, unsupported options); BatchRenorm against its formulas and BatchNorm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
jnp = jax.numpy
bfl = pytest.importorskip("batchnorm.flax.linen")
bfx = pytest.importorskip("batchnorm.flax.nnx")
from batchnorm import RenormSchedule  # noqa: E402

HERE = Path(__file__).resolve().parent


def _x(shape=(16, 5), offset=3.0, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * 2 + offset, jnp.float32)


def _tree_spec(tree):
    return jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), tree)


@pytest.mark.parametrize("axis", [-1, 1, (1, 2)])
def test_linen_variables_load_both_ways_and_outputs_match_flax(axis):
    x = _x((6, 4, 3))
    theirs, ours = (
        nn.BatchNorm(use_running_average=False, axis=axis),
        bfl.BatchNorm(use_running_average=False, axis=axis),
    )
    v_theirs = theirs.init(jax.random.key(0), x)
    v_ours = ours.init(jax.random.key(0), x)
    assert _tree_spec(v_theirs) == _tree_spec(v_ours)
    assert isinstance(ours, nn.BatchNorm)
    # perturbed parameters made by Flax's class, used by ours and back
    v = jax.tree_util.tree_map(lambda a: a + 0.3, v_theirs)
    y_t, s_t = theirs.apply(v, x, mutable=["batch_stats"])
    y_o, s_o = ours.apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_o, y_t, atol=2e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(s_o["batch_stats"][k], s_t["batch_stats"][k], rtol=1e-5)
    e_t = nn.BatchNorm(use_running_average=True, axis=axis).apply({**v, **s_o}, x)
    e_o = bfl.BatchNorm(use_running_average=True, axis=axis).apply({**v, **s_t}, x)
    np.testing.assert_allclose(e_o, e_t, atol=2e-5)


def test_nnx_state_loads_both_ways_and_outputs_match_flax():
    x = _x()
    theirs, ours = nnx.BatchNorm(5, rngs=nnx.Rngs(0)), bfx.BatchNorm(5, rngs=nnx.Rngs(0))
    assert isinstance(ours, nnx.BatchNorm)
    assert _tree_spec(nnx.state(theirs)) == _tree_spec(nnx.state(ours))
    nnx.update(theirs, jax.tree_util.tree_map(lambda a: a + 0.25, nnx.state(theirs)))
    nnx.update(ours, nnx.state(theirs))
    np.testing.assert_allclose(ours(x), theirs(x), atol=2e-5)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5)
    nnx.update(theirs, nnx.state(ours))
    ours.eval(), theirs.eval()
    np.testing.assert_allclose(ours(x), theirs(x), atol=2e-5)


@pytest.mark.parametrize("use_running_average", [False, True])
def test_linen_gradients_match_flax_autodiff(use_running_average):
    x = _x((12, 4))
    w = _x((12, 4), 0.0, seed=1)
    theirs = nn.BatchNorm(use_running_average=use_running_average)
    ours = bfl.BatchNorm(use_running_average=use_running_average)
    v = theirs.init(jax.random.key(0), x)
    v = {"params": jax.tree_util.tree_map(lambda a: a * 1.5 + 0.1, v["params"]),
         "batch_stats": {"mean": jnp.full(4, 2.0), "var": jnp.full(4, 3.0)}}  # fmt: skip

    def loss(model):
        def f(params, x):
            y, _ = model.apply({**v, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y * w)

        return jax.jit(jax.grad(f, argnums=(0, 1)))

    (gp_t, gx_t), (gp_o, gx_o) = loss(theirs)(v["params"], x), loss(ours)(v["params"], x)
    np.testing.assert_allclose(gx_o, gx_t, atol=5e-5)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(gp_o[k], gp_t[k], atol=5e-4, rtol=1e-5)


def test_exact_at_mean_1e6_where_flax_is_not():
    x = _x((1024, 16), offset=1e6)
    x64 = np.asarray(x, np.float64)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    errs = {}
    for name, cls in (("flax", nn.BatchNorm), ("ours", bfl.BatchNorm)):
        m = cls(use_running_average=False)
        y, _ = m.apply(m.init(jax.random.key(0), x), x, mutable=["batch_stats"])
        errs[name] = float(np.max(np.abs(np.asarray(y, np.float64) - ref)))
    assert errs["ours"] <= 1e-5, errs
    assert errs["flax"] > 1.0, errs  # the negative control: Flax's E[x^2] - E[x]^2


def test_transforms_jit_vmap_and_nnx_jit():
    x = _x((4, 8, 5))
    bn = bfx.BatchNorm(5, rngs=nnx.Rngs(0))
    y_eager = bn(x[0])
    bn2 = bfx.BatchNorm(5, rngs=nnx.Rngs(0))
    y_jit = nnx.jit(lambda m, x: m(x))(bn2, x[0])
    np.testing.assert_allclose(y_jit, y_eager, atol=1e-6)
    np.testing.assert_allclose(bn2.mean[...], bn.mean[...], rtol=1e-6)
    # vmap over independent batches of a pure apply: each normalized on its own
    m = bfl.BatchNorm(use_running_average=False)
    v = m.init(jax.random.key(0), x[0])
    ys = jax.vmap(lambda xi: m.apply(v, xi, mutable=["batch_stats"])[0])(x)
    for i in range(4):
        np.testing.assert_allclose(ys[i], m.apply(v, x[i], mutable=["batch_stats"])[0],
                                   atol=1e-5)  # fmt: skip


def test_nonfinite_batch_keeps_running_statistics_where_flax_poisons_them():
    x = _x((8, 3)).at[2, 1].set(jnp.nan)
    for cls, poisoned in ((nn.BatchNorm, True), (bfl.BatchNorm, False)):
        m = cls(use_running_average=False)
        _, s = m.apply(m.init(jax.random.key(0), x), x, mutable=["batch_stats"])
        assert bool(jnp.isnan(s["batch_stats"]["mean"][1])) is poisoned
        assert bool(jnp.all(jnp.isfinite(s["batch_stats"]["mean"][jnp.array([0, 2])])))


def test_unsupported_options_are_refused_clearly():
    x = _x()
    with pytest.raises(NotImplementedError, match="axis_index_groups"):
        bfl.BatchNorm(use_running_average=False, axis_index_groups=[[0]]).init(jax.random.key(0), x)
    with pytest.raises(NotImplementedError, match="axis_index_groups"):
        bfx.BatchNorm(5, axis_index_groups=[[0]], rngs=nnx.Rngs(0))(x)
    with pytest.raises(TypeError, match="float16"):
        bfl.BatchNorm(
            use_running_average=False, force_float32_reductions=False, param_dtype=jnp.float16
        ).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="out of range"):
        bfl.BatchNorm(use_running_average=False, axis=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use_running_average"):
        bfx.BatchNorm(5, use_running_average=None, rngs=nnx.Rngs(0))(x)


# ---------------------------------------------------------------- BatchRenorm


def _renorm_ref(x, scale, bias, mean, var, rmax, dmax, eps):
    """Ioffe (2017) in float64 with NumPy: y, batch mean, batch variance."""
    x = np.asarray(x, np.float64)
    mb, vb = x.mean(0), x.var(0)
    sb, s = np.sqrt(vb + eps), np.sqrt(np.asarray(var, np.float64) + eps)
    r = np.clip(sb / s, 1 / rmax, rmax)
    d = np.clip((mb - np.asarray(mean, np.float64)) / s, -dmax, dmax)
    return np.asarray(scale) * ((x - mb) / sb * r + d) + np.asarray(bias), mb, vb


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_renorm_with_unit_limits_is_batch_norm_bit_for_bit(flavour):
    x = _x((16, 5), offset=2.0)
    if flavour == "linen":
        bn, rn = (
            bfl.BatchNorm(use_running_average=False),
            bfl.BatchRenorm(use_running_average=False, r_max=1.0, d_max=0.0),
        )
        v = bn.init(jax.random.key(0), x)
        v = {"params": v["params"], "batch_stats": {"mean": jnp.full(5, 7.0),
                                                    "var": jnp.full(5, 0.2)}}  # fmt: skip
        vr = {**v, "batch_stats": {**v["batch_stats"], "steps": jnp.array(0, jnp.int32)}}
        y1, s1 = bn.apply(v, x, mutable=["batch_stats"])
        y2, s2 = rn.apply(vr, x, mutable=["batch_stats"])
        g1 = jax.grad(lambda x: jnp.sum(bn.apply(v, x, mutable=["batch_stats"])[0] ** 3))(x)
        g2 = jax.grad(lambda x: jnp.sum(rn.apply(vr, x, mutable=["batch_stats"])[0] ** 3))(x)
        np.testing.assert_array_equal(s1["batch_stats"]["var"], s2["batch_stats"]["var"])
        assert int(s2["batch_stats"]["steps"]) == 1
    else:
        bn = bfx.BatchNorm(5, rngs=nnx.Rngs(0))
        rn = bfx.BatchRenorm(5, r_max=1.0, d_max=0.0, rngs=nnx.Rngs(0))
        for m in (bn, rn):
            m.mean[...], m.var[...] = jnp.full(5, 7.0), jnp.full(5, 0.2)
        g1 = jax.grad(lambda x: jnp.sum(nnx.clone(bn)(x) ** 3))(x)
        g2 = jax.grad(lambda x: jnp.sum(nnx.clone(rn)(x) ** 3))(x)
        y1, y2 = bn(x), rn(x)
        np.testing.assert_array_equal(bn.var[...], rn.var[...])
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(g1, g2)


def test_renorm_clips_towards_the_running_statistics_and_warms_up():
    x = _x((32, 4), offset=2.0)
    mean, var = jnp.array([0.0, 1.5, 2.0, 9.0]), jnp.array([0.1, 4.0, 30.0, 4.0])
    rn = bfx.BatchRenorm(4, r_max=1.5, d_max=0.5, warmup_steps=2, momentum=0.9,
                         rngs=nnx.Rngs(0))  # fmt: skip
    rn.scale[...], rn.bias[...] = jnp.array([1.0, 2.0, 0.5, 1.0]), jnp.array([0.0, 1, -1, 3])
    bn = bfx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    nnx.update(bn, nnx.state(rn, nnx.Param))
    for step in range(3):
        rn.mean[...], rn.var[...], bn.mean[...], bn.var[...] = mean, var, mean, var
        y = rn(x)
        if step < 2:  # warm-up: batch norm
            np.testing.assert_array_equal(y, bn(x))
            continue
        ref, mb, vb = _renorm_ref(x, rn.scale[...], rn.bias[...], mean, var, 1.5, 0.5, 1e-5)
        np.testing.assert_allclose(y, ref, atol=2e-5)
        assert not np.allclose(y, bn(x), atol=1e-2)  # the clipping changed something
        np.testing.assert_allclose(rn.mean[...], 0.9 * mean + 0.1 * mb, rtol=1e-5)
        np.testing.assert_allclose(rn.var[...], 0.9 * var + 0.1 * vb, rtol=1e-5)
    assert int(rn.steps[...]) == 3
    rn.eval(), bn.eval()
    np.testing.assert_array_equal(rn(x), bn(x))  # evaluation is batch norm's


def test_renorm_schedule_matches_the_numpy_schedule_under_jit():
    from batchnorm.adapters.flax._common import renorm_limits

    sched = RenormSchedule(warmup_steps=10, rmax=3.0, rmax_steps=50, dmax=5.0, dmax_steps=30)
    f = jax.jit(lambda s: renorm_limits(s, 3.0, 5.0, 0, sched))
    for step in (0, 9, 10, 11, 20, 29, 30, 31, 49, 50, 51, 1000):
        got = [float(v) for v in f(jnp.array(step, jnp.int32))]
        np.testing.assert_allclose(got, sched(step), rtol=1e-6, err_msg=f"step {step}")
    with pytest.raises(TypeError, match="RenormSchedule"):
        renorm_limits(0, 3.0, 5.0, 0, lambda s: (1.0, 0.0))


def test_renorm_linen_in_an_rl_style_update_loop():
    """A CrossQ-like critic update: jit(grad) of a loss through BatchRenorm, the batch
    statistics carried between steps, the steps counter and the schedule moving."""

    class Critic(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(8)(x)
            x = bfl.BatchRenorm(use_running_average=not train, warmup_steps=3)(x)
            return nn.Dense(1)(nn.relu(x))

    x, target = _x((32, 3)), _x((32, 1), 0.0, seed=2)
    model = Critic()
    variables = model.init(jax.random.key(0), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]

    @jax.jit
    def step(params, stats):
        def loss(p):
            q, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                 mutable=["batch_stats"])  # fmt: skip
            return jnp.mean((q - target) ** 2), upd["batch_stats"]

        (val, new_stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree_util.tree_map(lambda p, d: p - 0.05 * d, params, g), new_stats, val

    losses = []
    for _ in range(6):
        params, stats, val = step(params, stats)
        losses.append(float(val))
    assert int(stats["BatchRenorm_0"]["steps"]) == 6
    assert losses[-1] < losses[0] and np.all(np.isfinite(losses))


def test_renorm_bad_arguments_are_refused():
    x = _x()
    with pytest.raises(ValueError, match="r_max"):
        bfx.BatchRenorm(5, r_max=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_max"):
        bfl.BatchRenorm(use_running_average=False, d_max=-1.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="warmup_steps"):
        bfx.BatchRenorm(5, warmup_steps=-3, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_axis_name_across_four_devices_matches_one_device():
    """shard_map over 4 forced host devices, in a fresh process (tests/jax_devices.py)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(HERE / "jax_devices.py"), "flax"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("OK") == 3, out.stdout
