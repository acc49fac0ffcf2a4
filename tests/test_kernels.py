"""The compiled backend: dispatch, layouts, laziness, and agreement with the NumPy path."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import backends as _dispatch

numba_only = pytest.mark.skipif(not _dispatch.numba_available(), reason="numba not installed")

# wide inner blocks (I >= 32), narrow ones, channels-last, one outer element, adjacent tuple
LAYOUTS = [
    ((4, 6, 8, 8), 1),
    ((4, 6, 3, 5), 1),
    ((5, 7, 7, 6), -1),
    ((1, 4, 40, 3), 1),
    ((3, 5, 4, 36), (1, 2)),
    ((257, 33), 1),
    ((3, 9, 100), 2),
]


def test_import_compiles_nothing():
    code = "import sys, batchnorm; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@numba_only
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("kernels", ["serial", "parallel"])
def test_numba_matches_numpy(rng, shape, axis, dtype, kernels, monkeypatch):
    from batchnorm.backends.numba import kernels as K

    if kernels == "parallel":  # these small arrays would run the serial kernels
        monkeypatch.setattr(K, "SERIAL_MAX", 0)
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    fs = tuple(x.shape[a] for a in axes)
    g, b = rng.standard_normal(fs), rng.standard_normal(fs)
    dy = rng.standard_normal(shape).astype(dtype)
    res = {}
    for be in ("numpy", "numba"):
        y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend=be)
        dx, dg, db = bn.batch_norm_backward(dy, cache, backend=be)
        ye = bn.batch_norm_eval(x, g, b, cache.mean, cache.var, axis=axis, backend=be)
        res[be] = (y, dx, dg, db, ye, cache.mean, cache.var)
    tol = {np.float16: 4e-3, np.float32: 3e-6, np.float64: 1e-12}[dtype]
    for a, c in zip(res["numpy"], res["numba"], strict=True):
        assert a.dtype == c.dtype
        np.testing.assert_allclose(a, c, rtol=tol, atol=tol * (1 + np.abs(a).max()))


@numba_only
def test_numba_wide_path_nan_inf(rng):
    x = rng.standard_normal((3, 4, 64))
    x[1, 2, 5] = np.nan
    x[0, 3, 0] = np.inf  # the shift (first element) itself is infinite
    y, cache = bn.batch_norm_train(x, None, None, backend="numba")
    dx, _, _ = bn.batch_norm_backward(rng.standard_normal(x.shape), cache, backend="numba")
    assert np.isfinite(y[:, :2]).all() and np.isfinite(dx[:, :2]).all()
    assert np.isnan(y[:, 2]).all() and not np.isfinite(y[:, 3]).any()
    assert not np.isfinite(cache.mean[3]) and np.isnan(cache.mean[2])


@numba_only
def test_numba_float32_large_offsets_wide_and_rows(rng):
    from conftest import ref_train

    for shape, axis in (((64, 8, 64), 1), ((4096, 8), 1)):
        x = (rng.standard_normal(shape) + 1e6).astype(np.float32)
        y, _ = bn.batch_norm_train(x, None, None, axis=axis, backend="numba")
        assert np.abs(y - ref_train(x, None, None, axis, 1e-5)).max() <= 2e-6


def test_backend_validation(monkeypatch, rng):
    x = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        bn.batch_norm_train(x, None, None, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        bn.BatchNorm(3, backend="fast")
    monkeypatch.setattr(_dispatch, "_load_kernels", lambda: None)
    with pytest.raises(ImportError, match="needs numba"):
        bn.batch_norm_train(x, None, None, backend="numba")
    y, _ = bn.batch_norm_train(x, None, None, backend="auto")  # falls back to NumPy
    assert y.shape == x.shape


@numba_only
def test_auto_dispatch_choice(rng, monkeypatch):
    small = rng.standard_normal((8, 3))
    big = rng.standard_normal((_dispatch.AUTO_NUMBA_MIN_SIZE // 4 + 1, 4))

    def sel(name, x, axis):
        return _dispatch.plan(name, x, axis).backend.name

    # (8, 3, 2) with feature axis 1 is small and of a layout the serial kernels do not fuse
    small = rng.standard_normal((8, 3, 2))
    assert sel("auto", small, 1) == "numpy"
    # ... judged in memory order: the same logical shape over (8, 2, 3) memory has its
    # features innermost, a layout the serial kernels do in one pass
    assert sel("auto", rng.standard_normal((8, 2, 3)).transpose(0, 2, 1), 1) == "numba"
    assert sel("auto", big, 1) == "numba"
    assert sel("numba", small, 1) == "numba"
    # non-adjacent feature axes take the general NumPy path
    x4 = rng.standard_normal((3, 4, 5, 6))
    assert sel("numba", x4, (1, 3)) == "numpy"


def test_backends_share_one_contract():
    import inspect

    from batchnorm.backends.numpy import NumpyBackend

    if not _dispatch.numba_available():
        pytest.skip("numba not installed")
    from batchnorm.backends.numba.backend import NumbaBackend

    for method in (
        "supports",
        "work",
        "work_dy",
        "moments",
        "moments_shifted",
        "affine",
        "grad_sums",
        "input_grad",
        "train",
        "backward",
    ):
        a = inspect.signature(getattr(NumpyBackend, method))
        b = inspect.signature(getattr(NumbaBackend, method))
        assert list(a.parameters) == list(b.parameters), method


@numba_only
def test_inputs_are_read_in_place_or_copied_once(rng, monkeypatch):
    """A transpose of a C-contiguous input is read in place (in its memory order), and so is
    a dy laid out like it; any other non-contiguous input is copied once, in the forward
    pass; float16 is never converted."""
    from batchnorm.backends.numba import plan as P

    copies = []
    real = P.contiguous

    def counting(a):
        out = real(a)
        if not np.shares_memory(out, a):
            copies.append(a.size)
        return out

    monkeypatch.setattr(P, "contiguous", counting)
    base = rng.standard_normal((64, 70, 8)).astype(np.float32)
    x = base.transpose(0, 2, 1)  # (64, 8, 70), feature axis 1 innermost in memory
    y, cache = bn.batch_norm_train(x, None, None, backend="numba")
    assert copies == [] and cache.work is x
    assert y.strides == x.strides  # the result is laid out like the input
    dy = rng.standard_normal(base.shape).astype(np.float32).transpose(0, 2, 1)
    bn.batch_norm_backward(dy, cache, backend="numba")
    assert copies == []
    bn.batch_norm_backward(np.ascontiguousarray(dy), cache, backend="numba")
    assert copies == [x.size]  # a dy laid out unlike x: copied into x's layout, once
    copies.clear()
    xs = rng.standard_normal((64, 16, 70)).astype(np.float32)[:, ::2]  # no transpose
    y, cache = bn.batch_norm_train(xs, None, None, backend="numba")
    assert copies == [xs.size] and cache.work.flags.c_contiguous
    bn.batch_norm_backward(np.ones(xs.shape, np.float32), cache, backend="numba")
    assert copies == [xs.size]
    h = rng.standard_normal((64, 8, 70)).astype(np.float16)
    _, cache = bn.batch_norm_train(h, None, None, backend="numba")
    bn.batch_norm_backward(h, cache, backend="numba")
    assert copies == [xs.size] and cache.work is h


@numba_only
def test_float16_conversions_match_numpy_bit_for_bit():
    from batchnorm.backends.numba import kernels as K

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 2**32, size=1_000_000, dtype=np.uint64).astype(np.uint32)]
    # every region where rounding changes behaviour: inf/NaN, overflow to inf, the largest
    # finite half, the normal/subnormal boundary, the flush-to-zero boundary, zero, one
    for c in (0x7F800000, 0x477FF000, 0x477FE000, 0x38800000, 0x387FE000, 0x33000000, 0, 1 << 30):
        r = np.arange(c - 3000, c + 3000, dtype=np.int64).clip(0, 2**31 - 1).astype(np.uint32)
        parts += [r, r | np.uint32(0x80000000)]
    f = np.concatenate(parts).view(np.float32)
    with np.errstate(over="ignore"):
        ref = f.astype(np.float16)
    got = K.float_to_half(f)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], ref.view(np.uint16)[~nan])
    assert np.isnan(got[nan]).all()
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    back = K.half_to_float(h)
    ok = ~np.isnan(h)
    np.testing.assert_array_equal(back[ok], h[ok].astype(np.float32))
    assert np.isnan(back[~ok]).all()


def test_layer_passes_its_backend_to_every_kernel(rng, monkeypatch):
    seen = []
    real = _dispatch.plan

    def spy(name, x, axis):
        seen.append(name)
        return real(name, x, axis)

    import batchnorm._compose
    import batchnorm.layers.base

    monkeypatch.setattr(batchnorm._compose, "plan", spy)
    monkeypatch.setattr(batchnorm.layers.base, "plan", spy)
    layer = bn.BatchNorm(3, backend="numpy")
    x = rng.standard_normal((8, 3))
    layer(x)
    layer.backward(x)
    layer.eval()(x)
    layer.backward(x)
    assert seen == ["numpy"] * 4


@pytest.mark.parametrize("shape", [(8, 3), (64, 5), (4096, 3)])
def test_a_nan_feature_leaves_the_other_features_statistics_alone(shape):
    # the fused column-strip kernel once rescaled every column of a strip when one column's
    # sum was non-finite (NaN), and the others' variances underflowed to 0
    x = np.random.default_rng(0).normal(size=shape)
    x[0, 1] = np.nan
    for backend in ("numpy", "numba"):
        _, cache = bn.batch_norm_train(x, None, None, backend=backend)
        ref = np.delete(x, 1, axis=1)
        np.testing.assert_allclose(np.delete(cache.var, 1), ref.var(0), rtol=1e-12)
        assert np.isnan(cache.var[1])


_NP_FILLS = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange"}


def _fills_outside_prange(fn) -> list[str]:
    """``np.zeros``-like calls of a kernel's source that lie outside its ``prange`` loops:
    in a ``parallel=True`` function numba makes each of them a parallel region of its own
    (one more thread launch and barrier per call)."""
    import ast
    import inspect
    import textwrap

    func = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    found = []

    def is_prange(node):
        it = node.iter
        return isinstance(it, ast.Call) and getattr(it.func, "id", None) == "prange"

    def visit(stmts):
        for st in stmts:
            if isinstance(st, ast.For) and is_prange(st):
                continue
            nested = [s for k in ("body", "orelse") for s in getattr(st, k, [])]
            head = [n for n in ast.iter_child_nodes(st) if n not in nested]
            for part in head:
                for sub in ast.walk(part):
                    f = getattr(sub, "func", None)
                    if isinstance(f, ast.Attribute) and f.attr in _NP_FILLS:
                        found.append(f"{fn.__name__}: np.{f.attr} (line {sub.lineno})")
            visit(nested)

    visit(func.body)
    return found


def test_parallel_kernels_launch_one_parallel_region():
    """No parallel kernel allocates with np.zeros (or alike) outside its prange loop, which
    would cost an extra parallel region per call (3 instead of 2 per channels-last pass;
    under contention each region waits for a busy core)."""
    from batchnorm.backends.numba import passes, reductions

    def bad(x, n):  # negative control: the pattern the check exists to catch
        s = np.zeros((n, 4))
        for t in prange(n):  # noqa: F821
            s[t] = 1.0
        return s

    assert _fills_outside_prange(bad) == ["bad: np.zeros (line 2)"]
    found = [
        f for k in (*reductions.KERNELS, *passes.KERNELS) for f in _fills_outside_prange(k.py_func)
    ]
    assert found == []


@pytest.mark.parametrize(("xdt", "dydt"), [("f4", "f4"), ("f4", "f8"), ("f2", "f2"), ("f8", "f8")])
def test_gradient_primitives_agree_with_a_float64_reference(rng, xdt, dydt):
    # the NumPy backend's grad_sums / input_grad are core.passes' (issue 22: one
    # implementation); the compiled ones compile the same coefficient formulas
    from batchnorm.backends.numpy import NumpyBackend

    backends = [NumpyBackend]
    if _dispatch.numba_available():
        from batchnorm.backends.numba.backend import NumbaBackend

        backends.append(NumbaBackend)
    x = (rng.standard_normal((40, 3, 5)) * 2 + 7).astype(xdt)
    dy = rng.standard_normal(x.shape).astype(dydt)
    mean = x.astype(np.float64).mean((0, 2))
    k, p, q = rng.standard_normal((3, 3))
    xc = x.astype(np.float64) - mean[:, None]
    d64 = dy.astype(np.float64)
    ref_s1, ref_s2 = d64.sum((0, 2)), (d64 * xc).sum((0, 2))
    ref_dx = k[:, None] * d64 + p[:, None] * xc + q[:, None]
    tol = {"f2": 2e-3, "f4": 2e-6, "f8": 1e-12}[xdt]
    for be in backends:
        s1, s2 = be.grad_sums(x, dy, (1,), mean)
        np.testing.assert_allclose(s1, ref_s1, rtol=tol, atol=tol * 40, err_msg=be.name)
        np.testing.assert_allclose(s2, ref_s2, rtol=tol, atol=tol * 40, err_msg=be.name)
        dx = be.input_grad(x, dy, (1,), mean, k, p, q, x.dtype)
        assert dx.dtype == x.dtype
        scale = np.abs(ref_dx).max()
        assert np.abs(dx.astype(np.float64) - ref_dx).max() <= 4 * tol * scale, be.name
    # control: a wrong mean moves the centred sum by (mean shift) * sum(dy)
    _, s2_off = NumpyBackend.grad_sums(x, dy, (1,), mean + 1.0)
    assert not np.allclose(s2_off, ref_s2, rtol=tol, atol=tol * 40)


@numba_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_strips_write_the_bits_of_the_one_call_kernels(rng, dtype):
    """``small.train_cols`` / ``backward_cols`` over any partition of the columns, in any
    order (the native torch node runs such strips on torch's threads), write the bits of
    ``train_rows`` / ``backward_rows``; ``plain_stats`` after the strips gives their flag.
    Negative control: strips that leave one column out (an offset bug) are seen."""
    from batchnorm.backends.numba import small as S
    from batchnorm.backends.numpy import OVERFLOW_LIMIT

    o, k = 37, 300
    x = (rng.standard_normal((o, k)) * 3 + 2).astype(dtype)
    dy = rng.standard_normal((o, k)).astype(dtype)
    g = rng.uniform(0.5, 1.5, k).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    big = OVERFLOW_LIMIT[np.dtype(dtype).itemsize]
    limit = float(np.finfo(dtype).max) / 8

    def run(strips):
        stats = np.full((3, k), np.nan)
        y, dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
        gw, gb = np.full(k, np.nan, dtype), np.full(k, np.nan, dtype)
        c4, c5 = np.empty((4, k), dtype), np.empty((5, k), dtype)
        if strips is None:
            plain = S.train_rows(x, g, b, 1e-5, big, limit, c4, y, stats)
            S.backward_rows(x, dy, stats[0], stats[2], g, True, c5, dx, gw, gb)
            return plain, [y, stats, dx, gw, gb]
        for k0, w in strips:
            S.train_cols(x, g, b, 1e-5, big, c4, y, stats, k0, w)
        plain = S.plain_stats(stats, o, limit)
        for k0, w in strips[::-1]:
            S.backward_cols(x, dy, stats[0], stats[2], g, True, c5, dx, gw, gb, k0, w)
        return plain, [y, stats, dx, gw, gb]

    def same(a, b):
        return a[0] == b[0] and all(np.array_equal(u, v) for u, v in zip(a[1], b[1], strict=True))

    whole = run(None)
    assert whole[0] and not np.isnan(whole[1][2]).any()  # the reference is all written
    blocks = [(k0, min(16, k - k0)) for k0 in range(0, k, 16)]  # the last one ragged
    for strips in ([(0, k)], blocks, blocks[::-1], [(0, 5), (5, 100), (105, 195)]):
        assert same(run(strips), whole), strips
    assert not same(run([(0, 16), (17, k - 17)]), whole)  # column 16 never written
