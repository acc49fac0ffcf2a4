"""batchnorm.torch's BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d themselves."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("batchnorm.torch")

PAIRS = [
    (bt.BatchNorm1d, torch.nn.BatchNorm1d, (16, 5)),
    (bt.BatchNorm1d, torch.nn.BatchNorm1d, (8, 5, 7)),
    (bt.BatchNorm2d, torch.nn.BatchNorm2d, (6, 5, 4, 3)),
    (bt.BatchNorm3d, torch.nn.BatchNorm3d, (4, 5, 3, 2, 3)),
]
IDS = ["1d-2D", "1d-3D", "2d", "3d"]


def _pair(ours_cls, theirs_cls, dtype, **kw):
    gen = torch.Generator().manual_seed(3)
    theirs = theirs_cls(5, dtype=dtype, **kw)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.copy_(torch.rand(5, generator=gen, dtype=dtype) + 0.5)
            if theirs.bias is not None:
                theirs.bias.copy_(torch.randn(5, generator=gen, dtype=dtype))
    ours = ours_cls(5, dtype=dtype, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _step(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return y.detach(), grads


def _close(a, b, dtype):
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("ours_cls", "theirs_cls", "shape"), PAIRS, ids=IDS)
def test_train_and_eval_match_torch(ours_cls, theirs_cls, shape, dtype):
    ours, theirs = _pair(ours_cls, theirs_cls, dtype)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + step
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        (ya, ga), (yb, gb) = _step(ours, x, dy), _step(theirs, x, dy)
        _close(ya, yb, dtype)
        for a, b in zip(ga, gb, strict=True):
            _close(a, b, dtype)
        for name in ("running_mean", "running_var"):
            _close(getattr(ours, name), getattr(theirs, name), dtype)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == step + 1
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    (ya, ga), (yb, gb) = _step(ours, x, dy), _step(theirs, x, dy)
    _close(ya, yb, dtype)
    for a, b in zip(ga, gb, strict=True):
        _close(a, b, dtype)
    assert int(ours.num_batches_tracked) == 3  # evaluation tracks nothing


@pytest.mark.parametrize(
    "kw",
    [
        {"momentum": None},
        {"momentum": 0.5},
        {"affine": False},
        {"track_running_stats": False},
        {"bias": False},
        {"eps": 1e-2},
    ],
    ids=str,
)
def test_arguments_match_torch(kw):
    ours, theirs = _pair(bt.BatchNorm2d, torch.nn.BatchNorm2d, torch.float64, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    for mode in (True, True, True, False):
        ours.train(mode)
        theirs.train(mode)
        x = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64) + 3
        dy = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64)
        (ya, ga), (yb, gb) = _step(ours, x, dy), _step(theirs, x, dy)
        _close(ya, yb, torch.float64)
        for a, b in zip(ga, gb, strict=True):
            _close(a, b, torch.float64)
        pairs = zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True)
        for (ka, a), (kb, b) in pairs:
            assert ka == kb
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_state_dict_both_ways_and_real_buffers():
    theirs = torch.nn.BatchNorm2d(5)
    theirs(torch.randn(8, 5, 3, 3) * 3 + 1)
    ours = bt.BatchNorm2d(5)
    assert isinstance(ours.weight, torch.nn.Parameter)
    assert {n for n, _ in ours.named_buffers()} == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    ours.load_state_dict(theirs.state_dict())
    ours(torch.randn(8, 5, 3, 3) - 2)
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert int(back.num_batches_tracked) == 2
    assert not torch.equal(back.running_mean, theirs.running_mean)  # really moved on
    # an old checkpoint without num_batches_tracked (version < 2) loads as torch's does
    sd = theirs.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    ours.load_state_dict(sd)
    assert int(ours.num_batches_tracked) == 2  # torch's migration keeps the module's counter
    assert repr(bt.BatchNorm2d(5)) == repr(torch.nn.BatchNorm2d(5))


def test_channels_last_stays_channels_last_and_matches():
    ours, theirs = _pair(bt.BatchNorm2d, torch.nn.BatchNorm2d, torch.float32)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, 7, 4, generator=gen).to(memory_format=torch.channels_last)
    dy = torch.randn(6, 5, 7, 4, generator=gen).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    (ya, ga), (yb, gb) = _step(ours, x, dy), _step(theirs, x, dy)
    assert ya.is_contiguous(memory_format=torch.channels_last)
    assert ga[0].is_contiguous(memory_format=torch.channels_last)
    _close(ya, yb, torch.float32)
    for a, b in zip(ga, gb, strict=True):
        _close(a, b, torch.float32)
    x3 = torch.randn(2, 5, 3, 4, 3).to(memory_format=torch.channels_last_3d)
    o3, t3 = _pair(bt.BatchNorm3d, torch.nn.BatchNorm3d, torch.float32)
    _close(o3(x3), t3(x3), torch.float32)
    # a transposed (neither layout) input is made contiguous and still right
    xt = torch.randn(5, 6, 4, 7).permute(1, 0, 3, 2)
    _close(ours(xt), theirs(xt), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_float32_statistics(dtype):
    m = bt.BatchNorm2d(5)
    x = (torch.randn(8, 5, 6, 6) * 2 + 3).to(dtype).requires_grad_()
    y = m(x)
    assert y.dtype == dtype and m.running_mean.dtype == torch.float32
    xd = x.detach().double()
    ref = (xd - xd.mean((0, 2, 3), keepdim=True)) / (
        xd.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    ).sqrt()
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(
        m.running_mean.double(), 0.1 * xd.mean((0, 2, 3)), rtol=1e-4, atol=1e-4
    )
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_large_offset_is_exact():
    """float32, mean 1e6, std 1, (4096, 64): y within 1e-5 of the float64 reference."""
    gen = np.random.default_rng(0)
    x64 = gen.standard_normal((4096, 64)) + 1e6
    x = torch.from_numpy(x64.astype(np.float32))
    m = bt.BatchNorm1d(64)
    y = m(x).detach().double().numpy()
    xr = x.double().numpy()
    ref = (xr - xr.mean(0)) / np.sqrt(xr.var(0) + 1e-5)
    assert np.abs(y - ref).max() < 1e-5
    # negative control: the one-pass float32 formula is far off on the same data
    xf = x.numpy()
    naive_var = (xf * xf).mean(0, dtype=np.float32) - xf.mean(0, dtype=np.float32) ** 2
    assert np.abs(naive_var - xr.var(0)).max() > 0.5
    torch.testing.assert_close(
        m.running_var.double(),
        0.9 + 0.1 * torch.from_numpy(xr.var(0, ddof=1)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_no_grad_and_eval_record_no_graph():
    m = bt.BatchNorm2d(5)
    x = torch.randn(4, 5, 3, 3, requires_grad=True)
    with torch.no_grad():
        y = m(x)
    assert not y.requires_grad and int(m.num_batches_tracked) == 1
    m.eval()
    y = m(x)
    # one node, the layer's hand-written backward (no graph of small torch operations)
    assert type(y.grad_fn).__name__ == "_LeanBackward"
    assert y.grad_fn.next_functions[0][0] is not None
    y.sum().backward()
    assert x.grad is not None and m.weight.grad is not None


def _gradcheck(op, shape, affine=True):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5).requires_grad_(affine)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_(affine)
    return torch.autograd.gradcheck(lambda *a: bt.NormFunction.apply(*a, op), (x, w, b))


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2), (3, 3, 2, 2)], ids=str)
def test_gradcheck_train_and_eval(shape):
    assert _gradcheck(bt.BatchNormOp(1e-5), shape)
    rm = torch.randn(3, dtype=torch.float64)
    rv = torch.rand(3, dtype=torch.float64) + 0.5
    assert _gradcheck(bt.BatchNormOp(1e-5, rm, rv), shape)


def test_gradcheck_sees_a_wrong_backward():
    """Negative control: a backward off by 1% fails the same check."""

    class Wrong(bt.BatchNormOp):
        def backward(self, dy, state):
            dx, dg, db = super().backward(dy, state)
            return dx * 1.01, dg, db

    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        _gradcheck(Wrong(1e-5), (4, 3, 2))


def test_in_place_change_of_the_input_is_detected():
    m = bt.BatchNorm2d(5)
    x = torch.randn(4, 5, 3, 3, requires_grad=True)
    h = x * 1.0
    y = m(h)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((4, 6, 3, 3), "num_features=5"),
        ((4, 5, 3), "expected 4D input"),
        ((1, 5, 1, 1), "more than 1 value"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(shape, match):
    m = bt.BatchNorm2d(5)
    m(torch.randn(4, 5, 2, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        m(torch.randn(shape))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(TypeError, match="dtype torch.int64"):
        m(torch.ones(4, 5, 2, 2, dtype=torch.long))


def test_nonfinite_batch_raises_and_keeps_running_statistics():
    m = bt.BatchNorm2d(5)
    x = torch.randn(4, 5, 2, 2)
    x[0, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        m(x)
    assert torch.equal(m.running_var, torch.ones(5)) and int(m.num_batches_tracked) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
def test_running_update_is_torch_rule_in_float64_rounded_once(dtype, momentum):
    """The compiled update (float32/float64 buffers) and the NumPy one (float16) give,
    bit for bit, ``(1 - w) old + w new`` formed in float64 and rounded to the buffer dtype."""
    from batchnorm.adapters.torch.fast import update_running

    rng = np.random.default_rng(7)
    m = bt.BatchNorm1d(37, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        m.running_mean.copy_(torch.from_numpy(rng.standard_normal(37)))
        m.running_var.copy_(torch.from_numpy(rng.random(37) + 0.5))
    m.num_batches_tracked.fill_(4)
    mean, var = rng.standard_normal(37) * 3, rng.random(37) * 2
    old_m = m.running_mean.double().numpy().copy()
    old_v = m.running_var.double().numpy().copy()
    update_running(m, mean, var, 10, (10, 37))
    w = 0.2 if momentum is None else momentum
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32}.get(dtype, np.float64)
    want_m = (old_m * (1.0 - w) + w * mean).astype(np_dtype)
    want_v = (old_v * (1.0 - w) + (w * 10 / 9) * var).astype(np_dtype)
    np.testing.assert_array_equal(m.running_mean.numpy(), want_m)
    np.testing.assert_array_equal(m.running_var.numpy(), want_v)
    assert int(m.num_batches_tracked) == 5
    assert momentum == 0.0 or not np.array_equal(want_m, old_m.astype(np_dtype))  # it moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_update_overflowing_its_dtype_raises_and_changes_nothing(dtype):
    from batchnorm.adapters.torch.fast import update_running

    m = bt.BatchNorm1d(3, momentum=1.0, dtype=dtype)
    big = 1e39 if dtype == torch.float32 else np.inf  # finite in float64, not in float32
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"features \[1\]"):
        update_running(m, np.array([0.0, big, 1.0]), np.ones(3), 4, (4, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    # values whose float64 sum overflows but which are each finite are accepted
    huge = np.finfo(np.float32 if dtype == torch.float32 else np.float64).max / 2
    update_running(m, np.full(3, huge), np.ones(3), 4, (4, 3))
    assert torch.isfinite(m.running_mean).all() and int(m.num_batches_tracked) == 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_is_refused_trace_records_the_operator_and_compile_works():
    m = bt.BatchNorm2d(5)
    with pytest.raises(TypeError, match="torch.jit cannot script"):
        torch.jit.script(m)
    m.eval()
    traced = torch.jit.trace(m, torch.randn(4, 5, 2, 2))
    assert "batchnorm::eval" in str(traced.graph)
    x = torch.randn(4, 5, 2, 2) * 2 + 1
    torch.testing.assert_close(traced(x), m(x))
    m.train()
    model = torch.nn.Sequential(torch.nn.Conv2d(5, 5, 1), m, torch.nn.ReLU())
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(compiled(x), ref(x))
    torch.testing.assert_close(m.running_mean, ref[1].running_mean)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)
        self.bn1 = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.bn1(self.fc(h))


def test_fifty_training_steps_match_torch():
    torch.manual_seed(0)
    theirs = _Net().double()
    ours = bt.convert_batchnorm(copy.deepcopy(theirs))
    assert isinstance(ours.bn, bt.BatchNorm2d) and isinstance(ours.bn1, bt.BatchNorm1d)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (theirs, ours)]
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        x = torch.randn(16, 3, 6, 6, generator=gen, dtype=torch.float64) + 0.5
        t = torch.randint(0, 4, (16,), generator=gen)
        for m, opt in zip((theirs, ours), opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), t).backward()
            opt.step()
    sa, sb = theirs.state_dict(), ours.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-9, atol=1e-10)
    first = _Net().double().state_dict()["conv.weight"]
    assert not torch.allclose(first, sa["conv.weight"])  # the models did train


@pytest.mark.slow
def test_compile_with_the_default_backend_runs_the_layer_eagerly():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bt.BatchNorm2d(4), torch.nn.ReLU())
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = torch.compile(model)(x)
    y.sum().backward()
    torch.testing.assert_close(y, ref(x))
    assert model[1].weight.grad is not None and int(model[1].num_batches_tracked) == 1


def test_import_batchnorm_does_not_import_torch():
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    code = (
        "import sys; import batchnorm, batchnorm.adapters, batchnorm.functional; "
        "print('torch' in sys.modules); import batchnorm.torch; print('torch' in sys.modules, "
        "'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["False", "True", "False"]  # the control: batchnorm.torch does import it


def test_cached_views_follow_every_change_of_the_state():
    """The eager route caches NumPy views of a layer's parameters and buffers: replaced
    tensors, storage swapped under the same tensor (``.data =``), changes made through
    ``.data`` (no version bump), a dtype change and a deep copy are all seen."""
    torch.manual_seed(0)
    ours, ref = bt.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    x = torch.randn(6, 4)

    def same():
        for training in (True, False):
            ours.train(training)
            ref.train(training)
            with torch.no_grad():
                torch.testing.assert_close(ours(x), ref(x))
        for a, b in zip(ours.buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(a, b)

    same()
    changes = (
        lambda m: setattr(m.weight, "data", torch.full((4,), 2.0)),  # new storage, same object
        lambda m: m.running_var.data.fill_(3.0),  # through .data: no version bump
        lambda m: setattr(m, "bias", torch.nn.Parameter(torch.arange(4.0))),  # new Parameter
        lambda m: m.register_buffer("running_mean", torch.full((4,), 0.5)),  # new buffer
    )
    for change in changes:
        for m in (ours, ref):
            change(m)
        same()
    ours, ref = ours.double(), ref.double()
    ours.load_state_dict(ref.state_dict())  # (float32 history: equal only to float32 digits)
    x = x.double()
    same()
    ours, ref = copy.deepcopy(ours), copy.deepcopy(ref)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.mul_(-1.0)
    same()


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("size", [4, 8])
@pytest.mark.parametrize("shape", [(8, 6), (4096, 6), (2, 6, 3, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_a_state_tensor_of_the_wrong_size_is_refused_as_torch_refuses(name, size, shape, training):
    """A tensor swapped in by ``.data =`` with another number of features is refused on
    every route, as torch.nn refuses it (the compiled kernels would read past its end);
    our module's state is unchanged."""
    import batchnorm.torch as bt

    cls = bt.BatchNorm1d if len(shape) == 2 else bt.BatchNorm2d
    ref_cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
    x = torch.randn(shape)
    for m in (cls(6), ref_cls(6)):
        m.train(training)
        with torch.no_grad():
            getattr(m, name).data = torch.ones(size)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(RuntimeError, match=f"{name} should contain 6"):
            m(x)
        if isinstance(m, cls):  # (torch.nn counts the refused batch in num_batches_tracked)
            for k, v in m.state_dict().items():
                assert torch.equal(v, before[k]), k


def test_a_swap_to_the_same_address_with_other_strides_is_seen():
    """The cached NumPy views follow a ``.data`` swap that keeps the address but changes
    the strides (a view of every second value, then the first six values)."""
    import batchnorm.torch as bt

    x = torch.randn(8, 6)
    base = torch.arange(12, dtype=torch.float32)
    ours, ref = bt.BatchNorm1d(6), torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        ours.weight.data = base[::2]
        ours(x)
        ours.weight.data = base[:6]
        ref.weight.data = base[:6].clone()
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(8, 4), (4096, 4), (2, 4, 3, 3), (0, 4)])
def test_without_a_batch_counter_the_running_statistics_update_as_torchs(momentum, shape):
    """``num_batches_tracked = None`` (torch allows it): torch still updates the running
    statistics with ``momentum`` (a cumulative average, ``momentum=None``, weighs the batch
    0) and counts nothing; ours did not update at all."""
    import batchnorm.torch as bt

    cls = bt.BatchNorm1d if len(shape) == 2 else bt.BatchNorm2d
    ref_cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
    ours, ref = cls(4, momentum=momentum), ref_cls(4, momentum=momentum)
    ours.num_batches_tracked = ref.num_batches_tracked = None
    x = torch.randn(shape) * 2 + 1
    for _ in range(2):
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked is None
    if momentum is not None and shape[0]:
        assert not torch.equal(ours.running_var, torch.ones(4))  # it did update


@pytest.mark.parametrize("impl", ["torch.nn", "ours"])
@pytest.mark.parametrize(
    "shape",
    [(8, 4), (4, 4, 2, 2)],
    ids=["one-call route", "lean route"],  # (4, 4, 2, 2): 4 values per row, the lean route
)
def test_forwards_from_several_threads_lose_no_update(impl, shape):
    """One module trained from 4 threads at once (50 batches each) counts all 200 batches,
    as torch.nn does; ours also keeps each update whole, so with a cumulative average
    (momentum=None) its running mean is the mean of the 200 batch means, whatever the
    order (float64 buffers). torch.nn's is not: it reads the counter and blends in two
    steps (seen here off by up to 76% of the value), so only its count is checked."""
    import threading

    ns = torch.nn if impl == "torch.nn" else bt
    cls = ns.BatchNorm1d if len(shape) == 2 else ns.BatchNorm2d
    m = cls(shape[1], momentum=None, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(shape, generator=g, dtype=torch.float64) + i for i in range(200)]

    def work(part):
        for x in part:
            m(x)

    threads = [threading.Thread(target=work, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(m.num_batches_tracked) == 200
    if impl == "torch.nn":
        return
    dims = [d for d in range(len(shape)) if d != 1]
    expected = torch.stack([x.mean(dims) for x in batches]).mean(0)
    torch.testing.assert_close(m.running_mean, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(16, 5), (8, 32, 16, 16), (4, 5, 6, 6)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_float16_module_matches_torch(shape, training, grad):
    """A module made float16 (``.half()``: float16 parameters and buffers) on float16
    inputs of every one-call kind ((N, C) rows, NCHW with wide rows, and short rows) runs
    and agrees with torch.nn (the one-call kernels once raised NotImplementedError here)."""
    res = []
    for impl in (torch.nn, bt):
        layer = (impl.BatchNorm1d if len(shape) == 2 else impl.BatchNorm2d)(shape[1])
        m = layer.half().train(training)
        x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) + 2).half()
        x.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = m(x)
        if grad:
            y.float().square().sum().backward()
        res.append((y, x.grad if grad else y, m.running_mean, m.running_var))
    for a, b in zip(*res, strict=True):
        assert a.dtype == b.dtype == torch.float16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_input_checks_cached_per_signature_still_refuse_every_bad_call():
    """The checks an input's signature passed once are not redone (the per-signature
    cache of the forward), but every call that would now fail them still fails: channels
    changed by assigning ``num_features``, another number of dimensions, another class
    with stricter checks, and a tensor subclass (checked on every call)."""
    m = bt.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    m(x)  # the signature is now cached
    m.num_features = 5
    with pytest.raises(ValueError, match="num_features=5"):
        m(x)
    m.num_features = 4
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(3, 4, 25))

    class Strict(bt.BatchNorm2d):
        def _check_input_dim(self, input):
            raise ValueError("strict refuses every input")

    with pytest.raises(ValueError, match="strict refuses"):
        Strict(4)(x)
    assert m(x).shape == x.shape  # the first class's cache entry is untouched

    class Sub(torch.Tensor):
        pass

    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(3, 4, 25).as_subclass(Sub))
    single = torch.randn(1, 4, 1, 1)
    m(torch.randn(2, 4, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(single)
    m.eval()
    assert m(single).shape == single.shape  # evaluation takes a single value
