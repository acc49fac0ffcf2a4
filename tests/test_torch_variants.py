"""batchnorm.torch's BatchRenorm, GhostBatchNorm, FrozenBatchNorm2d, convert/revert and
recalibrate, against reference formulas and torch's own modules."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("batchnorm.torch")
F = torch.nn.functional


def _keras2_renorm(x, gamma, beta, mu, sigma, rmax, dmax, eps, momentum):
    """Keras 2's published renorm (NCHW, features on axis 1), float64: output and the new
    moving mean and std (``momentum`` here weights the new value)."""
    red = (0, *range(2, x.ndim))
    bs = (1, -1) + (1,) * (x.ndim - 2)
    mean_b, var_b = x.mean(red), x.var(red)
    std_b = np.sqrt(var_b + eps)
    r = np.clip(std_b / sigma, 1 / rmax, rmax)
    d = np.clip((mean_b - mu) / sigma, -dmax, dmax)
    x_hat = (x - mean_b.reshape(bs)) / std_b.reshape(bs) * r.reshape(bs) + d.reshape(bs)
    y = gamma.reshape(bs) * x_hat + beta.reshape(bs)
    return y, (1 - momentum) * mu + momentum * mean_b, (1 - momentum) * sigma + momentum * std_b


def test_batch_renorm_matches_keras2_formulas_over_steps():
    gen = np.random.default_rng(0)
    m = bt.BatchRenorm(4, dtype=torch.float64, rmax=1.5, dmax=0.5, momentum=0.3)
    gamma, beta = gen.random(4) + 0.5, gen.standard_normal(4)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(gamma))
        m.bias.copy_(torch.from_numpy(beta))
    mu, sigma = np.zeros(4), np.ones(4)
    for step in range(4):
        x = gen.standard_normal((8, 4, 3, 3)) * (1 + step) + step
        y = m(torch.from_numpy(x)).detach().numpy()
        ref, mu, sigma = _keras2_renorm(x, gamma, beta, mu, sigma, 1.5, 0.5, 1e-5, 0.3)
        np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(m.running_mean.numpy(), mu, rtol=1e-12)
        np.testing.assert_allclose(np.sqrt(m.running_var.numpy() + 1e-5), sigma, rtol=1e-12)
    m.eval()
    x = gen.standard_normal((5, 4, 2, 2))
    ref = gamma.reshape(1, -1, 1, 1) * (x - mu.reshape(1, -1, 1, 1)) / sigma.reshape(
        1, -1, 1, 1
    ) + beta.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(m(torch.from_numpy(x)).detach().numpy(), ref, rtol=1e-10)
    # its state loads into torch's BatchNorm2d, whose evaluation then agrees
    bn = torch.nn.BatchNorm2d(4, dtype=torch.float64).eval()
    bn.load_state_dict(m.state_dict())
    torch.testing.assert_close(bn(torch.from_numpy(x)), m(torch.from_numpy(x)))


def test_batch_renorm_backward_holds_r_and_d_constant():
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(3, generator=gen, dtype=torch.float64)
    sigma = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    op = bt.RenormOp(1e-5, 1.2, 0.3, mu, sigma)
    x = torch.randn(6, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = bt.NormFunction.apply(x, w, b, op)
    dy = torch.randn(6, 3, 2, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w, b), dy)
    # reference: the formula by torch autograd with r and d detached
    mean = x.mean((0, 2), keepdim=True)
    std = (x.var((0, 2), unbiased=False, keepdim=True) + 1e-5).sqrt()
    r = (std / sigma.view(1, -1, 1)).clamp(1 / 1.2, 1.2).detach()
    d = ((mean - mu.view(1, -1, 1)) / sigma.view(1, -1, 1)).clamp(-0.3, 0.3).detach()
    ref_y = w.view(1, -1, 1) * ((x - mean) / std * r + d) + b.view(1, -1, 1)
    torch.testing.assert_close(y, ref_y)
    for a, e in zip(got, torch.autograd.grad(ref_y, (x, w, b), dy), strict=True):
        torch.testing.assert_close(a, e)
    # gradcheck where r and d are clipped (locally constant), r != 1 and d != 0
    far = bt.RenormOp(1e-5, 1.2, 0.3, mu - 1e3, sigma * 100)
    x0 = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: bt.NormFunction.apply(*a, far), (x0, w, b))


def test_batch_renorm_large_offset_and_limits():
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((4096, 8)) + 1e6).float()
    m = bt.BatchRenorm(8, rmax=1.0, dmax=0.0)  # plain batch norm
    y = m(x).detach().double()
    xd = x.double()
    ref = (xd - xd.mean(0)) / (xd.var(0, unbiased=False) + 1e-5).sqrt()
    assert (y - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="rmax"):
        bt.BatchRenorm(8, rmax=0.5)
    m.dmax = -1.0
    before = m.running_mean.clone()
    with pytest.raises(ValueError, match="dmax"):
        m(x)
    assert torch.equal(before, m.running_mean)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_ghost_batch_norm_is_batch_norm_per_virtual_batch(memory_format):
    gen = torch.Generator().manual_seed(3)
    m = bt.GhostBatchNorm(4, virtual_batch_size=3, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
        m.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    x = torch.randn(10, 4, 3, 2, generator=gen, dtype=torch.float64) * 3 + 2
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(10, 4, 3, 2, generator=gen, dtype=torch.float64)
    y = m(x)
    got = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
    w, b = m.weight.detach().requires_grad_(), m.bias.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    chunks = [xr[0:3], xr[3:6], xr[6:9], xr[9:10]]  # the last holds 6 values per channel
    ref = torch.cat([F.batch_norm(c, None, None, w, b, training=True) for c in chunks])
    torch.testing.assert_close(y, ref)
    for a, e in zip(got, torch.autograd.grad(ref, (xr, w, b), dy), strict=True):
        torch.testing.assert_close(a, e)
    means = torch.stack([c.detach().mean((0, 2, 3)) for c in chunks])
    sizes = torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64).view(-1, 1)
    torch.testing.assert_close(m.running_mean, 0.1 * (means * sizes).sum(0) / 10)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bt.GhostBatchNorm(4, virtual_batch_size=1)(torch.randn(4, 4))
    # a last virtual batch with a single value per channel joins the one before
    g = bt.GhostBatchNorm(2, virtual_batch_size=2, dtype=torch.float64)
    x2 = torch.randn(5, 2, dtype=torch.float64)
    ref2 = torch.cat(
        [
            F.batch_norm(x2[:2], None, None, training=True),
            F.batch_norm(x2[2:], None, None, training=True),
        ]
    )
    torch.testing.assert_close(g(x2), ref2)


def test_ghost_gradcheck():
    op = bt.GhostOp(1e-5, 2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: bt.NormFunction.apply(*a, op), (x, w, b))


def test_frozen_batch_norm_is_torchvisions():
    f = bt.FrozenBatchNorm2d(4)
    assert list(f.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert not list(f.parameters())
    bn = torch.nn.BatchNorm2d(4)
    bn(torch.randn(8, 4, 3, 3) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    f.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, as torchvision does
    x = torch.randn(5, 4, 3, 3, requires_grad=True)
    scale = f.weight * (f.running_var + f.eps).rsqrt()
    ref = x * scale.view(1, -1, 1, 1) + (f.bias - f.running_mean * scale).view(1, -1, 1, 1)
    f.train()  # frozen in training too
    y = f(x)
    torch.testing.assert_close(y, ref)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, scale.view(1, -1, 1, 1).expand_as(x))
    assert repr(f) == "FrozenBatchNorm2d(4, eps=1e-05)"
    g = bt.FrozenBatchNorm2d.from_batchnorm(bn)
    torch.testing.assert_close(g(x), ref)


def test_convert_and_revert_keep_state_exactly():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(36, affine=False)),
    )
    model(torch.randn(6, 3, 3, 3))
    model.eval()
    ref = copy.deepcopy(model)
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ours = bt.convert_batchnorm(model)
    assert type(ours[1]) is bt.BatchNorm2d and type(ours[2][1]) is bt.BatchNorm1d
    assert ours[1].momentum is None and not ours[2][1].affine and not ours[1].training
    for k, v in ours.state_dict(keep_vars=True).items():
        assert v is tensors[k], k  # the same tensors: the optimizer still holds them
    assert opt.param_groups[0]["params"][2] is ours[1].weight
    x = torch.randn(5, 3, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))
    back = bt.revert_batchnorm(ours)
    assert type(back[1]) is torch.nn.BatchNorm2d and type(back[2][1]) is torch.nn.BatchNorm1d
    torch.testing.assert_close(back(x), ref(x))
    assert type(bt.convert_batchnorm(torch.nn.BatchNorm3d(2))) is bt.BatchNorm3d
    sync = bt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    assert type(sync[1]) is bt.SyncBatchNorm
    torch.testing.assert_close(sync(x), ref(x))  # not distributed: plain batch norm


def test_recalibrate_gives_the_exact_statistics_and_keeps_modes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bt.BatchNorm2d(4), torch.nn.ReLU())
    model.eval()
    data = [(torch.randn(n, 3, 4, 4) * 2 + i, 0) for i, n in enumerate((8, 5, 3))]
    bt.recalibrate(model, data)
    assert not model.training and int(model[1].num_batches_tracked) == 0
    z = torch.cat([model[0](x) for x, _ in data]).detach().double()
    torch.testing.assert_close(
        model[1].running_mean.double(), z.mean((0, 2, 3)), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(
        model[1].running_var.double(), z.var((0, 2, 3)), rtol=1e-6, atol=1e-6
    )
    # negative control: torch's update_bn (an average of per-batch variances) differs
    other = bt.revert_batchnorm(copy.deepcopy(model))
    torch.optim.swa_utils.update_bn([x for x, _ in data], other)
    assert (other[1].running_var.double() - z.var((0, 2, 3))).abs().max() > 1e-3
    # a failing loader changes nothing
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken():
        yield data[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        bt.recalibrate(model, broken())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="no batches"):
        bt.recalibrate(model, [])


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), bt.BatchNorm1d(4))
        self.unused_head = bt.BatchNorm1d(4)

    def forward(self, x):
        return self.body(x)


def test_recalibrate_with_an_unused_layer_completes_and_names_it():
    torch.manual_seed(1)
    model = _TwoHeads()
    with torch.no_grad():
        model.unused_head.running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in model.unused_head.state_dict().items()}
    data = [torch.randn(6, 3) + 2 for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="unused_head"):
        done = bt.recalibrate(model, data)
    assert done == [model.body[1]]
    for k, v in model.unused_head.state_dict().items():
        assert torch.equal(v, before[k]), k
    z = torch.cat([model.body[0](x) for x in data]).detach().double()
    torch.testing.assert_close(model.body[1].running_mean.double(), z.mean(0))


@pytest.mark.parametrize("kind", ["bn", "eval", "renorm", "ghost"])
def test_the_device_path_on_cpu_tensors(kind, monkeypatch):
    """The path CUDA/MPS tensors take (tensors handed to the array-API kernels, no NumPy
    views), forced on CPU tensors: the same results as the CPU path."""
    import dataclasses

    from batchnorm.adapters.torch import _bridge

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64) + 2
    dy = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    ops = {
        "bn": lambda: bt.BatchNormOp(1e-5),
        "eval": lambda: bt.BatchNormOp(1e-5, rm, rv),
        "renorm": lambda: bt.RenormOp(1e-5, 1.2, 0.3, rm, rv.sqrt()),
        "ghost": lambda: bt.GhostOp(1e-5, 3),
    }

    def run():
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = bt.NormFunction.apply(xs, ws, bs, ops[kind]())
        return (y, *torch.autograd.grad(y, (xs, ws, bs), dy))

    host = run()
    plan = _bridge.plan
    monkeypatch.setattr(_bridge, "plan", lambda t: dataclasses.replace(plan(t), cpu=False))
    device = run()
    for a, e in zip(device, host, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    assert _bridge.plan(x).cpu is False  # the control: the path really changed


@pytest.mark.parametrize("kind", ["renorm", "ghost"])
def test_variants_are_batchnorms_that_torch_tools_handle(kind):
    """update_bn finds the variants (_BatchNorm) and sets their running statistics to the
    data's; fuse_conv_bn_eval fuses their evaluation form exactly."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    layer = (
        bt.BatchRenorm(4, dtype=torch.float64)
        if kind == "renorm"
        else bt.GhostBatchNorm(4, virtual_batch_size=4, dtype=torch.float64)
    )
    assert isinstance(layer, _BatchNorm)
    conv = torch.nn.Conv2d(3, 4, 1, dtype=torch.float64)
    model = torch.nn.Sequential(conv, layer)
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    torch.optim.swa_utils.update_bn(data, model)
    with torch.no_grad():
        z = torch.cat([conv(x) for x in data])
    torch.testing.assert_close(layer.running_mean, z.mean((0, 2, 3)))
    model.eval()
    fused = fuse_conv_bn_eval(conv, layer)
    torch.testing.assert_close(fused(data[0]), model(data[0]))
