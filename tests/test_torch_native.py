"""The opt-in native autograd node (batchnorm.adapters.torch.native): the same values, bit
for bit, as the Python route it replaces, and every fallback of that route kept.

Skipped when the extension cannot be built here (no C++ compiler or torch headers). Every
comparison runs the same module twice, the route on and off, and checks which node served
each run (the negative control: a comparison of the Python route with itself would pass
whatever the native node computed)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from _native import built_extension, route_off_after_each_test  # noqa: E402, F401

import batchnorm.torch as bt  # noqa: E402
from batchnorm.adapters.torch import native  # noqa: E402
from batchnorm.conventions import NonFiniteStatisticsError  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
CL = torch.channels_last
NATIVE_NODE = "CppFunction"  # the Python name of a C++ autograd node
PYTHON_NODE = "_LeanBackward"


def _module(shape, dtype, affine=True):
    torch.manual_seed(0)
    kind = bt.BatchNorm1d if len(shape) < 4 else bt.BatchNorm2d
    m = kind(shape[1], affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1.0, 1.0)
    return m


def _step(shape, dtype, on: bool, fmt=None, affine=True, x_grad=True, steps=2):
    """Two training steps (the second sees updated running statistics); everything the
    steps produced, and the name of the node of the last output."""
    (native.build() if on else native.disable())
    m = _module(shape, dtype, affine)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 2
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_(x_grad)
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        y = m(x)
        y.backward(dy)
        out += [y.detach(), x.grad, m.running_mean.clone(), m.running_var.clone()]
    out += [m.num_batches_tracked.clone()]
    if affine:
        out += [m.weight.grad, m.bias.grad]
    return out, type(y.grad_fn).__name__


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
        for u, v in zip(a, b, strict=True)
    )


CASES = [  # (shape, memory format): ROWS (2-d, channels-last, one value per row), WIDE
    ((64, 256), None),
    ((7, 5), None),
    ((4, 8, 4, 4), CL),
    ((3, 5, 1), None),
    ((2, 16, 64), None),
    ((8, 3, 40), None),
    ((8, 32, 16, 16), None),  # WIDE above the serial size (the Python route is parallel)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "fmt"), CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_bit_identical_to_the_python_route(ext, shape, fmt, dtype, affine):
    a, node_a = _step(shape, dtype, True, fmt, affine)
    b, node_b = _step(shape, dtype, False, fmt, affine)
    assert (node_a, node_b) == (NATIVE_NODE, PYTHON_NODE)
    assert _same(a, b)


@pytest.mark.parametrize("threads", [1, 2, None], ids=["1-thread", "2-threads", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(256, 1024), (512, 300)])
def test_strips_on_torchs_threads_are_bit_identical(ext, shape, dtype, threads):
    """ROWS from SERIAL_MAX elements on: the node runs strips of columns on torch's threads
    (300 columns: a ragged last strip), the Python route one serial call; the same bits
    whatever the number of threads (None: torch's default here)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        a, node_a = _step(shape, dtype, True)
        b, node_b = _step(shape, dtype, False)
        c, _ = _step(shape, dtype, True, x_grad=False)  # no dx: the parameter gradients only
        d, _ = _step(shape, dtype, False, x_grad=False)
    finally:
        torch.set_num_threads(before)
    assert (node_a, node_b) == (NATIVE_NODE, PYTHON_NODE)
    assert _same(a, b) and _same(c, d)


def test_the_strips_are_built_to_run_on_torchs_threads(ext):
    # set_kernels says whether at::parallel_for was compiled with torch's threads (else
    # every strip runs in the calling thread: right values, no speed-up, nothing failing)
    from batchnorm.adapters.torch import _cpu
    from batchnorm.backends.numba import centry
    from batchnorm.backends.numba.plan import SERIAL_MAX

    big, limit = _cpu.kernel_limits(torch.float32)
    addrs = list(centry.addresses(_cpu.NP_DTYPES[torch.float32]))
    assert ext.set_kernels(0, addrs, big, limit, 1.0, SERIAL_MAX) is True


def test_strips_in_python_threads_at_once(ext):
    # two Python threads each training through the strips at once (each its own parallel
    # region); the modules and data made first (torch.manual_seed is global)
    import threading

    shape = (256, 1024)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(shape, generator=gen) * 3 + 2
    dy = torch.randn(shape, generator=gen)
    mods = [_module(shape, torch.float32) for _ in range(3)]
    res = [None] * 3

    def run(i):
        xi = x.clone().requires_grad_()
        y = mods[i](xi)
        y.backward(dy)
        res[i] = ([y.detach(), xi.grad, mods[i].weight.grad, mods[i].running_var], y.grad_fn)

    native.disable()
    run(2)  # the reference: the Python route
    native.build()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert type(res[2][1]).__name__ == PYTHON_NODE
    for r in res[:2]:
        assert type(r[1]).__name__ == NATIVE_NODE and _same(r[0], res[2][0])


def test_the_comparison_sees_a_difference(ext):
    # negative control: a one-ulp change of one output element is seen
    a, _ = _step((7, 5), torch.float32, True)
    b, _ = _step((7, 5), torch.float32, False)
    b[0] = b[0].clone()
    b[0][0, 0] = torch.nextafter(b[0][0, 0], torch.tensor(float("inf")))
    assert not _same(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parameter_gradients_only(ext, dtype):
    # ROWS without an input gradient: the native node (no dx written)
    a, node = _step((16, 6), dtype, True, x_grad=False)
    b, _ = _step((16, 6), dtype, False, x_grad=False)
    assert node == NATIVE_NODE and _same(a, b)
    # WIDE without one: the Python route (it sums the gradients alone, in another order)
    a, node = _step((4, 3, 40), dtype, True, x_grad=False)
    b, _ = _step((4, 3, 40), dtype, False, x_grad=False)
    assert node == PYTHON_NODE and _same(a, b)


def test_autograd_grad_of_the_weight_alone(ext):
    for on in (True, False):
        (native.build() if on else native.disable())
        m = _module((16, 6), torch.float64)
        x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
        y = m(x)
        (gw,) = torch.autograd.grad((y * y.detach()).sum(), m.weight)
        if on:
            native_gw = gw
    assert torch.equal(native_gw, gw)


@pytest.mark.parametrize(("shape", "fmt"), [((8, 5), None), ((2, 3, 40), None), ((2, 4, 3, 3), CL)])
def test_incoming_gradient_in_another_layout(ext, shape, fmt):
    # an expanded gradient (sum().backward()) and a channels-last input with a contiguous
    # gradient: both rearranged before the kernels read them
    res = []
    for on in (True, False):
        (native.build() if on else native.disable())
        m = _module(shape, torch.float32)
        x = torch.randn(shape) * 2 + 1
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_()
        y = m(x)
        assert type(y.grad_fn).__name__ == (NATIVE_NODE if on else PYTHON_NODE)
        (y * torch.linspace(-1, 1, y.numel()).reshape(shape)).sum().backward()
        g1 = x.grad.clone()
        x.grad = None
        m(x).sum().backward()  # an expanded gradient of ones
        res.append([g1, x.grad, m.weight.grad, m.bias.grad])
    assert _same(*res)


def test_double_backward_goes_through_the_operator(ext):
    res = []
    for on in (True, False):
        (native.build() if on else native.disable())
        m = _module((8, 5), torch.float64)
        x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        x.requires_grad_()
        y = m(x)
        assert type(y.grad_fn).__name__ == (NATIVE_NODE if on else PYTHON_NODE)
        gx, gw = torch.autograd.grad((y**2).sum(), (x, m.weight), create_graph=True)
        assert gx.grad_fn is not None and gw.grad_fn is not None  # never silently missing
        ggx, ggw = torch.autograd.grad((gx**2).sum() + gw.sum(), (x, m.weight))
        res.append([gx.detach(), gw.detach(), ggx, ggw])
    assert _same(*res)


def test_gradcheck_with_batched_gradients(ext):
    native.build()
    m = _module((6, 3), torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert type(m(x).grad_fn).__name__ == NATIVE_NODE
    # check_batched_grad: a vmap over the incoming gradient, handed back to Python
    assert torch.autograd.gradcheck(m, (x,), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(m, (x,), check_batched_grad=True)


def test_in_place_change_of_the_input_is_detected(ext):
    native.build()
    m = _module((8, 5), torch.float32)
    x = torch.randn(8, 5, requires_grad=True)
    xi = x * 1
    y = m(xi)
    assert type(y.grad_fn).__name__ == NATIVE_NODE
    xi.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_other_dtypes_take_the_python_route(ext):
    native.build()
    m = _module((8, 5), torch.float32)  # float32 parameters
    for x in (torch.randn(8, 5).half(), torch.randn(8, 5, dtype=torch.float64)):
        y = m(x.requires_grad_())
        assert type(y.grad_fn).__name__ != NATIVE_NODE
        y.sum().backward()


def test_non_finite_batch_changes_nothing(ext):
    native.build()
    m = _module((8, 5), torch.float32)
    before = [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
    x = torch.randn(8, 5)
    x[3, 2] = float("inf")
    with pytest.raises(NonFiniteStatisticsError):
        m(x.requires_grad_())
    after = (m.running_mean, m.running_var, m.num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _counting_updates(monkeypatch):
    """The extension's train with its in-place running updates counted (done, refused)."""
    seen = {"done": 0, "refused": 0}
    real = native._EXT

    class Counting:
        def train(self, *args):
            out = real.train(*args)
            seen["done"] += out[3] == 1
            seen["refused"] += out[3] == 0
            return out

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(native, "_EXT", Counting())
    return seen


def test_a_running_update_that_would_overflow_changes_nothing(ext, monkeypatch):
    """The update made in the extension refuses a new running variance that is not finite
    in float32 (nothing changed, torch's NonFiniteStatisticsError from the Python side)."""
    native.build()
    seen = _counting_updates(monkeypatch)
    m = _module((64, 256), torch.float32)
    x = torch.randn(64, 256, requires_grad=True)
    m(x)
    assert seen == {"done": 1, "refused": 0}  # (the control: the update is made there)
    with torch.no_grad():
        m.running_var[7] = 3e38  # 0.9 * 3e38 + 0.1 * var * n / (n - 1) stays finite...
        m.momentum = -2.0  # ...but 3 * 3e38 does not
    before = [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
    with pytest.raises(NonFiniteStatisticsError):
        m(x)
    assert seen["refused"] == 1
    after = (m.running_mean, m.running_var, m.num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_running_statistics_of_another_dtype_are_updated_in_python(ext, monkeypatch):
    """float64 running statistics of a float32 module: not the extension's update (-1),
    the same values as the Python route's."""
    res = []
    for on in (True, False):
        (native.build() if on else native.disable())
        seen = _counting_updates(monkeypatch) if on else None
        m = _module((64, 256), torch.float32)
        m.running_mean = m.running_mean.double()
        m.running_var = m.running_var.double()
        x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
        y = m(x.requires_grad_())
        res.append((y.detach(), m.running_mean.clone(), m.running_var.clone()))
        if on:
            assert type(y.grad_fn).__name__ == NATIVE_NODE
            assert seen == {"done": 0, "refused": 0}
            monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(*res, strict=True))


def test_overflow_scale_inputs_take_the_general_path(ext):
    res = []
    for on in (True, False):
        (native.build() if on else native.disable())
        m = _module((8, 5), torch.float32)
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(4))
        x[:, :2] = 3e37  # sum |mean| beyond the plain form's bound
        x.requires_grad_()
        y = m(x)
        assert type(y.grad_fn).__name__ not in (NATIVE_NODE, PYTHON_NODE)
        y.backward(torch.ones_like(y))
        res.append([y.detach(), x.grad, m.running_mean.clone(), m.running_var.clone()])
    assert _same(*res)


def test_a_failed_build_warns_and_leaves_the_python_route(ext, monkeypatch):
    def fail(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(native, "_EXT", None)
    monkeypatch.setattr(native, "_load", fail)
    monkeypatch.setattr(native, "route", native._first)
    m = _module((8, 5), torch.float32)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        y = m(torch.randn(8, 5, requires_grad=True))
    assert type(y.grad_fn).__name__ == PYTHON_NODE and native.route is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per call
        m(torch.randn(8, 5, requires_grad=True))


def test_registration_refuses_bad_arguments(ext):
    with pytest.raises(RuntimeError, match="index 0"):
        ext.set_kernels(2, [0] * 8, 1.0, 1.0, 1.0, 1)
    with pytest.raises(RuntimeError, match="eight addresses"):
        ext.set_kernels(0, [0] * 4, 1.0, 1.0, 1.0, 1)
    with pytest.raises(RuntimeError, match="positive serial size"):
        ext.set_kernels(0, [0] * 8, 1.0, 1.0, 1.0, 0)


_PROBE = """
import sys, torch, batchnorm.torch as bt
from batchnorm.adapters.torch import native
built = native._EXT is not None or any("batchnorm_native" in k for k in sys.modules)
m = bt.BatchNorm1d(4)
y = m(torch.randn(6, 4, requires_grad=True))
print(built, type(y.grad_fn).__name__)
"""


@pytest.mark.parametrize(
    ("value", "node"),
    [("1", NATIVE_NODE), ("0", PYTHON_NODE), (None, NATIVE_NODE), ("", NATIVE_NODE)],
    ids=["1", "0", "unset", "empty"],
)
def test_environment_variable_and_the_default(ext, value, node):
    """``1`` builds on the first call, ``0`` never uses the node, and by default (unset or
    any other value) a built extension (the ``ext`` fixture built it into this user's
    cache) is loaded on the first call; nothing at import."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop(native.ENV, None)
    if value is not None:
        env[native.ENV] = value
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["False", node]  # nothing built at import


@pytest.mark.slow
def test_build_without_ninja(ext, tmp_path):
    # the direct compiler call, into a fresh cache directory
    code = (
        "from batchnorm.adapters.torch import native; import torch, batchnorm.torch as bt;"
        "native.build(use_ninja=False); m = bt.BatchNorm1d(4);"
        "print(type(m(torch.randn(6, 4, requires_grad=True)).grad_fn).__name__,"
        " native.cache_dir())"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    node, where = out.stdout.split()[-2:]
    assert node == NATIVE_NODE and where.startswith(str(tmp_path))
    assert "building the native torch node" in out.stderr  # the cold build says so
    again = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[-2] == NATIVE_NODE
    assert "building the native torch node" not in again.stderr  # loaded from the cache


def _train_net(on: bool, threads: int = 1):
    """A few SGD steps of a small network with two batch-norm layers (ROWS and WIDE), in
    ``threads`` threads at once (each its own copy); the parameters and buffers after."""
    import threading

    (native.build() if on else native.disable())

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv1d(3, 8, 3, padding=1),
            bt.BatchNorm1d(8),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 40, 16),
            bt.BatchNorm1d(16),
        )

    nets = [net() for _ in range(threads)]
    nodes = set()

    def run(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(5)
        for _ in range(4):
            x = torch.randn(12, 3, 40, generator=gen)
            opt.zero_grad()
            y = model(x)
            nodes.add(type(y.grad_fn).__name__)
            (y * torch.randn(y.shape, generator=gen)).sum().backward()
            opt.step()

    ts = [threading.Thread(target=run, args=(m,)) for m in nets]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return [list(m.state_dict().values()) for m in nets], nodes


def test_training_a_network_in_threads_gives_the_python_routes_values(ext):
    (ref,), nodes = _train_net(False)
    assert nodes == {PYTHON_NODE}
    states, nodes = _train_net(True, threads=3)
    assert nodes == {NATIVE_NODE}
    for state in states:
        assert _same(state, ref)


@pytest.mark.parametrize("shape", [(16, 6), (4, 3, 40)])
def test_frozen_parameters(ext, shape):
    res = []
    for on in (True, False):
        (native.build() if on else native.disable())
        m = _module(shape, torch.float64)
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        x.requires_grad_()
        y = m(x)
        assert type(y.grad_fn).__name__ == (NATIVE_NODE if on else PYTHON_NODE)
        y.backward(torch.cos(y.detach()))
        assert m.weight.grad is None and m.bias.grad is None
        res.append([y.detach(), x.grad, m.running_mean, m.running_var])
    assert _same(*res)


def test_input_gradient_not_asked_for_on_a_wide_input(ext):
    # x requires grad but only the parameters' gradients are asked for: both routes sum with
    # the fused kernel (the Python node's needs_input_grad is the forward's; the native one
    # writes a dx it discards), so the bits agree
    out = []
    for on in (True, False):
        (native.build() if on else native.disable())
        m = _module((8, 32, 16, 16), torch.float64)
        x = torch.randn(
            8, 32, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6)
        )
        y = m((x * 3 + 2).requires_grad_())
        assert type(y.grad_fn).__name__ == (NATIVE_NODE if on else PYTHON_NODE)
        out.append(torch.autograd.grad((y * torch.sin(y.detach())).sum(), (m.weight, m.bias)))
    assert _same(*out)


def test_two_backwards_through_one_graph(ext):
    res = []
    for on in (True, False):
        (native.build() if on else native.disable())
        m = _module((2, 16, 64), torch.float32)
        x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(7)).requires_grad_()
        y = m(x)
        assert type(y.grad_fn).__name__ == (NATIVE_NODE if on else PYTHON_NODE)
        y.backward(torch.sin(y.detach()), retain_graph=True)
        first = x.grad.clone()
        y.backward(torch.cos(y.detach()))
        res.append([first, x.grad, m.weight.grad, m.bias.grad])
    assert _same(*res)


def test_the_extension_refuses_arguments_that_do_not_fit(ext):
    x = torch.randn(8, 5)
    w = torch.ones(5)
    none = (None, None, 0.0, 0.0, 0.0)  # no running statistics to update
    ok = ext.train(x, w, w, 1, 8, 5, 1, 0, 1e-5, *none)
    assert ok[0].shape == x.shape and ok[2]  # the control: these arguments are accepted
    bad = [
        ((x, w, w, 1, 8, 6, 1, 0, 1e-5), "does not fit"),  # view larger than the input
        ((x, w, w, 3, 8, 5, 1, 0, 1e-5), "kind 1"),
        ((x, torch.ones(6), w, 1, 8, 5, 1, 0, 1e-5), "weight and bias"),
        ((x, w, w.double(), 1, 8, 5, 1, 0, 1e-5), "weight and bias"),
        ((x.t().contiguous().t(), w, w, 1, 8, 5, 1, 0, 1e-5), "not dense"),
        ((x.half(), None, None, 1, 8, 5, 1, 0, 1e-5), "float32/float64"),
        ((torch.randn(2, 4, 3, 3), None, None, 2, 2, 4, 9, 1, 1e-5), "not dense"),
    ]
    for args, match in bad:
        with pytest.raises(RuntimeError, match=match):
            ext.train(*args, *none)
    # running statistics the update cannot write (another size, dtype or layout, lazily
    # negated): not updated (-1), left as they were; the control: fitting ones are (1)
    rm, rv = torch.zeros(5), torch.ones(5)
    assert ext.train(x, w, w, 1, 8, 5, 1, 0, 1e-5, rm, rv, 0.9, 0.1, 0.1)[3] == 1
    assert not torch.equal(rm, torch.zeros(5))
    unfit = [
        (torch.zeros(6), torch.ones(6)),
        (torch.zeros(5).double(), torch.ones(5)),
        (torch.zeros(10)[::2], torch.ones(5)),
        (torch._neg_view(torch.zeros(5)), torch.ones(5)),
    ]
    for rm, rv in unfit:
        keep = rm.clone(), rv.clone()
        assert ext.train(x, w, w, 1, 8, 5, 1, 0, 1e-5, rm, rv, 0.9, 0.1, 0.1)[3] == -1
        assert torch.equal(rm, keep[0]) and torch.equal(rv, keep[1])


def test_warmup_torch_builds_or_reports(ext, monkeypatch, capsys):
    """``batchnorm warmup --torch`` builds (here: loads) the node and says where; a failed
    build is reported with exit status 1 and the route left off."""
    from batchnorm_demo.warmup.command import _build_torch_node

    native.disable()
    assert _build_torch_node() == 0
    assert native.enabled() and str(native.cache_dir()) in capsys.readouterr().out
    native.disable()

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(native, "build", broken)
    assert _build_torch_node() == 1
    assert "no compiler here" in capsys.readouterr().out
    assert not native.enabled()
