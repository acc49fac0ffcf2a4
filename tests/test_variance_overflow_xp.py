"""Float64 data whose batch variance overflows float64 (1e308 and -1e308 mixed) are
refused by every eager array library as NumPy refuses them (the array-API path gave an
infinite variance and ``beta`` everywhere, silently); data scaled by a power of two give
exact results. JAX never branches on data (same results eagerly and under jit)."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _xp

DATA = np.array([[1e308, 1.0], [-1e308, 2.0], [1e308, 3.0], [-1e308, 5.0]])


def _namespace(name):
    if name == "torch":
        torch = pytest.importorskip("torch")
        return lambda a: torch.tensor(a, dtype=torch.float64)
    strict = pytest.importorskip("array_api_strict")
    return lambda a: strict.asarray(a, dtype=strict.float64)


@pytest.mark.parametrize("name", ["torch", "strict"])
def test_an_overflowing_variance_is_refused_eagerly(name):
    arr = _namespace(name)
    x, gamma, beta = arr(DATA), arr(np.ones(2)), arr(np.zeros(2))
    with pytest.raises(ValueError, match=r"variance of features \[0\] overflows float64"):
        bn.batch_norm_train(x, gamma, beta)
    layer = bn.BatchNorm(2).to(x)
    before = {k: np.array(v) for k, v in layer.state_dict().items()}  # NumPy copies
    for nonfinite in ("raise", "skip"):
        layer.nonfinite = nonfinite
        with pytest.raises(ValueError, match="overflows float64"):
            layer.forward(x)
        after = {k: np.array(v) for k, v in layer.state_dict().items()}
        assert all(np.array_equal(before[k], after[k]) for k in before)
        assert layer.skipped_updates == 0


@pytest.mark.parametrize("name", ["torch", "strict"])
def test_the_same_data_scaled_by_a_power_of_two_are_exact(name):
    arr = _namespace(name)
    scaled = DATA * 2.0**-600  # exact
    y, _ = bn.batch_norm_train(arr(scaled), arr(np.ones(2)), arr(np.zeros(2)))
    mean, var = scaled.mean(axis=0), scaled.var(axis=0)
    ref = (scaled - mean) / np.sqrt(var + 1e-5)
    y = np.asarray(_xp.to_numpy(y), np.float64)
    np.testing.assert_allclose(y[:, 0], ref[:, 0], rtol=1e-12)  # +-1 for feature 0
    np.testing.assert_allclose(y[:, 1], ref[:, 1], rtol=1e-12, atol=1e-300)


def test_float32_data_are_not_checked_and_stay_finite():
    torch = pytest.importorskip("torch")
    x = torch.tensor([[3e38, 1.0], [-3e38, 2.0]] * 2, dtype=torch.float32)
    y, _ = bn.batch_norm_train(x, None, None)
    assert bool(torch.isfinite(y).all())
    np.testing.assert_allclose(y[:, 0].numpy(), [1, -1, 1, -1], rtol=1e-6)
