"""The one plan cache (batchnorm._plans): one record per input signature, reused by the
public kernels, the layers and the torch adapter; a cached plan never skips a check."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _plans
from batchnorm.backends import Plan, plan


def test_a_signature_gets_one_plan_reused_by_every_call():
    x = np.ones((4, 3))
    first = plan("auto", x, 1)
    assert isinstance(first, Plan) and first.layout.fshape == (3,)
    assert plan("auto", x.copy(), 1) is first  # same shape, strides, dtype, axis
    assert plan("auto", np.ones((4, 3), np.float32), 1) is not first
    assert plan("auto", np.asfortranarray(x), 1) is not first  # other strides
    assert plan("numpy", x, 1).backend is bn.backends.NUMPY


def test_the_layers_and_kernels_fill_the_same_store():
    _plans.clear()
    x = np.random.default_rng(0).standard_normal((6, 5, 2))
    bn.batch_norm_train(x, None, None, axis=1)
    keys = [k for k in _plans.PLANS if k[0] == "auto" and k[1] == x.shape]
    assert len(keys) == 1
    bn.BatchNorm(5).forward(x)  # the same signature: no new plan
    assert [k for k in _plans.PLANS if k[0] == "auto" and k[1] == x.shape] == keys


@pytest.mark.parametrize("bad", [True, (True,), 1.0, [1, 1], (5,)])
def test_a_cached_plan_never_skips_the_axis_check(bad):
    x = np.ones((4, 3))
    plan("auto", x, 1)
    plan("auto", x, (1,))  # planted: plans whose keys compare equal to the bad axes
    with pytest.raises((TypeError, ValueError)):
        plan("auto", x, bad)
    with pytest.raises((TypeError, ValueError)):
        bn.batch_norm_train(x, None, None, axis=bad)


def test_an_unhashable_axis_or_backend_gets_the_checks_message():
    x = np.ones((4, 3))
    with pytest.raises(TypeError, match="axis"):
        plan("auto", x, [[1]])
    with pytest.raises(ValueError, match="backend must be one of"):
        plan(["auto"], x, 1)


def test_the_store_is_bounded(monkeypatch):
    monkeypatch.setattr(_plans, "LIMIT", 3)
    _plans.clear()
    for n in range(2, 9):
        plan("numpy", np.ones((n, 2)), 1)
    assert 0 < len(_plans.PLANS) <= 3


def test_the_torch_adapter_plans_in_the_same_store():
    torch = pytest.importorskip("torch")
    from batchnorm.adapters.torch import _cpu

    x = torch.randn(8, 3, 4, 4)
    lay = _cpu.layout(x)
    assert _plans.PLANS[("torch", x.shape, x.stride(), x.dtype)] is lay
    assert _cpu.layout(torch.randn(8, 3, 4, 4)) is lay
    cl = _cpu.layout(x.contiguous(memory_format=torch.channels_last))
    assert cl is not lay and cl.channels_last and not lay.channels_last
