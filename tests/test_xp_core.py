"""The Array API path (:mod:`batchnorm.core.passes`, :mod:`batchnorm._xp`) in every namespace.

Parametrized the way scikit-learn's array-API tests are: each case is a (namespace,
device, dtype) combination; a namespace whose library is missing is skipped. JAX's x64
flag is process-global: the x64 cases run inside ``jax.enable_x64(True)``, which restores
it afterwards (and the others inside ``jax.enable_x64(False)``).
"""

from __future__ import annotations

import functools
import math
import threading
import types

import array_api_compat
import numpy as np
import pytest
from conftest import bshape, reduce_axes, ref_backward_train, ref_eval, ref_train
from namespaces import (  # noqa: F401
    HAS_BF16,
    LAYOUTS,
    NAMESPACES,
    NO_FLOAT64,
    TOL,
    U32,
    Case,
    _namespace,
    marks_for,
    namespace_param,
)

from batchnorm import _xp
from batchnorm.core import passes, sums


def _combos():
    for name in NAMESPACES:
        for dt in ("float16", "float32", "float64", "bfloat16"):
            if (
                (dt == "float64" and name in NO_FLOAT64)
                or (dt == "bfloat16" and name not in HAS_BF16)
                or (dt == "float16" and name.startswith("strict"))  # not in the standard
            ):
                continue
            yield pytest.param((name, dt), id=f"{name}-{dt}", marks=marks_for(name))


@pytest.fixture(params=list(_combos()))
def case(request):
    name, dt = request.param
    with _namespace(name) as (xp, device):
        yield Case(name, xp, device, dt)


@pytest.fixture(
    params=[
        pytest.param(
            (*c.values[0], shape, axis), id=f"{c.id}-{len(shape)}d-axis{axis}", marks=c.marks
        )
        for c in _combos()
        for shape, axis in LAYOUTS
        if c.values[0][1] in ("float32", "float64") or (shape, axis) in LAYOUTS[1::3]
    ]
)
def case_layout(request):
    """A case with a layout: every layout for float32/64, two for float16 and bfloat16."""
    name, dt, shape, axis = request.param
    with _namespace(name) as (xp, device):
        yield Case(name, xp, device, dt), shape, axis


@pytest.fixture(params=[namespace_param(n) for n in NAMESPACES])
def ns(request):
    with _namespace(request.param) as (xp, device):
        yield Case(request.param, xp, device, "float32")


def _data(case, shape, axis, rng, offset=3.0, scale=2.0):
    """x, dy, gamma, beta as arrays of ``case`` and their (rounded) float64 values."""
    fs = tuple(n for i, n in enumerate(shape) if i not in reduce_axes(len(shape), axis))
    x = case.arr(rng.standard_normal(shape) * scale + offset)
    dy = case.arr(rng.standard_normal(shape))
    g, b = case.feat(rng.uniform(0.5, 1.5, fs)), case.feat(rng.standard_normal(fs))
    return (x, dy, g, b), tuple(case.np(a) for a in (x, dy, g, b))


def test_train_eval_and_backward_match_the_float64_reference(case_layout, rng):
    case, shape, axis = case_layout
    xp = case.xp
    (x, dy, g, b), (xn, dyn, gn, bn) = _data(case, shape, axis, rng)
    y, mean, var, inv = passes.train(xp, x, axis, g, b, 1e-5)
    red = reduce_axes(len(shape), axis)
    fs = np.shape(gn)
    case.close(y, ref_train(xn, gn, bn, axis, 1e-5), what="train y")
    stat_tol = 1e-12 if case.sdt == xp.float64 and case.dtype == xp.float64 else 1e-6
    case.close(mean, xn.mean(red).reshape(fs), stat_tol, "mean")
    case.close(var, xn.var(red).reshape(fs), stat_tol, "var")
    case.close(inv, 1 / np.sqrt(xn.var(red).reshape(fs) + 1e-5), stat_tol, "inv_std")
    rm, rv = case.feat(rng.standard_normal(fs)), case.feat(rng.uniform(0.5, 2, fs))
    y_eval = passes.evaluate(xp, x, axis, g, b, rm, rv, 1e-5)
    case.close(y_eval, ref_eval(xn, gn, bn, case.np(rm), case.np(rv), axis, 1e-5), what="eval")
    dx, dg, db = passes.backward(xp, x, dy, axis, mean, var, inv, g, True)
    rdx, rdg, rdb = ref_backward_train(xn, gn, dyn, axis, 1e-5)
    sums = np.abs(dyn).sum(red).reshape(fs) * 4 + 1  # |dy| x |x_hat| summed, bounded
    sum_tol = 1e-13 if stat_tol == 1e-12 else 1e-6
    case.close(dx, rdx, what="dx")
    assert np.all(np.abs(case.np(dg) - rdg) <= sum_tol * sums), "dgamma"
    assert np.all(np.abs(case.np(db) - rdb) <= sum_tol * sums), "dbeta"
    # given statistics are constants: dx = gamma * inv_std * dy
    dx_eval, dg_eval, _ = passes.backward(xp, x, dy, axis, rm, rv, 1 / xp.sqrt(rv + 1e-5), g, False)
    k = (gn / np.sqrt(case.np(rv) + 1e-5)).reshape(bshape(shape, axis))
    case.close(dx_eval, k * dyn, what="dx eval")
    x_hat = (xn - case.np(rm).reshape(k.shape)) / np.sqrt(case.np(rv).reshape(k.shape) + 1e-5)
    ref_dg = (dyn * x_hat).sum(red).reshape(fs)
    assert np.all(
        np.abs(case.np(dg_eval) - ref_dg)
        <= sum_tol * (np.abs(dyn * x_hat).sum(red).reshape(fs) + 1)
    )


def _fd_check(f, args, grads, h=1e-6):
    """Whether analytic ``grads`` of the scalar ``f(*args)`` match central differences."""
    for i, (a, g) in enumerate(zip(args, grads, strict=True)):
        num = np.zeros_like(a)
        for j in np.ndindex(a.shape):
            up, dn = [v.copy() for v in args], [v.copy() for v in args]
            up[i][j] += h
            dn[i][j] -= h
            num[j] = (f(*up) - f(*dn)) / (2 * h)
        if not np.allclose(g, num, rtol=1e-6, atol=1e-8):
            return False
    return True


def test_gradient_matches_finite_differences_with_a_negative_control(ns, rng):
    if ns.sdt != ns.xp.float64:
        pytest.skip("finite differences need float64")
    xp, axis = ns.xp, 1
    x, w = rng.standard_normal((5, 3)) * 2 + 1, rng.standard_normal((5, 3))
    g, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    f64 = functools.partial(ns.arr, dtype=xp.float64)

    def loss(x, g, b):
        y = passes.train(xp, f64(x), axis, f64(g), f64(b), 1e-5)[0]
        return float(np.sum(ns.np(y) * w))

    _, mean, var, inv = passes.train(xp, f64(x), axis, f64(g), f64(b), 1e-5)
    dx, dg, db = (
        ns.np(a) for a in passes.backward(xp, f64(x), f64(w), axis, mean, var, inv, f64(g), True)
    )
    assert _fd_check(loss, [x, g, b], [dx, dg, db])
    # negative control: dropping the mean(dy) term of dx must fail the same check
    k, x_hat = g * ns.np(inv), (x - ns.np(mean)) * ns.np(inv)
    wrong = k * (w - x_hat * (w * x_hat).mean(0))
    assert not _fd_check(loss, [x, g, b], [wrong, dg, db])


def _bound_f32(shape, red, x_hat, gamma, beta):
    """The float32-statistics bound of the module docstring of :mod:`passes`."""
    k = sum(math.ceil(math.log2(shape[j])) for j in red)
    return (k / 2 + 5) * U32 * (np.abs(x_hat) + 1) * np.abs(gamma) + U32 * np.abs(beta)


def test_large_offset_is_exact_in_every_namespace(ns, rng):
    """float32 data at mean 1e6 and std 1, (4096, 64): torch's kernel is off by ~3 here."""
    xp, shape = ns.xp, (4096, 64)
    x = ns.arr(rng.standard_normal(shape) + 1e6)
    xn = ns.np(x)
    ref = ref_train(xn, None, None, 1, 1e-5)
    # float32 statistics everywhere (JAX with x64: the same sums as without, skipped for time)
    sdts = [] if ns.name == "jax-x64" else [xp.float32]
    sdts += [xp.float64] if ns.sdt == xp.float64 else []
    for sdt in sdts:
        y, mean, var, inv = passes.train(xp, x, 1, None, None, 1e-5, sdt=sdt)
        err = np.abs(ns.np(y) - ref)
        if sdt == xp.float64:
            assert err.max() < 1e-6, f"{ns.name}: {err.max():.3g}"
        else:
            assert np.all(err <= _bound_f32(shape, (0,), ref, 1.0, 0.0)), f"{ns.name} f32"
            assert err.max() < 1e-6
        dy = ns.arr(rng.standard_normal(shape))
        dx = passes.backward(xp, x, dy, 1, mean, var, inv, None, True, sdt=sdt)[0]
        rdx = ref_backward_train(xn, None, ns.np(dy), 1, 1e-5)[0]
        assert np.abs(ns.np(dx) - rdx).max() < 2e-6, f"{ns.name} dx"
        y_eval = passes.evaluate(xp, x, 1, None, None, mean, var, 1e-5, sdt=sdt)
        ref_e = ref_eval(xn, None, None, ns.np(mean), ns.np(var), 1, 1e-5)
        assert np.abs(ns.np(y_eval) - ref_e).max() < 1e-6
    if not hasattr(xp, "float16"):
        return
    # float16 with an offset of 500 standard deviations (as far as float16 can hold data)
    x16 = ns.arr(rng.standard_normal((64, 5)) * 2 + 1000, ns.xp.float16)
    y16 = passes.train(xp, x16, 1, None, None, 1e-5)[0]
    ref16 = ref_train(ns.np(x16), None, None, 1, 1e-5)
    assert np.all(np.abs(ns.np(y16) - ref16) <= 2e-3 * (1 + np.abs(ref16)))


def test_results_keep_namespace_device_and_dtype(case, rng):
    xp = case.xp
    (x, dy, g, b), _ = _data(case, (6, 3, 4, 5), 1, rng)
    y, mean, var, inv = passes.train(xp, x, 1, g, b, 1e-5)
    dx, dg, db = passes.backward(xp, x, dy, 1, mean, var, inv, g, True)
    y_eval = passes.evaluate(xp, x, 1, g, b, mean, var, 1e-5)
    for a in (y, dx, y_eval):
        assert _xp.namespace(a) is _xp.namespace(x) and _xp.device(a) == case.device
        assert a.dtype == case.dtype and tuple(a.shape) == (6, 3, 4, 5)
    for a in (mean, var, inv, dg, db):
        assert _xp.device(a) == case.device and a.dtype == case.sdt and tuple(a.shape) == (3,)


def test_inputs_are_never_modified(case, rng):
    xp = case.xp
    arrays, _ = _data(case, (6, 3, 4, 5), 1, rng)
    x, dy, g, b = arrays
    before = [case.np(a).copy() for a in arrays]
    _, mean, var, inv = passes.train(xp, x, 1, g, b, 1e-5)
    stats = [case.np(a).copy() for a in (mean, var, inv)]
    passes.evaluate(xp, x, 1, g, b, mean, var, 1e-5)
    for batch_stats in (True, False):
        passes.backward(xp, x, dy, 1, mean, var, inv, g, batch_stats)
    for a, a0 in zip(list(arrays) + [mean, var, inv], before + stats, strict=True):
        np.testing.assert_array_equal(case.np(a), a0)


def test_low_level_passes_compose_to_the_entry_points(ns, rng):
    """moments + normalize = train; grad_sums + backward_coef + input_grad = backward (the
    pieces a cross-process reducer composes)."""
    from batchnorm.core.coef import backward_coef

    xp, shape = ns.xp, (6, 3, 4, 5)
    (x, dy, g, b), _ = _data(ns, shape, 1, rng)
    lay = passes.layout(shape, 1)
    y, mean, var, inv = passes.train(xp, x, 1, g, b, 1e-5)
    m_b, v_b = passes.moments(xp, x, lay.red, ns.sdt)
    ns.close(xp.reshape(m_b, (3,)), ns.np(mean), 1e-12, "moments mean")
    ns.close(xp.reshape(v_b, (3,)), ns.np(var), 1e-12, "moments var")
    g_b, b_b, inv_b = (xp.reshape(a, lay.bshape) for a in (g, b, inv))
    y2 = passes.normalize(xp, x, m_b, v_b, inv_b, g_b, b_b, lay.count, ns.dtype)
    ns.close(y2, ns.np(y), what="normalize")
    dx, dg, db = passes.backward(xp, x, dy, 1, mean, var, inv, g, True)
    h = xp.ones(lay.bshape, dtype=ns.sdt, device=ns.device)
    sum_dy, sum_dy_xc = passes.grad_sums(xp, x, dy, m_b, lay.red, ns.sdt, h)
    k = inv_b * g_b
    p, q = backward_coef(sum_dy, sum_dy_xc, inv_b, k, lay.count)
    dx2 = passes.input_grad(xp, x, dy, m_b, k, p, q, ns.dtype, h)
    ns.close(dx2, ns.np(dx), 2e-6, "input_grad")
    ns.close(xp.reshape(sum_dy, (3,)), ns.np(db), 1e-12, "sum_dy")
    ns.close(xp.reshape(inv_b * sum_dy_xc, (3,)), ns.np(dg), 1e-6, "dgamma")


def test_float64_dy_with_float32_x(ns, rng):
    """The product dy * (x - mean) in float64, dx in the dtype of x."""
    if ns.sdt != ns.xp.float64:
        pytest.skip("no float64 on this device")
    x, dy = ns.arr(rng.standard_normal((64, 5)) + 7), ns.arr(rng.standard_normal((64, 5)), ns.sdt)
    _, mean, var, inv = passes.train(ns.xp, x, -1, None, None, 1e-5)
    dx, _, db = passes.backward(ns.xp, x, dy, -1, mean, var, inv, None, True)
    assert dx.dtype == ns.xp.float32
    rdx, _, rdb = ref_backward_train(ns.np(x), None, ns.np(dy), -1, 1e-5)
    ns.close(dx, rdx, what="dx")
    ns.close(db, rdb, 1e-13, "dbeta")


def test_eval_scales_data_that_would_overflow_the_working_precision(ns):
    """x - mean overflows float32 (|x|, |mean| ~ 2e38): the overflow scale h = 1/16 keeps
    y finite and exact."""
    if ns.sdt != ns.xp.float64:
        pytest.skip("a variance of 1e76 needs float64 statistics")
    xn = np.array([[-2e38, 2e38, 1e38], [2e38, 2e38, 3e38]], np.float32).T
    mean, var = ns.feat([2e38, 1e38]), ns.feat([1e76, 1e76])
    y = passes.evaluate(ns.xp, ns.arr(xn), 1, None, None, mean, var, 1e-5)
    ref = ref_eval(xn.astype(np.float64), None, None, ns.np(mean), ns.np(var), 1, 1e-5)
    ns.close(y, ref, 1e-6, "y")


def _float64_stats(ns):
    if ns.sdt != ns.xp.float64:
        pytest.skip("these statistics need float64")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_train_rescales_data_whose_differences_overflow(ns):
    """float32 data spanning [-3.4e38, 3.4e38]: x - sample overflows float32, so the sums
    are formed again on data scaled by a power of two (the range rule): exact statistics
    and a finite y (the second feature, far from the range's ends, is unaffected)."""
    _float64_stats(ns)
    big = float(np.float32(3.4e38))
    xn = np.array([[big, 1.0], [big, 2.0], [-big, 4.0]] * 2, np.float32)
    y, mean, var, _ = passes.train(ns.xp, ns.arr(xn), 1, None, None, 0.0)
    x64 = xn.astype(np.float64)
    # float32 work: to a few float32 ulp of the data's spread (x - shift is not exact there)
    np.testing.assert_allclose(ns.np(mean), x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ns.np(var), x64.var(0), rtol=1e-6)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0))
    ns.close(y, ref, what="y")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_moments_keep_the_variance_of_tiny_float32_data(ns, rng):
    """float32 data of scale 1e-25: their squares underflow float32, so the sums are formed
    again on data scaled up by a power of two (exact)."""
    _float64_stats(ns)
    xn = (rng.standard_normal((64, 3)) * 1e-25).astype(np.float32)
    mean, var = passes.moments(ns.xp, ns.arr(xn), (0,), ns.sdt)
    x64 = xn.astype(np.float64)
    np.testing.assert_allclose(ns.np(var).ravel(), x64.var(0), rtol=1e-6)
    np.testing.assert_allclose(ns.np(mean).ravel(), x64.mean(0), rtol=1e-6)


def test_a_constant_float32_feature_is_not_rescaled(ns, rng, monkeypatch):
    """A feature whose values are all equal (a dead channel) has both sums exactly 0: it is
    constant, not underflowed, so the range rule leaves the batch alone (a re-sum per call
    would triple the cost)."""
    if _xp.is_jax(ns.xp):
        pytest.skip("JAX traces both branches of its lax.cond (range_scale included)")

    def boom(*args):
        raise AssertionError("range_scale called")

    monkeypatch.setattr(sums, "range_scale", boom)
    xn = np.stack([np.zeros(64), np.full(64, 0.75), rng.standard_normal(64)], 1)
    mean, var = passes.moments(ns.xp, ns.arr(xn), (0,), ns.sdt)
    x64 = ns.np(ns.arr(xn))
    np.testing.assert_array_equal(ns.np(var).ravel()[:2], [0.0, 0.0])
    np.testing.assert_allclose(ns.np(mean).ravel(), x64.mean(0), rtol=1e-6, atol=1e-7)
    if ns.name == "numpy":  # NumPy's fallback backend takes the same sums
        bn = pytest.importorskip("batchnorm")
        _, var = bn.moments(xn.astype(np.float32), backend="numpy")
        np.testing.assert_array_equal(var[:2], [0.0, 0.0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_and_inf_propagate_feature_by_feature(case, rng):
    xn = rng.standard_normal((64, 5))
    xn[2, 0], xn[5, 1] = np.nan, np.inf
    x, dy = case.arr(xn), case.arr(rng.standard_normal((64, 5)))
    y, mean, var, inv = passes.train(case.xp, x, 1, None, None, 1e-5)
    dx = passes.backward(case.xp, x, dy, 1, mean, var, inv, None, True)[0]
    for a in (y, dx):
        a = case.np(a)
        assert np.isnan(a[:, :2]).all() and np.isfinite(a[:, 2:]).all()


@pytest.mark.slow
@pytest.mark.parametrize("x64", [False, True])
def test_jax_jit_matches_eager_and_jax_grad_matches_backward(x64, rng):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(x64):
        dt = jnp.float64 if x64 else jnp.float32
        x = jnp.asarray(rng.standard_normal((6, 3, 4, 5)) * 2 + 50, dtype=dt)
        w = jnp.asarray(rng.standard_normal(x.shape), dtype=dt)
        g, b = jnp.asarray(rng.uniform(0.5, 1.5, 3), dt), jnp.asarray(rng.standard_normal(3), dt)
        eps, tol = jnp.asarray(1e-5, dt), 1e-12 if x64 else 2e-6
        train = jax.jit(functools.partial(passes.train, jnp), static_argnames="axes")
        evaluate = jax.jit(functools.partial(passes.evaluate, jnp), static_argnames="axes")
        backward = jax.jit(
            functools.partial(passes.backward, jnp), static_argnames=("axes", "batch_stats")
        )
        eager = passes.train(jnp, x, 1, g, b, 1e-5)
        jitted = train(x, axes=1, gamma=g, beta=b, eps=eps)
        for a, e in zip(jitted, eager, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)
        _, mean, var, inv = eager
        y_e = evaluate(x, axes=1, gamma=g, beta=b, mean=mean, var=var, eps=eps)
        np.testing.assert_allclose(
            y_e, passes.evaluate(jnp, x, 1, g, b, mean, var, 1e-5), rtol=tol, atol=tol
        )
        grads = passes.backward(jnp, x, w, 1, mean, var, inv, g, True)
        grads_jit = backward(
            x, w, axes=1, mean=mean, var=var, inv_std=inv, gamma=g, batch_stats=True
        )
        for a, e in zip(grads_jit, grads, strict=True):
            np.testing.assert_allclose(a, e, rtol=tol, atol=10 * tol)

        def loss(x, g, b):
            return jnp.sum(passes.train(jnp, x, 1, g, b, 1e-5)[0] * w)

        auto = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, g, b)
        for a, e in zip(auto, grads, strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-9 if x64 else 2e-4, atol=1e-9 if x64 else 2e-4)


# ---------------------------------------------------------------- the sums
def test_pairwise_float32_sums_keep_their_bound(ns, rng):
    """``|fl(sum v) - sum v| <= K u sum|v|``, K = sum of ceil(log2 L) over reduced axes."""
    if ns.name == "jax-x64":
        pytest.skip("the same sums as without x64")
    vn = rng.standard_normal((37, 5, 11)) * 10.0 ** rng.integers(-3, 4, (37, 5, 11))
    v = ns.arr(vn, ns.xp.float32)
    vn = ns.np(v)
    red = (0, 2)
    got = ns.np(sums.pairwise_sum(ns.xp, v, red))
    k = math.ceil(math.log2(37)) + math.ceil(math.log2(11))
    bound = k * U32 * np.abs(vn).sum(red, keepdims=True)
    assert np.all(np.abs(got - vn.sum(red, keepdims=True)) <= bound)


@pytest.mark.parametrize(
    "shape, red",
    [((40, 30), (0,)), ((3, 8, 40, 40), (0, 2, 3)), ((5000, 3), (0,)), ((4100, 2, 3), (0, 1))],
)
def test_blocked_float64_sums_on_torch(shape, red, rng):
    """Every branch: small arrays, blocks over inner axes, the first axis split (with a rest)."""
    torch = pytest.importorskip("torch")
    xp = array_api_compat.array_namespace(torch.ones(1))
    vn = rng.standard_normal(shape).astype(np.float32) + 0.5
    got = sums.blocked_sum(xp, torch.asarray(vn), red, torch.float64)
    keep = tuple(1 if i in red else n for i, n in enumerate(shape))
    assert got.dtype == torch.float64 and tuple(got.shape) == keep
    ref = vn.astype(np.float64).sum(red, keepdims=True)
    assert np.all(np.abs(got.numpy() - ref) <= 8 * U32 * np.abs(vn).sum(red, keepdims=True))


# ---------------------------------------------------------------- _xp
def test_namespace_refuses_mixed_libraries_and_non_arrays():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"different libraries.*torch\.Tensor.*numpy\.ndarray"):
        _xp.namespace(torch.ones(2), np.ones(2))
    with pytest.raises(TypeError, match="got an object of type list"):
        _xp.namespace([1.0, 2.0])
    with pytest.raises(TypeError, match="at least one array"):
        _xp.namespace(1.0, None)
    assert _xp.is_torch(_xp.namespace(torch.ones(2), 1.0, None))


def test_check_float_names_dtype_shape_and_refuses_grad(ns):
    xp = ns.xp
    for dt in ("int32", "bool", "complex64"):
        bad = xp.zeros((2, 3), dtype=getattr(xp, dt), device=ns.device)
        with pytest.raises(TypeError, match=rf"got dtype .*{dt[:4]}.* with shape \(2, 3\)"):
            _xp.check_float(bad, "x")
    for dt in _xp.supported_dtypes(xp):
        if dt != xp.float64 or ns.name not in NO_FLOAT64:
            _xp.check_float(xp.zeros((2,), dtype=dt, device=ns.device))
    if ns.name == "torch":
        import torch

        with pytest.raises(TypeError, match=r"requires grad.*detach\(\).*batch_norm_backward"):
            _xp.check_float(torch.ones(2, requires_grad=True), "x")


def test_stats_dtype_per_namespace_and_device(ns):
    expected = ns.xp.float32 if ns.name in NO_FLOAT64 else ns.xp.float64
    assert _xp.stats_dtype(ns.xp, ns.device) == expected
    assert _xp.work_dtype(ns.xp, ns.xp.float32) == ns.xp.float32
    assert _xp.work_dtype(ns.xp, ns.xp.float64) == ns.xp.float64
    if ns.name == "torch":  # MPS: float32, without trying float64 on it
        mps = types.SimpleNamespace(type="mps")
        assert _xp.stats_dtype(ns.xp, mps) == ns.xp.float32
    if ns.name.startswith("jax"):
        return  # JAX's x64 context is thread-local: new threads see the global flag
    out = []
    threads = [
        threading.Thread(target=lambda: out.append(_xp.stats_dtype(ns.xp, ns.device)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [expected] * 4


def test_jax_stats_dtype_follows_the_x64_flag():
    jax = pytest.importorskip("jax")
    for flag in (False, True, False):
        with jax.enable_x64(flag):
            expected = jax.numpy.float64 if flag else jax.numpy.float32
            assert _xp.stats_dtype(jax.numpy, None) == expected


def test_devices_and_numpy_round_trip(ns):
    a = ns.arr(np.arange(6.0).reshape(2, 3))
    assert _xp.same_device(a, a) and _xp.device(a) == ns.device
    b = _xp.from_numpy(ns.xp, _xp.to_numpy(a), ns.device, ns.xp.float32)
    assert b.dtype == ns.xp.float32 and _xp.device(b) == ns.device
    np.testing.assert_array_equal(_xp.to_numpy(b), np.arange(6.0).reshape(2, 3))
    _xp.check_same_device("a", a, "b", b)
    if ns.name == "strict":
        other = ns.xp.asarray([1.0], device=ns.xp.Device("device1"))
        with pytest.raises(ValueError, match=r"a is on device .*CPU_DEVICE.* b is on .*device1"):
            _xp.check_same_device("a", a, "b", other)
    if ns.name in HAS_BF16:  # NumPy has no bfloat16 (torch gives float32, JAX ml_dtypes)
        h = ns.arr([1.5, 2.0], ns.xp.bfloat16)
        np.testing.assert_array_equal(np.asarray(_xp.to_numpy(h), np.float32), [1.5, 2.0])
