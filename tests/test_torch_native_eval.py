"""The native extension's evaluation entry (batchnorm.adapters.torch.native.evaluate): the
same values, bit for bit, as the Python route's one-call evaluation
(``_cpu.evaluate_direct``), and the same fallbacks.

Skipped when the extension cannot be built here. Every comparison runs the same module
twice, the route on and off, and counts the calls the extension served (the negative
control: a comparison of the Python route with itself would pass whatever the extension
computed)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _native import built_extension, route_off_after_each_test  # noqa: E402, F401

import batchnorm.torch as bt  # noqa: E402
from batchnorm.adapters.torch import native  # noqa: E402
from batchnorm.backends.numba import centry  # noqa: E402

CL = torch.channels_last
F32, F64, F16 = torch.float32, torch.float64, torch.float16
_BITS = {F16: torch.int16, F32: torch.int32, F64: torch.int64}
_TORCH = {torch.tensor(0.0, dtype=t).numpy().dtype: t for t in (F32, F64)}


class _Counting:
    """The extension with its evaluate calls counted (served: status 1; general: 0)."""

    def __init__(self, mod):
        self.mod, self.served, self.general = mod, 0, 0

    def evaluate(self, *args):
        y, status = self.mod.evaluate(*args)
        self.served += status == 1
        self.general += status == 0
        return y, status

    def __getattr__(self, name):
        return getattr(self.mod, name)


@pytest.fixture
def counting(ext, monkeypatch):
    c = _Counting(ext)
    monkeypatch.setattr(native, "_EXT", c)
    yield c
    native.disable()


def _module(shape, pdt=F32, bdt=F32, affine=True, mean_scale=0.3):
    torch.manual_seed(0)
    kind = bt.BatchNorm1d if len(shape) < 4 else bt.BatchNorm2d
    m = kind(shape[1], affine=affine)
    if affine:
        m.weight.data = torch.rand(shape[1]).to(pdt) + 0.5
        m.bias.data = torch.rand(shape[1]).to(pdt) - 0.5
    m.running_mean = (torch.randn(shape[1]) * mean_scale).to(bdt)
    m.running_var = (torch.rand(shape[1]) + 0.5).to(bdt)
    return m.eval()


def _input(shape, dtype, fmt=None):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 1).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _both(m, x):
    """(native output, Python route output), both without gradients."""
    with torch.no_grad():
        native.build()
        y1 = m(x)
        native.disable()
        y0 = m(x)
    return y1, y0


def _bits_equal(a, b) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))
    )


SHAPES = [((64, 256), None), ((4, 8), None), ((8, 32, 16, 16), None), ((16, 64, 8, 8), CL),
          ((2, 3, 70), None), ((8, 32, 1, 1), None)]  # fmt: skip


@pytest.mark.parametrize(("shape", "fmt"), SHAPES)
@pytest.mark.parametrize("xdt", [F16, F32, F64])
@pytest.mark.parametrize(("pdt", "bdt"), [(F32, F32), (F64, F64), (F32, F64), (F64, F32)])
def test_bit_identical_to_the_python_route(counting, shape, fmt, xdt, pdt, bdt):
    m = _module(shape, pdt, bdt)
    y1, y0 = _both(m, _input(shape, xdt, fmt))
    assert counting.served == 1
    assert _bits_equal(y1, y0)


@pytest.mark.parametrize("xdt", [F16, F32, F64])
def test_without_weight_and_bias(counting, xdt):
    m = _module((8, 32, 16, 16), affine=False)
    y1, y0 = _both(m, _input((8, 32, 16, 16), xdt))
    assert counting.served == 1
    assert _bits_equal(y1, y0)


def test_the_comparison_sees_a_difference(counting):
    """Negative control: a one-ulp change of one running variance is seen."""
    m = _module((64, 256))
    x = _input((64, 256), F32)
    with torch.no_grad():
        native.build()
        y1 = m(x)
        m.running_var[3] = torch.nextafter(m.running_var[3], torch.tensor(2.0))
        native.disable()
        y0 = m(x)
    assert counting.served == 1
    assert not _bits_equal(y1, y0)


@pytest.mark.parametrize(("shape", "fmt"), [((256, 1024), None), ((32, 256, 14, 14), CL),
                                            ((16, 64, 32, 32), None)])  # fmt: skip
@pytest.mark.parametrize("xdt", [F16, F32, F64])
def test_large_inputs_through_the_parallel_pass(counting, shape, fmt, xdt):
    m = _module(shape, F64, F32)
    y1, y0 = _both(m, _input(shape, xdt, fmt))
    assert _bits_equal(y1, y0)
    assert counting.served == (1 if native._PARALLEL else 0)


def test_parallel_sizes_without_a_safe_threading_layer_take_the_python_route(counting, monkeypatch):
    monkeypatch.setattr(native, "_PARALLEL", False)
    m = _module((256, 1024))
    y1, y0 = _both(m, _input((256, 1024), F16))
    assert counting.served == counting.general == 0
    assert _bits_equal(y1, y0)
    _both(m, _input((16, 1024), F16))  # the serial sizes are still served
    assert counting.served == 1


def test_without_a_built_extension_nothing_is_loaded(ext, monkeypatch):
    """The default route asks whether the extension may be loaded (the background build,
    tests/test_torch_autobuild.py); while it may not, the Python route serves and nothing
    is loaded."""
    asked = []

    def not_yet():
        asked.append(1)
        return False

    monkeypatch.setattr(native, "_EXT", None)
    monkeypatch.setattr(native, "route", native._cached)
    monkeypatch.setattr(native, "_pickup", not_yet)
    m = _module((64, 32))
    with torch.no_grad():
        m(_input((64, 32), F32))
    assert asked and native.route is native._cached and native._EXT is None


def test_a_large_running_mean_takes_the_general_path(counting):
    m = _module((64, 16), mean_scale=1e37)
    y1, y0 = _both(m, _input((64, 16), F32))
    assert counting.general == 1 and counting.served == 0
    assert _bits_equal(y1, y0)


def test_tiny_eps_and_gradients_do_not_call_the_extension(counting):
    m = _module((64, 16))
    m.eps = 1e-31
    x = _input((64, 16), F32)
    y1, y0 = _both(m, x)
    assert _bits_equal(y1, y0)
    m.eps = 1e-5
    native.build()
    y = m(x.requires_grad_())
    assert y.grad_fn is not None
    assert counting.served == counting.general == 0


def test_served_where_the_training_route_is_not_loaded_yet(ext, monkeypatch):
    """An evaluation call is the first call of the process: the built extension is loaded
    (the default route, ``_cached``) and serves it; the route is on afterwards."""
    monkeypatch.setattr(native, "_EXT", None)
    monkeypatch.setattr(native, "route", native._cached)
    monkeypatch.setattr(native, "_WATCH", type(native._WATCH)(native.built, native.cache_dir))
    m = _module((64, 32))
    with torch.no_grad():
        y = m(_input((64, 32), F32))
    assert native.enabled() and native._EXT is ext
    native.disable()
    with torch.no_grad():
        assert _bits_equal(y, m(_input((64, 32), F32)))


def test_lazily_negated_tensors_take_the_python_route(counting):
    """torch._neg_view: memory that is not the values (the kernels read raw memory)."""
    m = _module((64, 32))
    y1, y0 = _both(m, torch._neg_view(_input((64, 32), F32)))
    assert counting.served == counting.general == 0
    assert _bits_equal(y1, y0)
    native.build()
    x = torch._neg_view(torch.randn(8, 32, requires_grad=True))
    y = m.train()(x)
    assert type(y.grad_fn).__name__ == "_LeanBackward"  # training: the same hand-back


def test_prepared_combinations_are_not_compiled_on_their_first_call(ext, monkeypatch):
    assert native.prepare_eval() == len(native.COMMON_EVAL)

    def refuse(*args):
        raise AssertionError(f"registered on a call: {args}")

    monkeypatch.setattr(native, "_register_eval", refuse)
    for dtype, (wdt, _, mdt, _) in native.COMMON_EVAL:
        affine = wdt == mdt
        m = _module((8, 16), _TORCH[wdt] if affine else F32, _TORCH[mdt], affine=affine)
        y1, y0 = _both(m, _input((8, 16), dtype))
        assert _bits_equal(y1, y0)
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="registered on a call"):  # negative control
        native.build()
        monkeypatch.setattr(native, "_register_eval", refuse)
        native._EXT.set_eval(1 * 16 + 15, 0, 1.0)  # the all-float64-vectors float32 entry
        _both(_module((8, 16), F64, F64), _input((8, 16), F32))


def test_evaluation_in_threads_gives_the_python_routes_values(counting):
    from concurrent.futures import ThreadPoolExecutor

    cases = [((64, 32), None), ((8, 32, 16, 16), None), ((256, 1024), None), ((16, 64, 8, 8), CL)]
    mods = [_module(shape) for shape, _ in cases]
    xs = [_input(shape, F32, fmt) for shape, fmt in cases]

    def run(i):
        with torch.no_grad():
            return [mods[i % 4](xs[i % 4]) for _ in range(20)]

    native.build()
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(run, range(8)))
    native.disable()
    with torch.no_grad():
        want = [m(x) for m, x in zip(mods, xs, strict=True)]
    assert counting.served == 160
    assert all(_bits_equal(y, want[i % 4]) for i, ys in enumerate(outs) for y in ys)


def test_the_extension_refuses_arguments_that_do_not_fit(ext):
    x = torch.randn(8, 4)
    v = torch.ones(4)
    native.build()
    with pytest.raises(RuntimeError, match=r"view \(8, 5, 0\).*\[8, 4\]"):
        ext.evaluate(x, v, v, v, v, 8, 5, 0, 0, 1e-5, 1)
    with pytest.raises(RuntimeError, match=r"contiguous \(4,\).*shape \[3\]"):
        ext.evaluate(x, v, v, torch.ones(3), v, 8, 4, 0, 0, 1e-5, 1)
    with pytest.raises(RuntimeError, match=r"contiguous \(4,\)"):
        ext.evaluate(x, torch.ones(8)[::2], v, v, v, 8, 4, 0, 0, 1e-5, 1)
    with pytest.raises(RuntimeError, match="not dense"):
        ext.evaluate(x.t().contiguous().t(), v, v, v, v, 8, 4, 0, 0, 1e-5, 1)
    with pytest.raises(RuntimeError, match="nchunks 0"):
        ext.evaluate(x, v, v, v, v, 8, 4, 0, 0, 1e-5, 0)
    with pytest.raises(RuntimeError, match="code in"):
        ext.set_eval(48, 0, 1.0)
    with pytest.raises(TypeError, match="float16/32/64 input"):
        centry.eval_address("float64", "float32", "float32", "float16", "float32")
