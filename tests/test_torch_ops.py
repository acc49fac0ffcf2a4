"""The custom operators ``torch.ops.batchnorm.*`` and the tools that see them: compile with
no graph break, export, meta, torch.func, gradgradcheck; the eager lean route against them."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("batchnorm.torch")
fast = pytest.importorskip("batchnorm.adapters.torch.fast")

IMPLS = {"torch.nn": torch.nn, "ours": bt}


@pytest.fixture(params=list(IMPLS), ids=list(IMPLS))
def impl(request):
    return IMPLS[request.param]


def _net(impl):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        impl.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 16, 5),
        impl.BatchNorm1d(5),
    ).double()


def _x(shape=(4, 3, 4, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_has_no_graph_break(impl, training):
    model = _net(impl).train(training)
    explained = torch._dynamo.explain(model)(_x())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_matches_eager(training):
    ours = _net(bt).train(training)
    ref = copy.deepcopy(ours)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for seed in (1, 2):
        x = _x(seed=seed)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = compiled(xa), ref(xb)
        torch.testing.assert_close(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_compiled_nonfinite_batch_leaves_running_statistics():
    m = bt.BatchNorm1d(3)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    x = torch.randn(8, 3)
    x[0, 1] = float("inf")
    compiled(x)
    assert torch.equal(m.running_var, torch.ones(3)) and int(m.num_batches_tracked) == 0
    compiled(torch.randn(8, 3))
    assert int(m.num_batches_tracked) == 1 and not torch.equal(m.running_var, torch.ones(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export(impl, training):
    model = _net(impl).train(training)
    ref = copy.deepcopy(model)
    ep = torch.export.export(model, (_x(),))
    if impl is bt:
        names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        want = "batchnorm.train.default" if training else "batchnorm.eval.default"
        assert want in names, names
    x = _x(seed=3)
    torch.testing.assert_close(ep.module()(x), ref(x))


def test_meta_device(impl):
    for training in (True, False):
        m = impl.BatchNorm2d(4, device="meta").train(training)
        y = m(torch.empty(2, 4, 3, 3, device="meta").contiguous(memory_format=torch.channels_last))
        assert y.device.type == "meta" and y.shape == (2, 4, 3, 3)
        assert y.is_contiguous(memory_format=torch.channels_last)


def _functional(m):
    params = dict(m.named_parameters())
    buffers = dict(m.named_buffers())

    def f(p, x):
        return torch.func.functional_call(m, (p, buffers), (x,))

    return params, f


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_vmap_grad_jacrev(training):
    """vmap over a batch of inputs, grad over the parameters and jacrev, against torch.nn."""
    res = {}
    for name, impl in IMPLS.items():
        m = impl.BatchNorm1d(3, dtype=torch.float64, track_running_stats=not training)
        with torch.no_grad():
            m.weight.copy_(torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64))
        m.train(training)
        params, f = _functional(m)
        xs = _x((5, 4, 3))
        out = torch.func.vmap(f, in_dims=(None, 0))(params, xs)
        g = torch.func.grad(lambda p, x, f=f: f(p, x).square().sum())(params, xs[0])
        jac = torch.func.jacrev(lambda x, f=f, p=params: f(p, x))(xs[0])
        res[name] = (out, g["weight"], g["bias"], jac)
    for a, b in zip(res["ours"], res["torch.nn"], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck(impl, training):
    m = impl.BatchNorm2d(3, dtype=torch.float64).train(training)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.running_var.uniform_(0.5, 1.5)
    x = _x((3, 3, 2, 2)).requires_grad_()
    torch.autograd.gradgradcheck(lambda x, w, b: m(x), (x, m.weight, m.bias))


def test_gradgradcheck_sees_a_wrong_double_backward(monkeypatch):
    """Negative control: a wrong second derivative is caught by the same check."""
    from batchnorm.adapters.torch import _composed

    real = _composed.backward

    def wrong(dy, x, weight, mean, var, eps, batch_stats):
        dx, dw, db = real(dy, x, weight, mean, var, eps, batch_stats)
        return dx * 1.01, dw, db

    monkeypatch.setattr(_composed, "backward", wrong)
    m = bt.BatchNorm1d(3, dtype=torch.float64)
    x = _x((6, 3)).requires_grad_()
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradgradcheck(lambda x: m(x), (x,))


@pytest.mark.parametrize("shape", [(16, 5), (4, 5, 3, 3)], ids=["2D", "4D"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_lean_route_equals_the_operators(shape, fmt, dtype, monkeypatch):
    """The eager lean route and the custom operators give the same bits."""
    if fmt == "channels_last" and len(shape) != 4:
        pytest.skip("4D only")
    x = _x(shape).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif fmt == "strided":
        x = torch.stack([x, x], -1)[..., 1]
    dy = _x(shape, seed=5).to(dtype)
    out = []
    for route in (False, True):
        monkeypatch.setattr(fast, "use_ops", lambda x, r=route: r)
        m = bt.BatchNorm2d(5) if len(shape) == 4 else bt.BatchNorm1d(5)
        res = []
        for training in (True, False):
            m.train(training)
            xi = x.detach().clone().requires_grad_()
            y = m(xi)
            y.backward(dy)
            res += [y, xi.grad, m.weight.grad.clone(), m.bias.grad.clone()]
            m.zero_grad()
        out.append(res + [m.running_mean, m.running_var])
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


def test_autocast_matches_torch():
    res = []
    for impl in (torch.nn, bt):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), impl.BatchNorm2d(4))
        x = torch.randn(4, 3, 6, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
        res.append((y, m[1].weight.grad, m[1].running_mean))
    for a, b in zip(*res, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def _third(impl, training):
    m = impl.BatchNorm1d(3, dtype=torch.float64).train(training)
    with torch.no_grad():
        m.running_var.fill_(1.5)
    x = _x((6, 3)).requires_grad_()
    (g1,) = torch.autograd.grad(m(x).pow(3).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g1.pow(2).sum(), x, create_graph=True)
    return x, g1, g2


def test_third_derivative_in_eval_matches_torch():
    res = []
    for impl in (torch.nn, bt):
        x, g1, g2 = _third(impl, False)
        (g3,) = torch.autograd.grad(g2.sum(), x)
        res.append((g1, g2, g3))
    assert res[1][2].abs().max() > 1e-3  # not a silently missing derivative
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b)


def test_second_derivative_in_training_matches_torch_and_a_third_is_refused():
    (_, a1, a2), (x, b1, b2) = _third(torch.nn, True), _third(bt, True)
    torch.testing.assert_close(b1, a1)
    torch.testing.assert_close(b2, a2)
    with pytest.raises(RuntimeError, match="third"):
        torch.autograd.grad(b2.sum(), x)
