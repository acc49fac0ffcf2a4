"""batchnorm.jax.batch_norm against Flax's BatchNorm written out as formulas (flax itself is
not a dependency), through jit, vmap, grad and a named axis; and its bad-input errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
bnj = pytest.importorskip("batchnorm.jax")

SRC = Path(__file__).resolve().parents[1] / "src"


def flax_reference(x, scale, bias, ra_mean, ra_var, *, training, axis, momentum, eps):
    """Flax's ``BatchNorm.__call__`` by formula (jnp, so ``jax.grad`` can differentiate it):
    biased batch variance (centred two-pass, the exact value its fast formula estimates),
    ``y = (x - mean) * rsqrt(var + eps) * scale + bias``, and ``ra = momentum * ra +
    (1 - momentum) * batch``; evaluation uses ``ra`` and leaves it."""
    axes = (axis % x.ndim,) if isinstance(axis, int) else tuple(a % x.ndim for a in axis)
    red = tuple(i for i in range(x.ndim) if i not in axes)
    if training:
        mean = x.mean(red)
        var = ((x - jnp.expand_dims(mean, red)) ** 2).mean(red)
        new = (momentum * ra_mean + (1 - momentum) * mean, momentum * ra_var + (1 - momentum) * var)
    else:
        mean, var, new = ra_mean, ra_var, (ra_mean, ra_var)
    mul = jax.lax.rsqrt(jnp.expand_dims(var, red) + eps)
    if scale is not None:
        mul = mul * jnp.expand_dims(scale, red)
    y = (x - jnp.expand_dims(mean, red)) * mul
    if bias is not None:
        y = y + jnp.expand_dims(bias, red)
    return y, new


def _data(rng, shape, axis, offset=3.0, dtype=np.float64):
    x = rng.standard_normal(shape) * 2.0 + offset
    fshape = tuple(shape[a] for a in sorted(a % len(shape) for a in np.atleast_1d(axis)))
    g = rng.uniform(0.5, 1.5, fshape)
    b = rng.standard_normal(fshape)
    rm, rv = rng.standard_normal(fshape), rng.uniform(0.5, 2.0, fshape)
    return [jnp.asarray(a, dtype) for a in (x, g, b, rm, rv)]


def _close(a, b, tol):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
    )


def test_import_batchnorm_does_not_import_jax():
    code = "import sys, batchnorm; assert 'jax' not in sys.modules; import batchnorm.jax; "
    code += "assert 'jax' in sys.modules"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("axis", [-1, 1, (1, 2)])
def test_train_and_eval_match_flax_formulas_float64(rng, axis):
    with jax.enable_x64(True):
        x, g, b, rm, rv = _data(rng, (12, 3, 4), axis)
        kw = dict(axis=axis, momentum=0.9, eps=1e-3)
        y, new = bnj.batch_norm(x, g, b, rm, rv, training=True, **kw)
        y_ref, new_ref = flax_reference(x, g, b, rm, rv, training=True, **kw)
        _close(y, y_ref, 1e-12)
        for a, e in zip(new, new_ref, strict=True):
            _close(a, e, 1e-14)
        # negative control: the other momentum direction (torch's) is far off
        wrong = 0.1 * rm + 0.9 * np.asarray(x).mean(
            tuple(i for i in range(3) if i not in np.atleast_1d(axis) % 3)
        )
        assert np.max(np.abs(np.asarray(new[0]) - wrong)) > 1e-3
        y_e, new_e = bnj.batch_norm(x, g, b, rm, rv, training=False, **kw)
        _close(y_e, flax_reference(x, g, b, rm, rv, training=False, **kw)[0], 1e-12)
        assert all(np.array_equal(a, c) for a, c in zip(new_e, (rm, rv), strict=True))


@pytest.mark.slow
def test_defaults_are_flax_and_float32_results_keep_dtypes(rng):
    with jax.enable_x64(False):
        x, g, b, rm, rv = _data(rng, (64, 5), -1, dtype=np.float32)
        y, (m, v) = bnj.batch_norm(x, g, b, rm, rv, training=True)
        y_ref, (m_ref, v_ref) = flax_reference(
            x, g, b, rm, rv, training=True, axis=-1, momentum=0.99, eps=1e-5
        )
        assert y.dtype == m.dtype == v.dtype == jnp.float32
        _close(y, y_ref, 2e-5)
        _close(m, m_ref, 1e-6)
        _close(v, v_ref, 1e-6)
        # eps is added in evaluation too, and gamma/beta may be None (1 and 0)
        y0, _ = bnj.batch_norm(x, None, None, rm, rv, training=False)
        _close(y0, (x - rm) / jnp.sqrt(rv + 1e-5), 1e-6)
    with jax.enable_x64(True):  # half precision in, float32 work, dtype kept
        xh = jnp.asarray(rng.standard_normal((32, 4)) + 5, jnp.bfloat16)
        yh, (mh, _) = bnj.batch_norm(xh, None, None, jnp.zeros(4), jnp.ones(4), training=True)
        assert yh.dtype == jnp.bfloat16 and mh.dtype == jnp.float64
        _close(
            yh,
            flax_reference(
                xh.astype(jnp.float64),
                None,
                None,
                0,
                1,
                training=True,
                axis=-1,
                momentum=0.99,
                eps=1e-5,
            )[0],
            2e-2,
        )


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False])
def test_grad_uses_the_handwritten_backward_and_matches_autodiff_of_flax(rng, training):
    with jax.enable_x64(True):
        x, g, b, rm, rv = _data(rng, (10, 3, 2), 1)
        w = jnp.asarray(rng.standard_normal(x.shape))
        kw = dict(axis=1, momentum=0.9, eps=1e-5)

        def ours(x, g, b, rm, rv):
            return jnp.sum(bnj.batch_norm(x, g, b, rm, rv, training=training, **kw)[0] * w)

        def ref(x, g, b, rm, rv):
            return jnp.sum(flax_reference(x, g, b, rm, rv, training=training, **kw)[0] * w)

        got = jax.jit(jax.grad(ours, argnums=range(5)))(x, g, b, rm, rv)
        want = jax.grad(ref, argnums=range(5))(x, g, b, rm, rv)
        for a, e in zip(got, want, strict=True):
            _close(a, e, 1e-10)
        if training:  # the running statistics enter no gradient in training mode
            assert not np.any(np.asarray(got[3])) and not np.any(np.asarray(got[4]))
        else:  # but they are the normalization in evaluation mode
            assert np.all(np.abs(np.asarray(got[3])) > 0)
        # the gradient is the custom rule, not autodiff of the forward's operations
        assert "custom_vjp_call" in str(jax.make_jaxpr(ours)(x, g, b, rm, rv))
        # negative control: another upstream gradient gives another dx
        other = jax.grad(
            lambda x: jnp.sum(
                bnj.batch_norm(x, g, b, rm, rv, training=training, **kw)[0] * w * 1.01
            )
        )(x)
        assert np.max(np.abs(np.asarray(other - got[0]))) > 1e-6


@pytest.mark.slow
def test_jit_and_vmap_give_the_eager_result(rng):
    with jax.enable_x64(True):
        x, g, b, rm, rv = _data(rng, (4, 16, 3), -1)

        def one(x):
            return bnj.batch_norm(x, g, b, rm, rv, training=True, momentum=0.8)

        y_v, (m_v, v_v) = jax.jit(jax.vmap(one))(x)  # 4 independent batch norms
        for i in range(4):
            y_i, (m_i, v_i) = one(x[i])
            _close(y_v[i], y_i, 1e-13)
            _close(m_v[i], m_i, 1e-14)
            _close(v_v[i], v_i, 1e-14)
        # negative control: one batch norm over all 64 rows is something else
        assert np.max(np.abs(np.asarray(one(x.reshape(64, 3))[0]).reshape(4, 16, 3) - y_v)) > 1e-3
        # static arguments by name under jit
        f = jax.jit(bnj.batch_norm, static_argnames=("training", "axis", "momentum", "eps"))
        _close(f(x[0], g, b, rm, rv, training=True, momentum=0.8)[0], one(x[0])[0], 1e-13)


@pytest.mark.slow
@pytest.mark.parametrize("x64", [False, True])
def test_named_axis_merges_exactly_in_order(rng, x64):
    """vmap with axis_name stands in for devices: 4 members, each its share of the batch."""
    with jax.enable_x64(x64):
        dt = np.float64 if x64 else np.float32
        x, g, b, rm, rv = _data(rng, (32, 5), -1, offset=1e3, dtype=dt)
        w = jnp.asarray(rng.standard_normal(x.shape), dt)
        tol = 1e-12 if x64 else 2e-5

        def member(xx, ww, g, b):
            y, new = bnj.batch_norm(xx, g, b, rm, rv, training=True, axis_name="d")
            return jnp.sum(y * ww), (y, new)

        grad = jax.grad(member, argnums=(0, 2, 3), has_aux=True)
        (dx, dg, db), (y, (m, v)) = jax.vmap(grad, in_axes=(0, 0, None, None), axis_name="d")(
            x.reshape(4, 8, 5), w.reshape(4, 8, 5), g, b
        )
        # bit-identical statistics on every member
        assert all(bool((a == a[0]).all()) for a in (m, v))

        def single(x, g, b):  # one participant, the concatenated batch
            return jnp.sum(bnj.batch_norm(x, g, b, rm, rv, training=True)[0] * w)

        dx1, dg1, db1 = jax.grad(single, argnums=(0, 1, 2))(x, g, b)
        y1, (m1, v1) = bnj.batch_norm(x, g, b, rm, rv, training=True)
        _close(y.reshape(32, 5), y1, tol)
        _close(m[0], m1, tol)
        _close(v[0], v1, tol)
        _close(dx.reshape(32, 5), dx1, tol)
        _close(dg.sum(0), dg1, tol)  # each member's share of dgamma sums to the whole
        _close(db.sum(0), db1, tol)
        # negative control: without axis_name each member normalizes its own 8 rows
        y_loc = jax.vmap(lambda xx: bnj.batch_norm(xx, g, b, rm, rv, training=True)[0])(
            x.reshape(4, 8, 5)
        )
        assert np.max(np.abs(np.asarray(y_loc).reshape(32, 5) - np.asarray(y1))) > 1e-2


def _bad(match, exc=ValueError, **over):
    x, g, b, rm, rv = jnp.ones((4, 3)), jnp.ones(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3)
    args = dict(x=x, gamma=g, beta=b, running_mean=rm, running_var=rv, training=True)
    args.update(over)
    with pytest.raises(exc, match=match):
        bnj.batch_norm(**args)


def test_bad_input_is_refused_clearly():
    _bad(
        r"gamma has shape \(4,\) but x with shape \(4, 3\) and axis=-1 has per-feature "
        r"shape \(3,\)",
        gamma=jnp.ones(4),
    )
    _bad(r"running_var has shape \(2,\)", running_var=jnp.ones(2))
    _bad("float16, bfloat16, float32 or float64; got int32", TypeError, x=jnp.ones((4, 3), int))
    _bad("training must be True or False", TypeError, training=1)
    _bad("empty batch", x=jnp.ones((0, 3)))
    _bad("axis", x=jnp.ones((4, 3)), gamma=None, beta=None, axis=5)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]; got 1.5"):
        bnj.batch_norm(
            jnp.ones((4, 3)), None, None, jnp.zeros(3), jnp.ones(3), training=True, momentum=1.5
        )
    with pytest.raises(TypeError, match="needs a step count"):
        bnj.batch_norm(
            jnp.ones((4, 3)), None, None, jnp.zeros(3), jnp.ones(3), training=True, momentum=None
        )
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        bnj.batch_norm(
            jnp.ones((4, 3)), None, None, jnp.zeros(3), jnp.ones(3), training=True, eps=-1.0
        )
    with pytest.raises(ValueError, match="axis_name='nope' is not bound"):
        bnj.batch_norm(
            jnp.ones((4, 3)), None, None, jnp.zeros(3), jnp.ones(3), training=True, axis_name="nope"
        )
    with pytest.raises(TypeError, match="running_var is required"):
        bnj.batch_norm(jnp.ones((4, 3)), None, None, jnp.zeros(3), None, training=True)
    with pytest.raises(TypeError, match="mark it static"):
        jax.jit(
            lambda e: bnj.batch_norm(
                jnp.ones((4, 3)), None, None, jnp.zeros(3), jnp.ones(3), training=True, eps=e
            )
        )(1e-5)


def test_nonfinite_batch_statistics_leave_the_running_statistics(rng):
    with jax.enable_x64(True):
        x = np.asarray(rng.standard_normal((8, 3)))
        x[2, 1] = np.nan
        rm, rv = jnp.asarray([0.5, 0.25, -1.0]), jnp.asarray([1.0, 2.0, 3.0])
        y, (m, v) = bnj.batch_norm(jnp.asarray(x), None, None, rm, rv, training=True)
        assert np.isnan(np.asarray(y)[:, 1]).all() and np.isfinite(np.asarray(y)[:, [0, 2]]).all()
        assert float(m[1]) == 0.25 and float(v[1]) == 2.0  # kept exactly
        assert float(m[0]) != 0.5 and float(v[2]) != 3.0  # the finite features moved


@pytest.mark.parametrize(
    ("shape", "fwd_blocks", "bwd_blocks"),
    [
        ((128, 8), 4, 4),
        ((1024, 8), 32, None),
        ((32, 3, 4), 4, 4),
        ((96, 3, 4), 9, None),
        ((61, 8), None, None),
    ],
)
def test_blocked_sums_give_flax_results_and_gradients(rng, shape, fwd_blocks, bwd_blocks):
    """The sums over blocks of rows (``_sums._blocks``: up to 32 blocks for the forward,
    8 for the backward, else two plain sums) give Flax's output and autodiff gradients;
    the shapes take each path (asserted). Negative control: another scale of ``w``
    changes the gradient."""
    from batchnorm._validation import layout
    from batchnorm.adapters.jax import _sums

    lay = layout(shape, -1)
    for most, want in ((_sums._BLOCKS_MAX, fwd_blocks), (_sums._PAIR_BLOCKS_MAX, bwd_blocks)):
        got = _sums._blocks(lay, most)
        assert (got and got[0][0]) == want
    with jax.enable_x64(True):
        x, g, b, rm, rv = _data(rng, shape, -1)
        w = jnp.asarray(rng.standard_normal(x.shape))

        def ours(x, g, b, s=1.0):
            return jnp.sum(bnj.batch_norm(x, g, b, rm, rv, training=True)[0] * w * s)

        def ref(x, g, b):
            kw = {"axis": -1, "momentum": 0.99, "eps": 1e-5}
            return jnp.sum(flax_reference(x, g, b, rm, rv, training=True, **kw)[0] * w)

        _close(ours(x, g, b), ref(x, g, b), 1e-10)
        got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, g, b)
        for a, e in zip(got, jax.grad(ref, argnums=(0, 1, 2))(x, g, b), strict=True):
            _close(a, e, 1e-10)
        other = jax.grad(ours)(x, g, b, 1.01)
        assert np.max(np.abs(np.asarray(other - got[0]))) > 1e-6
