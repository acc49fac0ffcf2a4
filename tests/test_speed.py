"""Issue 11 (speed, round 2) and the kernel defects of issue 8: ``out=``, reusable layer
buffers, agreement of the two backends on huge finite data, float16 read in place, and
thread safety under numba's workqueue layer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ref_backward_train, ref_train

import batchnorm as bn
from batchnorm import backends as _dispatch

numba_only = pytest.mark.skipif(not _dispatch.numba_available(), reason="numba not installed")


# ----------------------------------------------------------------------------- overflow
HUGE_CASES = [
    # (x, expected mean, expected var, expected y) with exact answers
    (np.full((6, 3), 1.5e308), [1.5e308] * 3, [0.0] * 3, np.zeros((6, 3))),
    (
        np.array([[3.4e38], [3.4e38], [-3.4e38]] * 2, np.float32),
        [np.float64(np.float32(3.4e38)) / 3],
        [8 * np.float64(np.float32(3.4e38)) ** 2 / 9],
        np.array([[1.0], [1.0], [-2.0]] * 2) / np.sqrt(2.0),
    ),
]


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("case", range(len(HUGE_CASES)))
def test_huge_finite_data_exact_on_both_backends(case):
    x, mean, var, y_ref = HUGE_CASES[case]
    y, cache = bn.batch_norm_train(x, None, None)
    np.testing.assert_allclose(cache.mean, mean, rtol=1e-7)
    np.testing.assert_allclose(cache.var, var, rtol=1e-7)
    if y_ref is not None:
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    dx, _, _ = bn.batch_norm_backward(np.ones_like(x), cache)
    assert not np.isnan(dx).any()


@pytest.mark.usefixtures("backend")
def test_a_variance_that_overflows_float64_is_refused_not_zeroed():
    """Finite data whose variance (1e616) overflows float64: y would be 0 (beta) instead of
    values of order 1, so the kernels and the layer refuse, naming the features; data with
    an inf still propagate NaN."""
    x = np.array([[1e308, 1.0], [-1e308, 2.0]] * 3)
    with pytest.raises(ValueError, match=r"variance of features \[0\] overflows float64"):
        bn.batch_norm_train(x, None, None)
    layer = bn.BatchNorm(2, nonfinite="skip")
    with pytest.raises(ValueError, match="overflows float64"):
        layer(x)
    assert layer.skipped_updates == 0 and layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_var, 1.0)
    # the same data scaled by an exact power of two are fine
    y, _ = bn.batch_norm_train(x * 2.0**-600, None, None)
    np.testing.assert_allclose(y[:, 0], [1.0, -1.0] * 3, rtol=1e-12)
    y, cache = bn.batch_norm_train(np.array([[np.inf], [1.0], [2.0]]), None, None)
    assert np.isnan(y).all()  # non-finite data propagate, never refused


@pytest.mark.usefixtures("backend")
def test_huge_float64_layer_agrees():
    """The layer accepts (or refuses) the same batches on both backends."""
    layer = bn.BatchNorm(3)
    y = layer(np.full((6, 3), 1.5e308))
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_allclose(layer.last_batch_stats.mean, 1.5e308)
    with pytest.raises(ValueError, match="overflows float64"):
        bn.BatchNorm(1)(np.array([[1e308], [-1e308]] * 3))


@pytest.mark.usefixtures("backend")
def test_float64_dy_with_float32_x_does_not_overflow():
    # dy up to 1e39 does not fit float32, but dx = k dy (k ~ 1e-30) does
    x = np.array([[0.0], [1e30], [2e30], [3e30]], np.float32)
    dy = np.array([[1e39], [0.0], [-2e39], [5e38]])
    _, cache = bn.batch_norm_train(x, np.ones(1), np.zeros(1))
    dx, dg, db = bn.batch_norm_backward(dy, cache)
    ref_dx, ref_dg, ref_db = ref_backward_train(x, np.ones(1), dy, 1, 1e-5)
    assert dx.dtype == np.float32 and np.isfinite(dx).all()
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5)
    np.testing.assert_allclose(dg, ref_dg, rtol=1e-6)
    np.testing.assert_allclose(db, ref_db, rtol=1e-12)


# ----------------------------------------------------------------------------- out=
@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    "shape,axis", [((8, 3, 40), 1), ((50, 3), 1), ((4, 5, 6, 3), -1), ((6, 3, 5), 1)]
)
def test_out_is_filled_and_returned(rng, dtype, shape, axis):
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    y_ref, cache_ref = bn.batch_norm_train(x, g, b, axis=axis)
    out = np.full_like(x, np.nan)
    y, cache = bn.batch_norm_train(x, g, b, axis=axis, out=out)
    assert y is out
    np.testing.assert_array_equal(y, y_ref)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx_ref, dg_ref, _ = bn.batch_norm_backward(dy, cache_ref)
    dout = np.full_like(x, np.nan)
    dx, dg, _ = bn.batch_norm_backward(dy, cache, out=dout)
    assert dx is dout
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(dg, dg_ref)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    ye_ref = bn.batch_norm_eval(x, g, b, rm, rv, axis=axis)
    eout = np.empty_like(x)
    assert bn.batch_norm_eval(x, g, b, rm, rv, axis=axis, out=eout) is eout
    np.testing.assert_array_equal(eout, ye_ref)


@pytest.mark.usefixtures("backend")
def test_out_validation(rng):
    x = rng.standard_normal((6, 4))
    g = np.ones(4)
    bad = [
        ([1.0] * 24, TypeError, "numpy.ndarray"),
        (np.empty((4, 6)), ValueError, r"shape \(4, 6\)"),
        (np.empty((6, 4), np.float32), TypeError, "dtype float32"),
        (np.empty((4, 6)).T, ValueError, "C-contiguous"),
        (x, ValueError, "shares memory with x"),
        (np.ma.masked_array(np.empty((6, 4))), TypeError, "MaskedArray"),
    ]
    ro = np.empty((6, 4))
    ro.flags.writeable = False
    bad.append((ro, ValueError, "read-only"))
    for out, exc, match in bad:
        with pytest.raises(exc, match=match):
            bn.batch_norm_train(x, g, None, out=out)
        with pytest.raises(exc, match=match):
            bn.batch_norm_eval(x, g, None, g * 0, g, out=out)
    _, cache = bn.batch_norm_train(x, g, None)
    dy = rng.standard_normal(x.shape)
    for out in (dy, x, np.empty((6, 4), np.float32)):
        with pytest.raises((ValueError, TypeError)):
            bn.batch_norm_backward(dy, cache, out=out)
    # an out that is refused is never written
    keep = np.full((6, 4), 7.0)
    with pytest.raises(ValueError):
        bn.batch_norm_train(np.zeros((0, 4)), g, None, out=keep[:0])
    np.testing.assert_array_equal(keep, 7.0)


@pytest.mark.usefixtures("backend")
def test_layer_reuse_buffers(rng):
    layer = bn.BatchNorm(5, reuse_buffers=True)
    plain = bn.BatchNorm(5)
    x1, x2 = rng.standard_normal((2, 16, 5))
    y1 = layer(x1)
    first = y1.copy()
    np.testing.assert_array_equal(y1, plain(x1))
    dx1 = layer.backward(x1)
    np.testing.assert_array_equal(dx1, plain.backward(x1))
    y2 = layer(x2)
    assert y2 is y1  # the same buffer, now overwritten
    assert not np.array_equal(y2, first)
    np.testing.assert_array_equal(y2, plain(x2))
    assert layer.backward(x2) is dx1
    # a new shape or dtype gets a new buffer
    y3 = layer(rng.standard_normal((4, 5)).astype(np.float32))
    assert y3 is not y1 and y3.dtype == np.float32
    assert "reuse_buffers=True" in repr(layer)
    assert bn.BatchNorm.from_config(layer.config()).reuse_buffers
    assert "reuse_buffers" not in repr(plain)


# ----------------------------------------------------------------------------- float16
@numba_only
def test_float16_read_in_place(rng, monkeypatch):
    """float16 data are read and written by the kernels as float16: nothing is converted."""
    from batchnorm.backends.numba import kernels as K

    def fail(*a):
        raise AssertionError("converted")

    monkeypatch.setattr(K, "half_to_float", fail)
    monkeypatch.setattr(K, "float_to_half", fail)
    for shape in ((64, 8, 70), (300, 40), (20, 6, 3)):
        x = (rng.standard_normal(shape) * 3 + 100).astype(np.float16)
        y, cache = bn.batch_norm_train(x, None, None, backend="numba")
        assert cache.work is x and y.dtype == np.float16
        ref = ref_train(x, None, None, 1, 1e-5)
        np.testing.assert_allclose(y, ref, atol=1e-2, rtol=1e-2)
        dx, _, _ = bn.batch_norm_backward(x, cache, backend="numba")
        assert dx.dtype == np.float16


# ----------------------------------------------------------------------------- threads
@numba_only
def test_workqueue_layer_from_four_threads_does_not_abort():
    code = textwrap.dedent(
        """
        import threading, numpy as np, numba, batchnorm as bn
        x = np.random.default_rng(0).standard_normal((64, 16, 32)).astype(np.float32)
        def work():
            for _ in range(100):
                y, c = bn.batch_norm_train(x, None, None, backend="numba")
                bn.batch_norm_backward(x, c, backend="numba")
                bn.moments(x, backend="numba")
        ts = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        print("layer", numba.threading_layer())
        """
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "layer workqueue" in res.stdout


# ----------------------------------------------------------------------------- bench
def test_bench_marks_ratios_outside_the_goals():
    from batchnorm_demo.bench import Case, format_bench, goal

    big = Case("NCHW 100MB", (128, 64, 56, 56), 1)
    assert goal(big, "train") == 1.2 and goal(big, "backward") == 1.6
    assert goal(Case("h", (32, 64, 56, 56), 1, "float16"), "train") == 3.0
    assert goal(Case("f64", (32, 64, 56, 56), 1, "float64"), "train") is None
    row = {
        "case": big.name,
        "dtype": "float32",
        "pass": "train",
        "copy_s": 0.01,
        "numba_vs_copy": 1.3,
        "goal": 1.2,
    }
    small = {
        "case": "(60, 100)",
        "layer_us": 50.0,
        "layer_median_us": 55.0,
        "layer_reuse_us": 48.0,
        "pure_us": 40.0,
        "naive_us": 60.0,
        "torch_us": 40.0,
        "layer_vs_naive": 50 / 60,
        "layer_vs_torch": 50 / 40,
    }
    result = {
        "rows": [row, {**row, "pass": "eval", "numba_vs_copy": 0.9, "goal": 1.05}],
        "small": [small],
        "repeats": 3,
        "compile_s": None,
        "machine": {"cpus": 2, "threads": 2, "platform": "test"},
    }
    text = format_bench(result)
    lines = text.splitlines()
    assert "<= 1.2: MISSED" in next(line for line in lines if "| train |" in line)
    assert "<= 1.05: met" in next(line for line in lines if "| eval |" in line)
    small_line = next(line for line in lines if line.startswith("| (60, 100)"))
    assert "<= naive: met" in small_line and "<= torch: MISSED" in small_line


def test_bench_channels_last_cases_and_twin_ratios():
    """A case's memory order is honoured, and a channels-last case's numba time is reported
    over its NCHW twin's (same pass) in its own column."""
    from batchnorm_demo.bench import CASES, Case, format_bench
    from batchnorm_demo.bench.timing import twin_ratios

    view = Case("v", (2, 3, 4, 5), -1, memory=(0, 3, 1, 2), twin="t")
    a = np.arange(120.0).reshape(view.shape)
    x = view.arrange(a)
    np.testing.assert_array_equal(x, a)
    assert not x.flags.c_contiguous and x.transpose(view.memory).flags.c_contiguous
    assert Case("c", (2, 3), 1).arrange(a[0, 0, :2, :3]).flags.c_contiguous
    names = {c.name for c in CASES["quick"]}
    assert {"NHWC", "NHWC view of NCHW"} <= names
    assert all(c.twin in names for c in CASES["quick"] if c.twin)
    row = {"copy_s": 1e-3, "dtype": "float32", "numba_vs_copy": 1.0, "goal": None}
    rows = [
        {**row, "case": "t", "pass": "train", "numba_s": 2.0, "numba_median_s": 2.0},
        {**row, "case": "v", "pass": "train", "twin": "t", "numba_s": 3.0, "numba_median_s": 5.0},
        {**row, "case": "v", "pass": "eval", "twin": "t", "numba_s": 3.0, "numba_median_s": 5.0},
    ]
    twin_ratios(rows)
    assert "numba_vs_twin" not in rows[0] and "numba_vs_twin" not in rows[2]  # no twin row
    assert rows[1]["numba_vs_twin"] == 1.5 and rows[1]["numba_vs_twin_median"] == 2.5
    result = {"rows": rows, "repeats": 1, "machine": {"cpus": 2, "threads": 2, "platform": "t"}}
    lines = format_bench(result).splitlines()
    assert "numba / NCHW twin" in lines[2]
    assert "| 1.50 |" in next(line for line in lines if line.startswith("| v | float32 | train"))
