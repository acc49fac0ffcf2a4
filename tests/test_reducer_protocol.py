"""The reducer protocol carries synchronization: a layer hands both of its passes to
``reducer.dispatch`` and never asks whether it is distributed; the call record a
distributed reducer would send is not built for a local call."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.core.reduce import Call, LocalReducer


class SpyReducer(LocalReducer):
    """A single-process reducer that counts reads of ``distributed`` and dispatches."""

    def __init__(self) -> None:
        self.reads = 0
        self.calls: list[object] = []

    @property
    def distributed(self) -> bool:
        self.reads += 1
        return False

    def dispatch(self, local, synchronized, call, error, /, *args):
        self.calls.append(call)
        reads = self.reads  # the reducer's own reads (LocalReducer.dispatch) do not count
        try:
            return super().dispatch(local, synchronized, call, error, *args)
        finally:
            self.reads = reads


def test_a_layer_dispatches_through_its_reducer_without_asking(rng):
    layer = bn.BatchNorm(3)
    spy = SpyReducer()
    layer.reducer = spy  # the assignment check may read it
    spy.reads = 0
    x = rng.standard_normal((8, 3))
    y = layer.forward(x)
    layer.backward(np.ones_like(x))
    layer.eval()
    layer.forward(x)
    assert spy.reads == 0
    assert len(spy.calls) == 2  # the training and the evaluation forward
    assert not any(isinstance(c, Call) for c in spy.calls)  # built lazily, never here
    assert isinstance(spy.calls[0](), Call)  # what a distributed reducer would send
    ref, _ = bn.batch_norm_train(x, layer.gamma, layer.beta)
    np.testing.assert_array_equal(y, ref)


def test_the_spy_sees_a_read():
    """Negative control: a read of ``distributed`` is counted."""
    spy = SpyReducer()
    assert spy.distributed is False and spy.reads == 1


class FourMethods:
    """A reducer of the earlier protocol: no ``attempt`` / ``dispatch``."""

    distributed = False

    def agree(self, call, error, **fields):
        return None

    def merge(self, call, local, error, dtype):
        return local

    def sum(self, call, arrays, error=None):
        return arrays

    def gather(self, call, vector, error=None, **fields):
        return [0], [vector]


def test_a_reducer_without_dispatch_is_refused_clearly():
    x = np.ones((4, 3))
    with pytest.raises(TypeError, match="lacks attempt, dispatch"):
        bn.batch_norm_train(x, None, None, reducer=FourMethods())
    layer = bn.BatchNorm(3)
    with pytest.raises(TypeError, match="Reducer"):
        layer.reducer = FourMethods()
    assert isinstance(layer.reducer, LocalReducer)  # the refused assignment changed nothing


class Merging(LocalReducer):
    """A user reducer derived from LocalReducer that declares itself distributed."""

    distributed = True

    def __init__(self) -> None:
        self.merges = 0

    def merge(self, call, local, error, dtype):
        self.merges += 1
        assert isinstance(call, Call)  # built for a distributed reducer
        return super().merge(call, local, error, dtype)


def test_a_distributed_subclass_of_the_local_reducer_merges_through_its_methods(rng):
    x = rng.standard_normal((8, 3))
    red = Merging()
    y, cache = bn.batch_norm_train(x, None, None, reducer=red)
    assert red.merges == 1
    dx, _, _ = bn.batch_norm_backward(np.ones_like(x), cache, reducer=red)
    ref, ref_cache = bn.batch_norm_train(x, None, None)
    np.testing.assert_allclose(y, ref, atol=1e-12)
    layer = bn.BatchNorm(3, reducer=Merging())
    layer.forward(x)
    assert layer.reducer.merges == 1  # the constructor kept the reducer it was given


def test_a_timeout_beside_a_reducer_is_refused_not_ignored():
    with pytest.raises(TypeError, match="timeout=3 applies to comm="):
        bn.batch_norm_train(np.ones((4, 3)), None, None, reducer=LocalReducer(), timeout=3)
