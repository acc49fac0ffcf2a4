"""PyTorch's own BatchNorm tests, ported: test/test_nn.py's batchnorm tests and what
test/test_modules.py checks over common_modules.py's BatchNorm1d/2d/3d entries.

Written from reading the upstream tests (not copied). Every test runs on ``torch.nn`` (the
control, which must pass) and on :mod:`batchnorm.torch`; ``impl`` is the namespace.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("batchnorm.torch")

IMPLS = {"torch.nn": torch.nn, "ours": bt}


@pytest.fixture(params=list(IMPLS), ids=list(IMPLS))
def impl(request):
    return IMPLS[request.param]


# common_modules.py: constructor arguments and input shapes of the BatchNorm entries
CTOR = [
    ((), {}),
    ((2e-3, 0.3, False), {}),
    ((1e-3, None), {}),
    ((1e-3, 0.3, True, False), {}),
    ((1e-3, 0.3, False, False), {}),
]
SHAPES = {
    "BatchNorm1d": [(4, 5), (4, 5, 3)],
    "BatchNorm2d": [(2, 5, 6, 6)],
    "BatchNorm3d": [(2, 5, 4, 4, 4)],
}
CASES = [(name, shape) for name, shapes in SHAPES.items() for shape in shapes]
CASE_IDS = [f"{n}-{len(s)}D" for n, s in CASES]


def _make(impl, name, *args, **kw):
    return getattr(impl, name)(5, *args, **kw)


def _rand(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * 1.5 + 0.25


def _perturb(m):
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(_rand(p.shape, p.dtype, seed=10 + i))
        if m.running_mean is not None:
            m.running_mean.copy_(_rand(5, m.running_mean.dtype, seed=20) * 0.3)
            m.running_var.copy_(_rand(5, m.running_var.dtype, seed=21).abs() + 0.5)


# ---------------------------------------------------------------- test_modules.py
@pytest.mark.parametrize(("args", "kw"), CTOR, ids=[str(a) for a, _ in CTOR])
@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_module_inputs(impl, name, shape, args, kw, training):
    """test_modules.py test_grad: gradcheck with torch's defaults (batched grad checked)."""
    m = _make(impl, name, *args, dtype=torch.float64, **kw)
    _perturb(m)
    m.train(training)
    params = [p for p in m.parameters()]
    x = _rand(shape).requires_grad_()

    def fn(x, *ps):
        return m(x)

    torch.autograd.gradcheck(fn, (x, *params), check_batched_grad=True)


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_if_train_and_eval_modes_differ(impl, name, shape, training):
    """test_modules.py: with ``training`` deleted, forward fails with torch's
    AttributeError naming 'training' (the module reads the plain attribute)."""
    m = _make(impl, name)
    m.train(training)
    delattr(m, "training")
    with pytest.raises(AttributeError, match="'training'"):
        m(_rand(shape, torch.float32))


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_contiguous_tensors(impl, name, shape, training):
    """test_modules.py: a non-contiguous input and gradient give the contiguous results."""
    m = _make(impl, name, dtype=torch.float64)
    _perturb(m)
    m.train(training)
    m2 = copy.deepcopy(m)
    x = _rand(shape)
    dy = _rand(shape, seed=3)
    xa = x.clone().requires_grad_()
    m(xa).backward(dy)
    big = torch.stack([x, x], -1)[..., 0].requires_grad_()  # a strided view
    big_dy = torch.stack([dy, dy], -1)[..., 0]
    assert not big.is_contiguous()
    y = m2(big)
    y.backward(big_dy)
    torch.testing.assert_close(y, m(x.clone()) if not training else y)
    torch.testing.assert_close(big.grad, xa.grad)
    for p, q in zip(m.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    if m.running_mean is not None:
        torch.testing.assert_close(m.running_mean, m2.running_mean)


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_factory_kwargs(impl, name, shape, dtype):
    """test_modules.py test_factory_kwargs: parameters and buffers in the dtype/device."""
    m = _make(impl, name, device="cpu", dtype=dtype)
    for t in (*m.parameters(), m.running_mean, m.running_var):
        assert t.dtype == dtype and t.device.type == "cpu"
    assert m.num_batches_tracked.dtype == torch.long
    assert isinstance(m.weight, torch.nn.Parameter)
    assert "running_mean" in dict(m.named_buffers())
    m = _make(impl, name, device="meta")
    assert m.weight.device.type == "meta" and m.running_var.device.type == "meta"


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
def test_repr(impl, name, shape):
    m = _make(impl, name, 1e-3, None, True, False)
    assert repr(m) == repr(getattr(torch.nn, name)(5, 1e-3, None, True, False))


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "fmt", [torch.contiguous_format, torch.channels_last, torch.channels_last_3d], ids=str
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_memory_format(impl, name, shape, fmt, training):
    """test_modules.py test_memory_format: outputs keep the input's memory format."""
    if fmt is torch.channels_last and len(shape) != 4:
        pytest.skip("channels_last is 4D")
    if fmt is torch.channels_last_3d and len(shape) != 5:
        pytest.skip("channels_last_3d is 5D")
    m = _make(impl, name)
    m.train(training)
    x = _rand(shape, torch.float32).contiguous(memory_format=fmt).requires_grad_()
    y = m(x)
    assert y.is_contiguous(memory_format=fmt)
    y.backward(torch.ones_like(y))
    assert x.grad.is_contiguous(memory_format=fmt)


ERRORS = [
    ("BatchNorm1d", (4, 5, 3, 3), "expected 2D or 3D input"),
    ("BatchNorm1d", (5,), "expected 2D or 3D input"),
    ("BatchNorm2d", (4, 5, 3), "expected 4D input"),
    ("BatchNorm3d", (4, 5, 3, 3), "expected 5D input"),
    ("BatchNorm1d", (1, 5), "Expected more than 1 value per channel when training"),
    ("BatchNorm2d", (1, 5, 1, 1), "Expected more than 1 value per channel when training"),
]


@pytest.mark.parametrize(("name", "shape", "match"), ERRORS, ids=[f"{e[0]}-{e[1]}" for e in ERRORS])
def test_error_inputs(impl, name, shape, match):
    """common_modules.py's error inputs: ValueError with torch's message."""
    m = _make(impl, name)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        m(torch.randn(shape))
    if impl is bt:  # ours changes nothing on a refused call (torch counts the batch)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- test_nn.py
def test_batchnorm_buffer_update_when_stats_are_not_tracked(impl):
    m = impl.BatchNorm1d(5, track_running_stats=True)
    m.track_running_stats = False
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.rand(4, 5))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d"])
def test_batchnorm_simple_average(impl, name):
    """momentum=None: the running statistics are the plain average over the batches."""
    shape = (3, 5) if name == "BatchNorm1d" else (3, 5, 2, 2)
    m = _make(impl, name, momentum=None, dtype=torch.float64)
    xs = [_rand(shape, seed=s) for s in (1, 2)]
    m(xs[0])
    m(xs[1])
    red = [d for d in range(len(shape)) if d != 1]
    mean = sum(x.mean(red) for x in xs) / 2
    var = sum(x.var(red, unbiased=True) for x in xs) / 2
    torch.testing.assert_close(m.running_mean, mean)
    torch.testing.assert_close(m.running_var, var)
    assert int(m.num_batches_tracked) == 2
    m.reset_running_stats()
    m(xs[0])
    torch.testing.assert_close(m.running_mean, xs[0].mean(red))


def test_batchnorm_update_stats(impl):
    m = impl.BatchNorm1d(5, momentum=0.3, dtype=torch.float64)
    x = _rand((6, 5))
    m(x)
    torch.testing.assert_close(m.running_mean, 0.3 * x.mean(0))
    torch.testing.assert_close(m.running_var, 0.7 + 0.3 * x.var(0, unbiased=True))
    m.eval()
    before = m.running_mean.clone()
    m(x)
    assert torch.equal(m.running_mean, before) and int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_batchnorm_eval(impl, dtype):
    """Eval mode: the same output and gradient twice, from the running statistics."""
    m = impl.BatchNorm1d(5).to(dtype).eval()
    x = _rand((3, 5), dtype).requires_grad_()
    dy = _rand((3, 5), dtype, seed=2)
    y1 = m(x)
    y1.backward(dy)
    g1 = x.grad.clone()
    x.grad = None
    y2 = m(x)
    y2.backward(dy)
    assert torch.equal(y1, y2) and torch.equal(g1, x.grad)
    assert y1.dtype == dtype
    ref = x.detach().double() / (1 + 1e-5) ** 0.5
    torch.testing.assert_close(y1.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (2, 5, 3, 4, 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_nhwc_cpu(impl, shape, training):
    """channels_last output and gradients equal the contiguous ones and keep the format."""
    name = "BatchNorm2d" if len(shape) == 4 else "BatchNorm3d"
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    m = _make(impl, name, dtype=torch.float64)
    _perturb(m)
    m.train(training)
    ref = copy.deepcopy(m)
    x = _rand(shape)
    dy = _rand(shape, seed=4)
    a = x.contiguous(memory_format=fmt).requires_grad_()
    b = x.clone().requires_grad_()
    ya, yb = m(a), ref(b)
    ya.backward(dy.contiguous(memory_format=fmt))
    yb.backward(dy)
    assert ya.is_contiguous(memory_format=fmt) and a.grad.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)
    torch.testing.assert_close(m.running_var, ref.running_var)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=str)
def test_batchnorm_empty_batch(impl, training, fmt):
    """A batch of zero samples: torch's result (format kept), state untouched or as torch."""
    m = impl.BatchNorm2d(5)
    m.train(training)
    x = torch.randn(0, 5, 3, 3).contiguous(memory_format=fmt).requires_grad_()
    y = m(x)
    assert y.shape == x.shape and y.is_contiguous(memory_format=fmt)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_mixed_dtypes(impl, dtype, training):
    """test_batchnorm_{bfloat16,half}_mixed: low-precision input with float32 parameters,
    output in the input dtype; model.to(dtype): everything in dtype."""
    m = impl.BatchNorm2d(5)
    _perturb(m)
    m.train(training)
    x = _rand((4, 5, 3, 3), torch.float32)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    ref = (
        torch.nn.functional.batch_norm(
            x.to(dtype).float(),
            m.running_mean.clone(),
            m.running_var.clone(),
            m.weight.float(),
            m.bias.float(),
            training=False,
            eps=m.eps,
        )
        if not training
        else None
    )
    if ref is not None:
        torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    m2 = copy.deepcopy(m).to(dtype)
    y2 = m2(x.to(dtype).requires_grad_())
    assert y2.dtype == dtype and m2.running_mean.dtype == dtype
    y2.float().sum().backward()
    assert m2.weight.grad.dtype == dtype


@pytest.mark.parametrize("eps", [0.0, -1.0, 1e-30, 10.0])
def test_eps_as_torch(impl, eps):
    """Any float eps is taken; training refuses eps <= 0 and eval eps < 0 (ValueError)."""
    m = impl.BatchNorm1d(5, eps=eps, dtype=torch.float64)
    assert m.eps == eps
    ref = torch.nn.BatchNorm1d(5, eps=eps, dtype=torch.float64)
    _perturb(m)
    ref.load_state_dict(m.state_dict())
    x = _rand((8, 5)) * 3
    if eps <= 0:
        before = m.running_mean.clone()
        with pytest.raises(ValueError, match="eps must be positive"):
            m(x)
        assert torch.equal(m.running_mean, before)
    else:
        torch.testing.assert_close(m(x), ref(x))
    m.eval(), ref.eval()
    if eps < 0:
        with pytest.raises(ValueError, match="eps must be non-negative"):
            m(x)
    else:
        torch.testing.assert_close(m(x), ref(x))


def test_batchnorm_is_torch_class(impl):
    """Tools find BN layers by isinstance (swa_utils.update_bn, fusion, user loops)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"):
        m = _make(impl, name)
        assert isinstance(m, getattr(torch.nn, name)) and isinstance(m, _BatchNorm)
    assert isinstance(impl.SyncBatchNorm(5), _BatchNorm)


def test_sync_batchnorm_is_torch_class(impl):
    if impl is bt:
        pytest.xfail(
            "docs/guide/torch.md: batchnorm.torch.SyncBatchNorm is a _BatchNorm but not a "
            "torch.nn.SyncBatchNorm, because DistributedDataParallel refuses every "
            "torch.nn.SyncBatchNorm in a CPU module and this layer exists to run on CPU"
        )
    assert isinstance(impl.SyncBatchNorm(5), torch.nn.SyncBatchNorm)


def test_fuse_conv_bn_eval(impl):
    """torch.nn.utils.fusion.fuse_conv_bn_eval gives the conv + BN result."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv = torch.nn.Conv2d(3, 5, 3, dtype=torch.float64).eval()
    bn = impl.BatchNorm2d(5, dtype=torch.float64).eval()
    _perturb(bn)
    x = _rand((2, 3, 6, 6))
    fused = fuse_conv_bn_eval(conv, bn)
    torch.testing.assert_close(fused(x), bn(conv(x)))
