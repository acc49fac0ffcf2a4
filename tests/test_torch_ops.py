"""The custom operators ``torch.ops.batchnorm.*`` and the tools that see them: compile with
no graph break, export, meta, torch.func, gradgradcheck; the eager lean route against them."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("batchnorm.torch")
fast = pytest.importorskip("batchnorm.adapters.torch.fast")
variants = pytest.importorskip("batchnorm.adapters.torch.variants")

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


@pytest.mark.parametrize(
    "shape, fmt, fused",
    [
        ((16, 5), None, "eval_rows"),  # (N, C): one serial call
        ((4, 5, 6, 6), None, "eval_wide"),  # NCHW, 36 values per row: one serial call
        ((4, 5, 6, 6), torch.channels_last, "eval_rows"),  # NHWC viewed (M, C)
        ((8, 4, 32, 32), None, None),  # 32768 values: coefficients, then the parallel pass
    ],
    ids=["2D", "NCHW", "NHWC", "parallel"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_direct_evaluation_equals_the_operators(shape, fmt, fused, dtype, monkeypatch):
    """Evaluation without gradients (the one-call route: the fused coefficient-and-pass
    kernels below the parallel size) gives the operators' bits, with running statistics
    far from zero; the fused kernel is the one that ran (counted)."""
    from batchnorm.adapters.torch import native
    from batchnorm.backends.numba import small

    monkeypatch.setattr(native, "route", None)  # the Python route's kernels are counted
    x = (_x(shape) + 3e3).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    m = bt.BatchNorm2d(shape[1]) if len(shape) == 4 else bt.BatchNorm1d(shape[1])
    with torch.no_grad():
        m.running_mean.copy_(torch.linspace(2.9e3, 3.1e3, shape[1]))
        m.running_var.copy_(torch.linspace(0.5, 4.0, shape[1]))
        m.weight.copy_(torch.linspace(-2.0, 2.0, shape[1]))
        m.bias.copy_(torch.linspace(0.25, 1.0, shape[1]))
    m.eval()
    calls = []
    if fused is not None:
        real = getattr(small, fused)
        monkeypatch.setattr(small, fused, lambda *a: calls.append(1) or real(*a))
    out = []
    for route in (False, True):
        monkeypatch.setattr(fast, "use_ops", lambda x, r=route: r)
        with torch.no_grad():
            out.append(m(x))
    assert calls == ([1] if fused is not None else [])
    assert out[0].dtype == dtype and out[0].stride() == x.stride()
    assert torch.equal(out[0], out[1])


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


# ---------------------------------------------------------------- the variants
VARIANTS = {
    "renorm": lambda: bt.BatchRenorm(3, rmax=1.5, dmax=0.5, dtype=torch.float64),
    "ghost": lambda: bt.GhostBatchNorm(3, virtual_batch_size=3, dtype=torch.float64),
}


def _variant(kind, steps=2):
    """A variant layer with non-trivial parameters and running statistics (a few eager
    training steps), in float64."""
    m = VARIANTS[kind]()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.5, -2.0], dtype=torch.float64))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    for seed in range(steps):
        m(_x((8, 3, 2, 2), seed=10 + seed) * (1 + seed))
    return m


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_renorm_compiles_with_its_forward_eager(training):
    """BatchRenorm's forward is a graph break under torch.compile (see the variants module:
    its r and d come from the buffers the forward updates), and the compiled model equals
    the eager one."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1).double(), _variant("renorm"))
    model.train(training)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    for seed in (1, 2):
        x = _x((7, 3, 2, 2), seed=seed)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = compiled(xa), ref(xb)
        torch.testing.assert_close(ya, yb)
        dy = _x((7, 3, 2, 2), seed=seed + 7)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("kind", ["ghost"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_variant_compile_has_no_graph_break(kind, training):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1).double(), _variant(kind))
    explained = torch._dynamo.explain(model.train(training))(_x((7, 3, 2, 2)))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("kind", list(VARIANTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_variant_operator_route_matches_eager(kind, training, monkeypatch):
    """The route compile, export and torch.func see (custom operators and torch operations)
    gives the eager kernels' output, gradients and running statistics."""
    res = []
    for route in (False, True):
        monkeypatch.setattr(fast, "use_ops", lambda x, r=route: r)
        monkeypatch.setattr(variants, "use_ops", lambda x, r=route: r)
        m = _variant(kind).train(training)
        monkeypatch.setattr(variants, "use_ops", lambda x, r=route: r)
        x = _x((7, 3, 2, 2), seed=4).requires_grad_()
        y = m(x)
        y.backward(_x((7, 3, 2, 2), seed=5))
        res.append([y, x.grad, m.weight.grad, m.bias.grad, *m.buffers()])
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["ghost"])
def test_variant_compiled_matches_eager(kind):
    ours = _variant(kind)
    ref = copy.deepcopy(ours)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for seed in (1, 2):
        x = _x((7, 3, 2, 2), seed=seed)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = compiled(xa), ref(xb)
        torch.testing.assert_close(ya, yb)
        dy = _x((7, 3, 2, 2), seed=seed + 7)  # (sum(y^2) has a gradient of pure round-off)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad)
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("kind", ["ghost"])
def test_variant_compiled_nonfinite_batch_leaves_running_statistics(kind):
    m = _variant(kind, steps=0).float()
    before = [t.clone() for t in m.buffers()]
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    x = torch.randn(8, 3)
    x[0, 1] = float("inf")
    compiled(x)
    for a, b in zip(m.buffers(), before, strict=True):
        assert torch.equal(a, b)
    compiled(torch.randn(8, 3))
    assert int(m.num_batches_tracked) == 1 and not torch.equal(m.running_mean, before[0])


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_variant_export_and_meta(kind):
    for training in (True, False):
        m = _variant(kind).train(training)
        ref = copy.deepcopy(m)
        ep = torch.export.export(m, (_x((7, 3, 2, 2)),))
        names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        want = "batchnorm.train.default" if training else "batchnorm.eval.default"
        assert want in names, names
        x = _x((7, 3, 2, 2), seed=3)
        torch.testing.assert_close(ep.module()(x), ref(x))
        meta = VARIANTS[kind]().to("meta").train(training)
        y = meta(torch.empty(7, 3, 2, 2, device="meta", dtype=torch.float64))
        assert y.device.type == "meta" and y.shape == (7, 3, 2, 2)


@pytest.mark.parametrize("kind", list(VARIANTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_variant_func_vmap_grad_jacrev(kind, training):
    """torch.func on the variant against its eager calls: grad over the parameters,
    jacrev, and vmap over a batch of inputs (each its own batch) where the forward does not
    update running statistics in place (as for torch.nn's layers: a training renorm always
    does, so it is not vmapped; a ghost layer is vmapped with track_running_stats=False)."""
    if kind == "renorm" and training:
        pytest.skip(
            "a training renorm updates its running statistics in place, which torch.func "
            "refuses (as for torch.nn's layers with running statistics)"
        )
    m = _variant(kind).train(training)
    if kind == "ghost" and training:
        m = bt.GhostBatchNorm(3, 3, track_running_stats=False, dtype=torch.float64)
        m.load_state_dict(_variant(kind).state_dict(), strict=False)
    params, f = _functional(m)
    xs = _x((3, 7, 3, 2, 2))
    g = torch.func.grad(lambda p, x: f(p, x).square().sum())(copy.deepcopy(params), xs[0])
    jac = torch.func.jacrev(lambda x: f(params, x))(xs[0])
    mg = _variant(kind).train(training) if m.track_running_stats else copy.deepcopy(m)
    mj = copy.deepcopy(mg)
    x0 = xs[0].clone().requires_grad_()
    mg(x0).square().sum().backward()
    torch.testing.assert_close(g["weight"], mg.weight.grad)
    torch.testing.assert_close(g["bias"], mg.bias.grad)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(mj, xs[0]))
    out = torch.func.vmap(f, in_dims=(None, 0))(params, xs)
    for i in range(3):
        torch.testing.assert_close(out[i], copy.deepcopy(m)(xs[i]))


@pytest.mark.parametrize(
    ("kind", "training"), [("ghost", True), ("ghost", False), ("renorm", False)]
)
def test_variant_gradcheck_with_batched_grad(kind, training, monkeypatch):
    """gradcheck (batched gradients included) on the operator route (not a training renorm:
    its backward holds r and d constant by design, which finite differences do not)."""
    monkeypatch.setattr(variants, "use_ops", lambda x: True)
    m = _variant(kind).train(training)
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    x = _x((7, 3, 2, 2)).requires_grad_()
    w, b = (m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_())

    def f(x, w, b):  # the same running statistics for every evaluation
        state = {"weight": w, "bias": b, **{k: v.clone() for k, v in buffers.items()}}
        return torch.func.functional_call(m, state, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b), check_batched_grad=True)


@pytest.mark.parametrize(
    "shape",
    [(8, 32, 16, 16), (2, 3, 8, 8), (8, 1, 64, 64)],
    ids=["parallel", "serial", "one-channel"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_wide_training_backward_equals_the_plan_driver(shape, dtype, monkeypatch):
    """The backward of a small NCHW input with at least WIDE_INNER values per row (the
    one-call route: the fused kernel called on the one-call views, serial or parallel by
    size, serial below two channels) gives, far from zero, the bits of the same step with
    that call replaced by the general driver ``kernels.backward`` (its plan, its arrays),
    and the direct call is the one that ran (counted); the Python node's route, also when
    the suite runs with the native node on."""
    import numpy as np

    from batchnorm.adapters.torch import native
    from batchnorm.backends.numba import kernels

    monkeypatch.setattr(native, "route", None)

    real = kernels.backward_wide_direct
    calls = []

    def via_plan(xk, dyk, mean, inv, k, batch, coef, out, s1, s2):
        half = (lambda a: a.view(np.float16)) if xk.dtype == np.uint16 else (lambda a: a)
        ones = np.ones(mean.shape[0])
        res = kernels.backward(
            half(xk), half(dyk), (1,), mean, inv, k, ones, batch, None, half(out)
        )
        s1[...], s2[...] = res[1], res[2]

    # far from zero (float16: within the plain route's bound on sum(|mean|))
    x = (_x(shape) + (1e2 if dtype == torch.float16 else 3e3)).to(dtype)
    dy = _x(shape, seed=5).to(dtype)
    out = []
    for direct in (lambda *a: calls.append(1) or real(*a), via_plan):
        monkeypatch.setattr(kernels, "backward_wide_direct", direct)
        m = bt.BatchNorm2d(shape[1])
        with torch.no_grad():
            m.weight.copy_(torch.linspace(-2.0, 2.0, shape[1]))
        xi = x.detach().clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        out.append((y, xi.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var))
    assert calls == [1]
    for a, b in zip(*out, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
