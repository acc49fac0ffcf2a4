"""PyTorch's tool tests on BatchNorm, ported: test/nn/test_load_state_dict.py,
test/optim/test_swa_utils.py's update_bn tests, and torchvision's FrozenBatchNorm2d tests
(torchvision is not installed: its frozen layer is checked against the formula and
``torch.nn.BatchNorm2d`` in eval). Written from reading the upstream tests.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("batchnorm.torch")

IMPLS = {"torch.nn": torch.nn, "ours": bt}


@pytest.fixture(params=list(IMPLS), ids=list(IMPLS))
def impl(request):
    return IMPLS[request.param]


# ---------------------------------------------------------------- test_load_state_dict.py
def test_load_state_dict_bc(impl):
    """A version-1 checkpoint (no num_batches_tracked) loads; the module keeps its own
    counter (torch >= 2.1's migration)."""
    m = impl.BatchNorm2d(3)
    m(torch.randn(4, 3, 2, 2))
    sd = m.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    new = impl.BatchNorm2d(3)
    new.num_batches_tracked.fill_(7)
    new.load_state_dict(sd)
    assert int(new.num_batches_tracked) == 7
    torch.testing.assert_close(new.running_mean, m.running_mean)


def test_load_state_dict_partial_keeps_counter(impl):
    """strict=False with the counter missing keeps the module's counter."""
    m = impl.BatchNorm2d(3)
    for _ in range(3):
        m(torch.randn(4, 3, 2, 2))
    res = m.load_state_dict({}, strict=False)
    assert int(m.num_batches_tracked) == 3
    assert "running_mean" in res.missing_keys


def test_load_state_dict_version_and_keys(impl):
    m = impl.BatchNorm1d(4)
    sd = m.state_dict()
    assert sd._metadata[""]["version"] == 2
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    torch.nn.BatchNorm1d(4).load_state_dict(sd)


def test_load_state_dict_assign(impl):
    """assign=True (meta-device init then load) gives the loaded tensors."""
    with torch.device("meta"):
        m = impl.BatchNorm1d(4)
    src = torch.nn.BatchNorm1d(4)
    src(torch.randn(8, 4))
    m.load_state_dict(src.state_dict(), assign=True)
    assert m.running_mean.device.type == "cpu"
    torch.testing.assert_close(m.running_mean, src.running_mean)
    m.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(m(x), src.eval()(x))


# ---------------------------------------------------------------- test_swa_utils.py
def _loader(n_batches, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(n_batches)]


@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 3, 3)], ids=["1d", "2d"])
def test_update_bn(impl, shape):
    """update_bn sets every BN layer's running statistics to those of all the data."""
    from torch.optim.swa_utils import update_bn

    name = "BatchNorm1d" if len(shape) == 2 else "BatchNorm2d"
    bn = getattr(impl, name)(5, dtype=torch.float64)
    model = torch.nn.Sequential(bn)
    data = _loader(6, shape)
    model.eval()
    update_bn(data, model)
    allx = torch.cat(data, 0)
    red = [d for d in range(len(shape)) if d != 1]
    torch.testing.assert_close(bn.running_mean, allx.mean(red))
    assert not bn.training and bn.momentum == 0.1


def test_update_bn_with_tuples_and_momentum_restored(impl):
    from torch.optim.swa_utils import update_bn

    bn = impl.BatchNorm1d(5, momentum=0.3, dtype=torch.float64)
    data = [(x, 0) for x in _loader(3, (6, 5))]
    update_bn(data, torch.nn.Sequential(bn))
    torch.testing.assert_close(bn.running_mean, torch.cat([x for x, _ in data]).mean(0))
    assert bn.momentum == 0.3


# ---------------------------------------------------------------- torchvision FrozenBatchNorm2d
def test_frozen_batchnorm_matches_eval_batchnorm():
    """test_frozenbatchnorm2d_eps: the frozen layer equals BatchNorm2d in eval (same state)."""
    ref = torch.nn.BatchNorm2d(4, eps=1e-3).eval()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.normal_()
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2)
    frozen = bt.FrozenBatchNorm2d(4, eps=1e-3)
    frozen.load_state_dict(ref.state_dict())  # num_batches_tracked dropped
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(frozen(x), ref(x))
    assert "num_batches_tracked" not in frozen.state_dict()
    assert all(not p for p in frozen.parameters())


def test_frozen_batchnorm_repr_and_buffers():
    f = bt.FrozenBatchNorm2d(3, eps=1e-4)
    assert repr(f) == "FrozenBatchNorm2d(3, eps=0.0001)"
    assert set(dict(f.named_buffers())) == {"weight", "bias", "running_mean", "running_var"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_from_batchnorm_exact(dtype, bias):
    """from_batchnorm copies exactly (dtype kept, no bias -> zero shift)."""
    src = torch.nn.BatchNorm2d(3, bias=bias, dtype=dtype).eval()
    with torch.no_grad():
        src.running_mean.fill_(1e6).add_(torch.tensor([0.25, 0.5, 0.75], dtype=dtype))
        src.running_var.fill_(4.0)
        src.weight.fill_(1.5)
    f = bt.FrozenBatchNorm2d.from_batchnorm(src)
    assert f.running_mean.dtype == dtype
    x = torch.randn(2, 3, 4, 4, dtype=dtype) + 1e6
    rm, rv = src.running_mean.double().view(1, 3, 1, 1), src.running_var.double().view(1, 3, 1, 1)
    ref = (x.double() - rm) / (rv + src.eps).sqrt() * 1.5
    torch.testing.assert_close(f(x).double(), ref, atol=1e-6, rtol=0)  # exact far from zero
    assert f(x).dtype == dtype


def test_frozen_from_batchnorm_without_running_stats_is_refused():
    src = torch.nn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        bt.FrozenBatchNorm2d.from_batchnorm(src)
