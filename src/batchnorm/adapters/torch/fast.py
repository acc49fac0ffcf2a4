"""One batch-norm forward for the torch modules, by the shortest route to the kernels.

* Eager, CPU, plain tensors: a lean ``torch.autograd.Function`` (:class:`_Lean`) whose
  forward and backward call the compiled kernels on NumPy views (:mod:`._cpu`); the
  running statistics are updated in place through NumPy views of the buffers (one small
  pass over ``C`` values, after the non-finite check).
* Under ``torch.compile`` / ``torch.export`` (``torch.compiler.is_compiling()``), under
  ``torch.func`` transforms, on the ``meta`` device, on other devices and for tensor
  subclasses: the custom operators ``torch.ops.batchnorm.*`` (:mod:`.ops`), and the running
  update in torch operations (a non-finite batch then leaves the statistics unchanged
  without raising: a traced graph cannot raise on data).
* Rare inputs that need the kernels' overflow scale (``|mean|`` or the spread within a
  quarter of the dtype's largest value) or ``eps < 1e-30``: the general path
  (:class:`.function.NormFunction` over :mod:`batchnorm.functional`).

Both the lean route and the operators run the same kernels; the tests hold them to each
other.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from . import _composed as T
from . import _cpu
from . import native as N
from . import ops as O
from ._running import host64, update_running, update_traced, update_views
from .function import BatchNormOp, apply

__all__ = ["batch_norm", "update_running", "use_ops"]

#: The tensor types the eager route takes as they are (subclasses go to the operators).
PLAIN_TYPES = _PLAIN = (torch.Tensor, torch.nn.Parameter)


def use_ops(x: torch.Tensor) -> bool:
    """Whether this call goes through the custom operators (see the module docstring)."""
    return (
        not x.is_cpu
        or type(x) not in _PLAIN
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch.jit.is_tracing()
    )


def _wrapped(t: torch.Tensor) -> bool:
    """A tensor of a vmap (functorch's or the legacy one gradcheck uses) or a subclass."""
    f = torch._C._functorch
    return (
        type(t) not in _PLAIN
        or torch._C._are_functorch_transforms_active()
        or f.is_legacy_batchedtensor(t)
        or f.is_functorch_wrapped_tensor(t)
    )


class _Step:
    """What one lean forward hands its backward (internal)."""

    __slots__ = ("lay", "xa", "mean", "var", "inv", "g", "eps", "batch", "views", "plain")

    def __init__(self, lay, eps: float, batch: bool, views=None) -> None:
        self.lay, self.eps, self.batch, self.views = lay, eps, batch, views


class _Lean(torch.autograd.Function):
    """``y = batch_norm(x)`` with the kernels called directly (eager CPU only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, st: _Step, rm, rv):
        ctx.st = st
        ctx.save_for_backward(x, weight)  # in-place changes before the backward are detected
        ctx.dtypes = O.param_dtypes(weight, bias)
        return _forward(x, weight, bias, st, rm, rv)

    @staticmethod
    def backward(ctx, dy):
        st = ctx.st
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled() or _wrapped(dy):
            # double backward, or a vmap over the gradient: the operator, which has both
            mean, var = torch.from_numpy(st.mean), torch.from_numpy(st.var)
            dx, dw, db = O.call_backward(dy, x, weight, mean, var, st.eps, st.batch)
        elif st.views is not None:  # the one-call backward, gradients in the params' dtypes
            need_dx = ctx.needs_input_grad[0]
            wd, bd = ctx.dtypes  # (a parameter's dtype is its NumPy view's)
            gw = None if wd is None else np.empty_like(st.views[0])
            gb = None if bd is None else np.empty_like(st.views[1])
            sums = np.empty((2, st.mean.shape[0])) if gw is None or gb is None else None
            dx = _cpu.backward_small(
                dy,
                st.xa,
                st.lay,
                st.mean,
                st.inv,
                st.views[0],
                st.batch,
                need_dx,
                sums[0] if gw is None else gw,
                sums[1] if gb is None else gb,
            )
            return (
                dx,
                None if gw is None else torch.from_numpy(gw),
                None if gb is None else torch.from_numpy(gb),
                None,
                None,
                None,
            )
        else:
            need_dx = ctx.needs_input_grad[0]
            dya = _cpu.arrange(dy, st.lay)
            dx, s1, gw = _cpu.backward(dya, st.xa, st.lay, st.mean, st.inv, st.g, st.batch, need_dx)
            if dx is not None and dx.dtype != x.dtype:
                dx = dx.to(x.dtype)
            wd, bd = ctx.dtypes
            return dx, _grad(gw, wd), _grad(s1, bd), None, None, None
        return dx, *O.param_grads(dw, db, ctx.dtypes), None, None, None


# torch's C ``apply`` of the Function: ``Function.apply`` (Python) first maps
# ``unwrap_dead_wrappers`` over the arguments, a microsecond or more per call, which only
# matters for functorch-wrapped tensors (sent to ``Function.apply`` below).
_C_APPLY = super(torch.autograd.Function, _Lean).apply
_IS_WRAPPED = torch._C._functorch.is_functorch_wrapped_tensor


def _lean_apply(x, weight, bias, st: _Step, rm, rv) -> torch.Tensor:
    """``_Lean.apply`` by the shortest call."""
    if (
        _IS_WRAPPED(x)
        or (weight is not None and _IS_WRAPPED(weight))
        or (bias is not None and _IS_WRAPPED(bias))
    ):
        return _Lean.apply(x, weight, bias, st, rm, rv)
    return _C_APPLY(x, weight, bias, st, rm, rv)


def _grad(g: np.ndarray, dtype: torch.dtype | None) -> torch.Tensor | None:
    """A float64 per-feature gradient as a tensor of the parameter's dtype."""
    if dtype is None:
        return None
    np_dtype = _cpu.NP_DTYPES.get(dtype)
    if np_dtype is None:
        return torch.from_numpy(g).to(dtype)
    return torch.from_numpy(g.astype(np_dtype))


def _forward(x, weight, bias, st: _Step, rm, rv) -> torch.Tensor:
    """The kernels' forward; fills ``st`` (statistics, coefficients) for the backward."""
    if st.views is not None:  # small ROWS / WIDE training, the parameters viewed in place
        y, stats, st.plain = _cpu.train_small(x, st.lay, st.views[0], st.views[1], st.eps)
        st.xa, st.mean, st.var, st.inv = x, stats[0], stats[1], stats[2]
        return y
    lay, c = st.lay, x.shape[1]
    xa = _cpu.arrange(x, lay)
    g, b = _cpu.feature64(weight, c, 1.0), _cpu.feature64(bias, c, 0.0)
    if st.batch:
        y, mean, var, inv = _cpu.train(xa, lay, g, b, st.eps)
    else:
        mean, var = st.mean, host64(rv)  # st.mean: the running mean, read by _lean
        inv = _cpu.inv_std(var, st.eps)
        y = _cpu.evaluate(xa, lay, g, b, mean, inv)
    st.xa, st.mean, st.var, st.inv, st.g = xa, mean, var, inv, g
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _general(x, weight, bias, batch: bool, rm, rv, eps: float):
    """``(y, mean, var)`` through the general path (overflow-scaled, eps checked)."""
    op = BatchNormOp(eps, None if batch else rm, None if batch else rv)
    y = apply(op, x, weight, bias)
    if not batch:
        return y, None, None
    return y, op.stats.mean, op.stats.var


def _lean(x, weight, bias, batch: bool, rm, rv, eps: float):
    """``(y, mean, var)`` (the last two float64 NumPy vectors in training) on the lean route."""
    lay = _cpu.layout(x)
    st = _Step(lay, eps, batch)
    if not batch:
        st.mean = host64(rm)
        if _cpu.needs_general(st.mean, 0.0, lay.compute, eps):
            return _general(x, weight, bias, batch, rm, rv, eps)
    grads = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    y = _lean_apply(x, weight, bias, st, rm, rv) if grads else _forward(x, weight, bias, st, rm, rv)
    if batch:
        spread = lay.count * float(np.add.reduce(st.var))
        if _cpu.needs_general(st.mean, spread, lay.compute, eps):
            return _general(x, weight, bias, batch, rm, rv, eps)
        return y, st.mean, st.var
    return y, None, None


def batch_norm(
    module, x, batch: bool, update: bool, rm, rv, params=None, lay=None, eps=None
) -> torch.Tensor:
    """``module``'s forward on ``x`` (checked by the caller): batch statistics when
    ``batch`` (updating the running statistics when ``update``), else ``rm``/``rv``.

    ``params``: ``(weight, bias, num_batches_tracked)`` when the caller has read them
    already (from the module's parameter and buffer dicts: an attribute read through
    ``Module.__getattr__`` costs about half a microsecond each); None: read here.
    ``lay``: the input's :class:`._cpu.Layout` when the caller has it (a plain tensor);
    ``eps``: the module's, checked and as a float (None: read here)."""
    if eps is None:
        eps = module.eps
    if params is None:
        weight, bias = module.weight, module.bias
        nbt = getattr(module, "num_batches_tracked", None) if update else None
    else:
        weight, bias, nbt = params
    if lay is None and not use_ops(x):  # (a caller without the layout: the variants)
        lay = _cpu.layout(x)
    if lay is not None and lay.native and lay.kind and not use_ops(x):
        # the one-call route: parameters and buffers read in place by the kernels
        views = _views(module, weight, bias, rm, rv, nbt, lay.view_shape[1])
        if views is not None:
            y = _direct(module, x, (weight, bias, rm, rv), batch, update, lay, views, eps)
            if y is not None:
                return y
    if x.numel() == 0:
        return _empty(module, x, update)
    if use_ops(x):
        if not batch:
            return O.call_eval(x, weight, bias, rm, rv, eps)
        y, mean, var = O.call_train(x, weight, bias, eps)
        if update:
            update_traced(module, mean, var, x.numel() // x.shape[1])
        return y
    _views(module, weight, bias, rm, rv, nbt, x.shape[1])  # checks sizes, every route
    y, mean, var = _lean(x, weight, bias, batch, rm, rv, eps)
    if update:
        update_running(module, mean, var, x.numel() // x.shape[1], tuple(x.shape))
    return y


def _direct(module, x, tensors, batch, update, lay, views, eps):
    """The one-call route (:func:`batchnorm.adapters.torch._cpu.kind`): evaluation without
    gradients at any size, training of small ``ROWS`` and ``WIDE`` inputs; None where it
    does not apply (the caller then takes :func:`_lean`). ``tensors``: the weight, bias,
    running mean and running variance."""
    weight, bias, rm, rv = tensors
    grads = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    if not batch:
        if grads or eps < _cpu.TINY_EPS:
            return None
        if N.route is not None:  # the compiled extension (.native), without Python
            y = N.evaluate(x, weight, bias, rm, rv, lay, views, eps)
            if y is not N.SKIP:
                return y
        return _cpu.evaluate_direct(x, lay, views[0], views[1], views[2], views[3], eps)
    if lay.kind not in _cpu.SMALL:
        return None
    route = N.route  # (read once: another thread may turn it off meanwhile)
    if grads and route is not None:  # the compiled node (.native)
        y = route(module, x, weight, bias, lay, views, eps, update, rm, rv)
        if y is not None:
            return y
    st = _Step(lay, eps, True, views)
    y = (
        _lean_apply(x, weight, bias, st, None, None)
        if grads
        else _forward(x, weight, bias, st, None, None)
    )
    if not st.plain:  # the overflow scale may be needed: the general path, from the start
        y, mean, var = _general(x, weight, bias, True, None, None, eps)
        if update:
            update_running(module, mean, var, lay.count, tuple(x.shape))
        return y
    if update:
        update_views(module, views, st.mean, st.var, lay.count, x.shape)
    return y


_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _views(module, weight, bias, rm, rv, nbt, c: int):
    """NumPy views ``(g, b, running_mean, running_var, num_batches_tracked)`` of the module's
    tensors (ones / zeros for a missing weight / bias; None for missing buffers), cached
    while the module holds the same tensors on the same memory; None when one of them
    cannot be viewed (float16, bfloat16, another device)."""
    if rm is None:
        nbt = None
    ts = (weight, bias, rm, rv, nbt)
    # the channels checked and the memory each view reads: address, shape and strides (a
    # .data swap can keep the address and change the strides or the size); written out
    # (a generator over the five costs about a microsecond more per call)
    ptrs = (
        c,
        0 if weight is None else (weight.data_ptr(), weight.shape, weight.stride()),
        0 if bias is None else (bias.data_ptr(), bias.shape, bias.stride()),
        0 if rm is None else (rm.data_ptr(), rm.shape, rm.stride()),
        0 if rv is None else (rv.data_ptr(), rv.shape, rv.stride()),
        0 if nbt is None else (nbt.data_ptr(), nbt.shape, nbt.stride()),
    )
    hit = _VIEWS.get(module)
    if hit is not None:
        old, old_ptrs, arrays = hit
        if (
            old[0] is weight
            and old[1] is bias
            and old[2] is rm
            and old[3] is rv
            and old[4] is nbt
            and old_ptrs == ptrs
        ):
            return arrays
    arrays = _make_views(ts, c)
    _VIEWS[module] = (ts, ptrs, arrays)
    return arrays


_NAMES = ("weight", "bias", "running_mean", "running_var")
# dtypes of parameters and buffers the one-call kernels read in place (numba takes no
# float16 array: a float16 module, ``.half()``, takes the lean route, which converts)
_VIEWED = (torch.float32, torch.float64)


def _make_views(ts, c: int):
    for name, t in zip(_NAMES, ts[:4], strict=False):
        if t is not None and tuple(t.shape) != (c,):  # swapped by .data = (never read past)
            raise RuntimeError(
                f"{name} should contain {c} elements (the input's dimension 1) not "
                f"{t.numel()} (shape {tuple(t.shape)})"
            )
        if t is not None and not (
            t.device.type == "cpu" and t.dtype in _VIEWED and t.is_contiguous()
        ):
            return None
    if ts[4] is not None and not (ts[4].device.type == "cpu" and ts[4].dtype == torch.long):
        return None
    weight, bias, rm, rv, nbt = (None if t is None else t.detach().numpy() for t in ts)
    if weight is None:
        weight = _cpu.feature64(None, c, 1.0)
    if bias is None:
        bias = _cpu.feature64(None, c, 0.0)
    compiled = (  # running_update compiles for these buffers (checked once, not per call)
        rm is not None
        and rv is not None
        and nbt is not None
        and rm.dtype == rv.dtype
        and rm.dtype in (np.float32, np.float64)
    )
    return weight, bias, rm, rv, nbt, compiled


def _empty(module, x, update: bool) -> torch.Tensor:
    """A batch of no samples: an empty output (torch counts the batch; the statistics stay)."""
    c = x.shape[1]
    y = T.affine(x, module.weight, module.bias, x.new_zeros(c), x.new_ones(c), 0.0)
    nbt = getattr(module, "num_batches_tracked", None)
    if update and nbt is not None:
        with torch.no_grad():
            nbt.add_(1)
    fmt = _cpu.layout(x).fmt if x.device.type == "cpu" else torch.contiguous_format
    return y.contiguous(memory_format=fmt)
