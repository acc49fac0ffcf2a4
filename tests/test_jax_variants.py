"""batchnorm.jax's renorm (against Keras 2's published formulas) and ghost batch norm, the
large-offset numerics, and real multi-device runs (pmap, shard_map) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
bnj = pytest.importorskip("batchnorm.jax")

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[0] / "src"


def _close(a, b, tol):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
    )


def keras2_renorm(x, gamma, beta, mu, sigma, rmax, dmax, eps, momentum):
    """Keras 2 ``BatchNormalization(renorm=True)`` by its published formulas (feature axis
    -1): ``std = sqrt(var + eps)``, ``r = stop_gradient(clip(std / renorm_std, 1/rmax,
    rmax))``, ``d = stop_gradient(clip((mean - renorm_mean) / renorm_std, -dmax, dmax))``,
    ``y = gamma * ((x - mean) / std * r + d) + beta``, and the renorm mean and std move with
    ``renorm_momentum`` (weight of the old value)."""
    mean, var = x.mean(0), ((x - x.mean(0)) ** 2).mean(0)
    std = jnp.sqrt(var + eps)
    r = jax.lax.stop_gradient(jnp.clip(std / sigma, 1 / rmax, rmax))
    d = jax.lax.stop_gradient(jnp.clip((mean - mu) / sigma, -dmax, dmax))
    y = gamma * ((x - mean) / std * r + d) + beta
    return y, (momentum * mu + (1 - momentum) * mean, momentum * sigma + (1 - momentum) * std)


@pytest.mark.slow
def test_renorm_matches_keras2_forward_running_and_gradients(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((32, 3)) * 3 + 1)
        g, b = jnp.asarray(rng.standard_normal(3)), jnp.asarray(rng.standard_normal(3))
        mu, sigma = jnp.asarray([0.0, 1.0, 5.0]), jnp.asarray([1.0, 10.0, 0.5])
        w = jnp.asarray(rng.standard_normal(x.shape))
        kw = dict(rmax=2.0, dmax=1.5, eps=1e-3, momentum=0.9)

        def ours(x, g, b):
            return bnj.batch_renorm(x, g, b, mu, sigma, training=True, **kw)

        def ref(x, g, b):
            return keras2_renorm(x, g, b, mu, sigma, **kw)

        (y, new), (y_ref, new_ref) = ours(x, g, b), ref(x, g, b)
        _close(y, y_ref, 1e-12)
        for a, e in zip(new, new_ref, strict=True):
            _close(a, e, 1e-13)
        # the clipping is exercised (else this would be batch norm with other limits)
        xn = np.asarray(x)
        sb = np.sqrt(xn.var(0) + 1e-3)
        assert np.any(np.clip(sb / sigma, 0.5, 2) != sb / sigma)
        assert np.any(np.clip((xn.mean(0) - mu) / sigma, -1.5, 1.5) != (xn.mean(0) - mu) / sigma)
        got = jax.grad(lambda *a: jnp.sum(ours(*a)[0] * w), argnums=(0, 1, 2))(x, g, b)
        want = jax.grad(lambda *a: jnp.sum(ref(*a)[0] * w), argnums=(0, 1, 2))(x, g, b)
        for a, e in zip(got, want, strict=True):
            _close(a, e, 1e-10)
        # evaluation: gamma (x - mu) / sigma + beta, state unchanged
        y_e, new_e = bnj.batch_renorm(x, g, b, mu, sigma, training=False, **kw)
        _close(y_e, g * (x - mu) / sigma + b, 1e-12)
        assert np.array_equal(new_e[1], sigma)
        # rmax = 1, dmax = 0: batch norm (in its forward and its gradients)
        y1, _ = bnj.batch_renorm(x, g, b, mu, sigma, training=True, rmax=1.0, dmax=0.0)
        y0, _ = bnj.batch_norm(x, g, b, mu, sigma, training=True)
        _close(y1, y0, 1e-13)

        # negative control: with r and d differentiated the gradient is another one
        def free(x):
            mean, std = x.mean(0), jnp.sqrt(x.var(0) + 1e-3)
            r, d = jnp.clip(std / sigma, 0.5, 2.0), jnp.clip((mean - mu) / sigma, -1.5, 1.5)
            return jnp.sum((g * ((x - mean) / std * r + d) + b) * w)

        assert np.max(np.abs(np.asarray(jax.grad(free)(x) - got[0]))) > 1e-6


def test_renorm_bad_limits():
    args = (jnp.ones((4, 3)), None, None, jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match="rmax must be finite and >= 1; got 0.5"):
        bnj.batch_renorm(*args, training=True, rmax=0.5, dmax=1.0)
    with pytest.raises(ValueError, match="dmax must be finite and >= 0"):
        bnj.batch_renorm(*args, training=True, rmax=2.0, dmax=-1.0)


@pytest.mark.slow
def test_ghost_batch_norm_normalizes_each_virtual_batch(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((21, 4)) * 2 + 3)  # 8 + 8 + 5 rows
        g, b = jnp.asarray(rng.uniform(0.5, 2, 4)), jnp.asarray(rng.standard_normal(4))
        rm, rv = jnp.zeros(4), jnp.ones(4)
        w = jnp.asarray(rng.standard_normal(x.shape))

        def ours(x, g, b):
            return bnj.ghost_batch_norm(
                x, g, b, rm, rv, training=True, virtual_batch_size=8, momentum=0.9
            )

        y, (m, v) = ours(x, g, b)
        xn = np.asarray(x)
        parts = [slice(0, 8), slice(8, 16), slice(16, 21)]
        for sl in parts:
            xs = xn[sl]
            _close(y[sl], (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5) * g + b, 1e-12)
        sizes = np.array([8, 8, 5])[:, None] / 21
        _close(m, 0.1 * (sizes * [xn[sl].mean(0) for sl in parts]).sum(0), 1e-13)
        _close(v, 0.9 + 0.1 * (sizes * [xn[sl].var(0) for sl in parts]).sum(0), 1e-13)
        # gradients: the pieces' batch-norm gradients, concatenated; dgamma summed
        got = jax.grad(lambda *a: jnp.sum(ours(*a)[0] * w), argnums=(0, 1, 2))(x, g, b)
        pieces = [
            jax.grad(
                lambda xs, g, b, sl=sl: jnp.sum(
                    bnj.batch_norm(xs, g, b, rm, rv, training=True)[0] * w[sl]
                ),
                argnums=(0, 1, 2),
            )(x[sl], g, b)
            for sl in parts
        ]
        _close(got[0], jnp.concatenate([p[0] for p in pieces]), 1e-12)
        _close(got[1], sum(p[1] for p in pieces), 1e-12)
        # a remainder of one row joins the batch before it; negative control: whole-batch BN
        y9, _ = bnj.ghost_batch_norm(x[:9], None, None, rm, rv, training=True, virtual_batch_size=8)
        _close(y9, bnj.batch_norm(x[:9], None, None, rm, rv, training=True)[0], 1e-13)
        assert (
            np.max(np.abs(np.asarray(y - bnj.batch_norm(x, g, b, rm, rv, training=True)[0]))) > 1e-3
        )
        with pytest.raises(ValueError, match="axis 0 is a feature axis"):
            bnj.ghost_batch_norm(
                x,
                None,
                None,
                jnp.zeros(21),
                jnp.ones(21),
                training=True,
                virtual_batch_size=4,
                axis=0,
            )
        with pytest.raises(ValueError, match="1 value per feature"):
            bnj.ghost_batch_norm(x, None, None, rm, rv, training=True, virtual_batch_size=1)


@pytest.mark.parametrize(
    ("shape", "vbs", "path"),
    [
        ((16, 6, 5, 3), 4, (4, 60, 2, 3)),
        ((6, 7, 3), 2, None),
        ((16, 6, 5, 3), 4, "fused"),
        ((16, 6, 5, 3), 4, "blocks"),
    ],
)
def test_ghost_middle_axis_sums_match_each_virtual_batch(rng, monkeypatch, shape, vbs, path):
    """Ghost batch norm's plain sums over the middle axes of ``(groups, n, C)``: one
    variadic reduction for small inputs (``path`` "fused"), one over blocks of rows
    (``_sums._blocks``, "blocks"), partial sums for large ones (``_sums._split``, enabled
    here at any size; ``path`` its view, None where the count has no divisor in range and
    one reduction stays). Statistics and output stay each virtual batch's own."""
    from batchnorm._validation import layout
    from batchnorm.adapters.jax import _kernel, _sums

    fused, blocks = path == "fused", path == "blocks"
    monkeypatch.setattr(_sums, "_SPLIT_MIN", 1 << 62 if fused or blocks else 0)
    monkeypatch.setattr(_sums, "_FUSED_MAX", 1 << 62 if fused else -1)
    monkeypatch.setattr(_sums, "_ROWS", 1 << 62 if blocks else 0)  # 0: no blocks
    groups = shape[0] // vbs
    lay = layout((groups, vbs, *shape[1:]), (0, len(shape)))
    split = _sums._split(lay)
    if not blocks:
        assert (split and split[0]) == (None if fused else path)
        assert _sums._blocks(lay, _sums._BLOCKS_MAX) is None
    else:
        assert _sums._blocks(lay, _sums._BLOCKS_MAX)[0] == (groups, 4, 30, 3)
    assert not _sums._middle(layout(shape, -1))  # whole batch: a leading reduced block
    # the sums themselves (wrong sums would only send the layer to its shifted fallback)
    xg = rng.standard_normal(lay.shape).astype(np.float32)
    s1, s2 = _kernel.plain_sums(jnp.asarray(xg), lay)
    _close(s1, xg.sum((1, 2, 3)[: len(shape) - 1], keepdims=True), 1e-5)
    _close(s2, (xg * xg).sum((1, 2, 3)[: len(shape) - 1], keepdims=True), 1e-5)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal(shape) * 2 + 1)
        c = shape[-1]
        g, b = jnp.asarray(rng.uniform(0.5, 2, c)), jnp.asarray(rng.standard_normal(c))
        step = jax.jit(
            lambda x: bnj.ghost_batch_norm(
                x,
                g,
                b,
                jnp.zeros(c),
                jnp.ones(c),
                training=True,
                virtual_batch_size=vbs,
                momentum=0.0,
            )
        )
        y, (m, v) = step(x)
        xn = np.asarray(x).reshape(groups, vbs, -1, c)
        mean, var = xn.mean((1, 2), keepdims=True), xn.var((1, 2), keepdims=True)
        want = (xn - mean) / np.sqrt(var + 1e-5) * np.asarray(g) + np.asarray(b)
        _close(y, want.reshape(shape), 1e-12)
        _close(m, mean.mean(0).ravel(), 1e-13)
        _close(v, var.mean(0).ravel(), 1e-13)


def _offset_data(rng):
    return (rng.standard_normal((4096, 64)) + 1e6).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("x64", [False, True])
def test_large_offset_float32_ours_vs_naive_and_flax_formulas(rng, x64):
    """mean 1e6, std 1, float32, (4096, 64): ours within 1e-6 of a float64 reference (also
    merged over 4 members of a named axis); E[x^2]-E[x]^2 (Flax's default fast variance,
    and jax.nn.standardize) off by > 100, Flax's two-pass variance by > 0.01."""
    xn = _offset_data(rng)
    x64d = xn.astype(np.float64)
    ref = (x64d - x64d.mean(0)) / np.sqrt(x64d.var(0) + 1e-5)
    with jax.enable_x64(x64):
        x, z, o = jnp.asarray(xn), jnp.zeros(64, jnp.float32), jnp.ones(64, jnp.float32)
        y, _ = jax.jit(lambda x: bnj.batch_norm(x, None, None, z, o, training=True))(x)
        ys, _ = jax.vmap(
            lambda xx: bnj.batch_norm(xx, None, None, z, o, training=True, axis_name="d"),
            axis_name="d",
        )(x.reshape(4, 1024, 64))
        mu = x.mean(0)
        fast = (x - mu) * jax.lax.rsqrt(jnp.maximum(0.0, (x * x).mean(0) - mu * mu) + 1e-5)
        two_pass = (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(0) + 1e-5)
        std = jax.nn.standardize(x, axis=0, epsilon=1e-5)
    err = {
        k: float(np.abs(np.asarray(v, np.float64).reshape(ref.shape) - ref).max())
        for k, v in dict(ours=y, ours_sync=ys, fast=fast, two=two_pass, std=std).items()
    }
    print(f"x64={x64}: " + ", ".join(f"{k} {v:.3g}" for k, v in err.items()))
    assert err["ours"] < 1e-6 and err["ours_sync"] < 1e-6
    assert err["fast"] > 100 and err["std"] > 100 and err["two"] > 1e-2


@pytest.mark.slow
def test_pmap_and_shard_map_on_four_devices_match_one_device():
    """Four forced host devices, in a fresh process (the device count is fixed at start)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(HERE / "jax_devices.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("OK") == 3, out.stdout


@pytest.mark.parametrize("unroll", [32, 0])
def test_ghost_parameter_gradients_sum_the_groups_on_both_paths(rng, monkeypatch, unroll):
    """dgamma and dbeta of ghost batch norm are the sums over the virtual batches of each
    one's batch-norm gradients, whether the groups are added one by one (up to
    ``_kernel._UNROLL`` groups) or by a reduction (``unroll`` 0); negative control: the
    whole batch's dgamma differs."""
    from batchnorm.adapters.jax import _kernel

    monkeypatch.setattr(_kernel, "_UNROLL", unroll)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((12, 5)) * 2 + 1)
        g, b = jnp.asarray(rng.uniform(0.5, 2, 5)), jnp.asarray(rng.standard_normal(5))
        rm, rv = jnp.zeros(5), jnp.ones(5)
        w = jnp.asarray(rng.standard_normal(x.shape))

        def loss(fn, x, g, b, sl=slice(None), **kw):
            return jnp.sum(fn(x, g, b, rm, rv, training=True, **kw)[0] * w[sl])

        got = jax.jit(
            jax.grad(
                lambda g, b: loss(bnj.ghost_batch_norm, x, g, b, virtual_batch_size=3),
                argnums=(0, 1),
            )  # fmt: skip
        )(g, b)
        parts = [slice(i, i + 3) for i in range(0, 12, 3)]
        each = [jax.grad(lambda g, b, sl=sl: loss(bnj.batch_norm, x[sl], g, b, sl),
                         argnums=(0, 1))(g, b) for sl in parts]  # fmt: skip
        for k in range(2):
            _close(got[k], sum(p[k] for p in each), 1e-12)
        whole = jax.grad(lambda g: loss(bnj.batch_norm, x, g, b))(g)
        assert np.max(np.abs(np.asarray(got[0] - whole))) > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unfused_changes_no_value(dtype):
    """The backward's sums pass through ``_kernel._unfused`` (a reduce_precision to their
    own format): every value, subnormal, infinite and NaN included, comes out bit for bit;
    negative control: one fewer mantissa bit changes values."""
    from batchnorm.adapters.jax import _kernel

    fi = np.finfo(dtype)
    special = [0.0, -0.0, fi.tiny, fi.tiny / 7, -fi.smallest_subnormal, fi.max, np.inf, np.nan]
    with jax.enable_x64(dtype == np.float64):
        v = np.concatenate([np.random.default_rng(0).standard_normal(1000), special])
        v = v.astype(dtype)
        got = np.asarray(jax.jit(_kernel._unfused)(jnp.asarray(v)))
        assert got.dtype == v.dtype and got.tobytes() == v.tobytes()
        fewer = jax.lax.reduce_precision(jnp.asarray(v), fi.nexp, fi.nmant - 1)
        assert np.asarray(fewer).tobytes() != v.tobytes()
