"""The kernels as torch operators: ``torch.ops.batchnorm.{train, eval, backward}``.

Each is a ``torch.library.custom_op`` with a fake (meta) implementation, so
``torch.compile`` and ``torch.export`` trace through it, a vmap rule, so ``torch.func``
transforms (and ``gradcheck``'s batched-gradient check) work, and the hand-written backward
(``backward``) registered as the autograd formula of the two forwards. The backward's
own derivative (double backward) is that of the same equations written in torch operations
(``batchnorm.adapters.torch._composed``), recomputed when asked for.

* ``train(x, weight, bias, eps) -> (y, mean, var)``: batch statistics (``var`` biased,
  both float64 per feature);
* ``eval(x, weight, bias, running_mean, running_var, eps) -> y``;
* ``backward(dy, x, weight, mean, var, eps, batch_stats) -> (dx, dweight, dbias)``
  (the last two float64 per feature).

On CPU they run the compiled kernels (:mod:`._cpu`); on any other device the torch
formulas. The vmap rule folds the vmapped dimension into the features: ``B`` independent
batch norms over ``C`` features are one batch norm over ``B*C`` features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _composed as T
from . import _cpu

__all__ = ["backward", "evaluate", "train"]

_LIB = "batchnorm"


def _stats_like(x: Tensor, c: int) -> Tensor:
    return x.new_empty((c,), dtype=torch.float32 if x.device.type == "mps" else torch.float64)


def _cpu_ok(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() > 0


# ---------------------------------------------------------------- train
@torch.library.custom_op(f"{_LIB}::train", mutates_args=())
def train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm with the batch statistics: ``(y, mean, biased var)``."""
    if not _cpu_ok(x):
        mean, var = T.moments(x)
        return T.affine(x, weight, bias, mean, var, eps), mean, var
    lay = _cpu.layout(x)
    c = x.shape[1]
    xa = _cpu.arrange(x, lay)
    g, b = _cpu.feature64(weight, c, 1.0), _cpu.feature64(bias, c, 0.0)
    y, mean, var, _ = _cpu.train(xa, lay, g, b, eps)
    return y.to(x.dtype), torch.from_numpy(mean), torch.from_numpy(var)


@train.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    return torch.empty_like(x), _stats_like(x, c), _stats_like(x, c)


def _train_setup(ctx, inputs, output):
    """Keep ``x``, ``weight`` and the batch statistics for the backward."""
    x, weight, bias, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps, ctx.dtypes = eps, param_dtypes(weight, bias)
    ctx.mark_non_differentiable(mean, var)


def param_dtypes(weight: Tensor | None, bias: Tensor | None) -> tuple:
    """The dtypes of ``weight`` and ``bias`` (None for a missing one)."""
    return (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def param_grads(dw: Tensor, db: Tensor, dtypes: tuple) -> tuple:
    """The parameter gradients in the parameters' dtypes (None for a missing one)."""
    return tuple(None if d is None else g.to(d) for g, d in zip((dw, db), dtypes, strict=True))


def _train_grad(ctx, dy, _dmean, _dvar):
    x, weight, mean, var = ctx.saved_tensors
    dx, dw, db = call_backward(dy, x, weight, mean, var, ctx.eps, True)
    return dx, *param_grads(dw, db, ctx.dtypes), None


train.register_autograd(_train_grad, setup_context=_train_setup)


# ---------------------------------------------------------------- eval
@torch.library.custom_op(f"{_LIB}::eval", mutates_args=())
def evaluate(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """Batch norm with given statistics: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    if not _cpu_ok(x):
        return T.affine(x, weight, bias, running_mean, running_var, eps)
    mean = running_mean.detach().double().numpy()
    var = running_var.detach().double().numpy()
    lay = _cpu.layout(x)
    if _cpu.needs_general(mean, 0.0, lay.compute, max(eps, 1.0)):
        return T.affine(x, weight, bias, running_mean, running_var, eps)
    c = x.shape[1]
    g, b = _cpu.feature64(weight, c, 1.0), _cpu.feature64(bias, c, 0.0)
    y = _cpu.evaluate(_cpu.arrange(x, lay), lay, g, b, mean, _cpu.inv_std(var, eps))
    return y.to(x.dtype)


@evaluate.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return torch.empty_like(x)


def _eval_setup(ctx, inputs, output):
    """Keep ``x``, ``weight`` and the running statistics for the backward."""
    x, weight, bias, rm, rv, eps = inputs
    ctx.save_for_backward(x, weight, rm, rv)
    ctx.eps, ctx.dtypes = eps, param_dtypes(weight, bias)


def _eval_grad(ctx, dy):
    x, weight, rm, rv = ctx.saved_tensors
    dx, dw, db = call_backward(dy, x, weight, rm, rv, ctx.eps, False)
    return dx, *param_grads(dw, db, ctx.dtypes), None, None, None


evaluate.register_autograd(_eval_grad, setup_context=_eval_setup)


# ---------------------------------------------------------------- backward
@torch.library.custom_op(f"{_LIB}::backward", mutates_args=())
def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The hand-written backward: ``(dx, dweight, dbias)``."""
    if not _cpu_ok(x):
        return T.backward(dy, x, weight, mean, var, eps, batch_stats)
    lay = _cpu.layout(x)
    m, v = mean.detach().double().numpy(), var.detach().double().numpy()
    spread = lay.count * float(v.sum()) if batch_stats else 0.0
    if _cpu.needs_general(m, spread, lay.compute, max(eps, 1.0)):
        dx, dw, db = T.backward(dy, x, weight, mean, var, eps, batch_stats)
        return dx, dw.double(), db.double()
    inv = _cpu.inv_std(v, eps)
    g = _cpu.feature64(weight, x.shape[1], 1.0)
    xa = _cpu.arrange(x, lay)
    dx, s1, gw = _cpu.backward(_cpu.arrange(dy, lay), xa, lay, m, inv, g, batch_stats)
    return dx.to(x.dtype), torch.from_numpy(gw), torch.from_numpy(s1)


@backward.register_fake
def _(dy, x, weight, mean, var, eps, batch_stats):
    c = x.shape[1]
    return torch.empty_like(x), _stats_like(x, c), _stats_like(x, c)


def _backward_setup(ctx, inputs, output):
    """Keep the backward's tensor inputs for the double backward."""
    dy, x, weight, mean, var, eps, batch_stats = inputs
    ctx.save_for_backward(dy, x, weight, mean, var)
    ctx.eps, ctx.batch_stats = eps, batch_stats


def _backward_grad(ctx, gdx, gdw, gdb):
    """Double backward: the derivative of the torch-operation formula, recomputed. When a
    graph is being built (``create_graph=True``), the recomputation is attached to the
    original tensors, so third and higher derivatives are right too."""
    dy, x, weight, mean, var = ctx.saved_tensors
    higher = torch.is_grad_enabled()

    def leaf(t):
        # a fresh alias: the gradient reaching it comes only through this recomputation (not
        # through t's own history, which the engine follows itself), and with a graph being
        # built it stays attached to t for higher derivatives
        return t.view_as(t) if higher and t.requires_grad else t.detach().requires_grad_()

    inputs = [leaf(dy), leaf(x)] + ([] if weight is None else [leaf(weight)])
    w = inputs[2] if weight is not None else None
    with torch.enable_grad():
        outs = T.backward(inputs[0], inputs[1], w, mean, var, ctx.eps, ctx.batch_stats)
        pairs = [(o, g) for o, g in zip(outs, (gdx, gdw, gdb), strict=True) if g is not None]
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            inputs,
            [g.to(o.dtype) for o, g in pairs],
            allow_unused=True,
            create_graph=higher,
        )
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
    if higher and ctx.batch_stats:
        grads = [NoThirdDerivative.apply(g) for g in grads]
    gw = grads[2] if weight is not None else None
    return grads[0], grads[1], gw, None, None, None, None


class NoThirdDerivative(torch.autograd.Function):
    """Identity whose derivative raises: the second derivative of a training layer is
    exact, a third is not available (refused, never silently wrong)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t):
        """A copy of ``t``."""
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Nothing to keep."""

    @staticmethod
    def backward(ctx, g):
        """Refuse with a clear message."""
        raise RuntimeError(
            "batchnorm: a third (or higher) derivative through a batch-norm layer in training "
            "mode is not available; first and second derivatives are (evaluation mode has all)"
        )


backward.register_autograd(_backward_grad, setup_context=_backward_setup)


# ---------------------------------------------------------------- vmap rules
def _batched(t: Tensor, dim: int | None, size: int) -> Tensor:
    """``t`` with the vmapped dimension first (expanded when ``t`` is not batched)."""
    if dim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(dim, 0)


def _fold(t: Tensor, dim: int | None, size: int) -> Tensor:
    """A batched ``(N, C, *)`` tensor as ``(N, B*C, *)``."""
    t = _batched(t, dim, size)
    return t.transpose(0, 1).reshape(t.shape[1], size * t.shape[2], *t.shape[3:])


def _unfold(t: Tensor, size: int) -> Tensor:
    """The inverse of :func:`_fold`, batched dimension first."""
    n, bc = t.shape[0], t.shape[1]
    return t.reshape(n, size, bc // size, *t.shape[2:]).transpose(0, 1)


def _feat(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """A (batched) per-feature vector as ``(B*C,)``."""
    return None if t is None else _batched(t, dim, size).reshape(-1)


@train.register_vmap
def _(info, in_dims, x, weight, bias, eps):
    b = info.batch_size
    xd, wd, bd, _ = in_dims
    y, mean, var = train(_fold(x, xd, b), _feat(weight, wd, b), _feat(bias, bd, b), eps)
    return (_unfold(y, b), mean.view(b, -1), var.view(b, -1)), (0, 0, 0)


@evaluate.register_vmap
def _(info, in_dims, x, weight, bias, running_mean, running_var, eps):
    b = info.batch_size
    xd, wd, bd, md, vd, _ = in_dims
    feats = [
        _feat(t, d, b) for t, d in ((weight, wd), (bias, bd), (running_mean, md), (running_var, vd))
    ]
    return _unfold(evaluate(_fold(x, xd, b), *feats, eps), b), 0


@backward.register_vmap
def _(info, in_dims, dy, x, weight, mean, var, eps, batch_stats):
    b = info.batch_size
    dyd, xd, wd, md, vd, _, _ = in_dims
    feats = [_feat(t, d, b) for t, d in ((weight, wd), (mean, md), (var, vd))]
    dx, dw, db = backward(_fold(dy, dyd, b), _fold(x, xd, b), *feats, eps, batch_stats)
    return (_unfold(dx, b), dw.view(b, -1), db.view(b, -1)), (0, 0, 0)


# ---------------------------------------------------------------- torch.func
class TrainFunction(torch.autograd.Function):
    """:func:`train` with its autograd formula as a ``torch.func``-ready Function (used
    under functorch transforms, whose ``grad`` does not differentiate a custom operator's
    registered formula)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        """:func:`train` (its own autograd formula off: this Function's is used)."""
        with torch.no_grad():  # the operator's own autograd formula is not wanted here
            return train(x, weight, bias, eps)

    setup_context = staticmethod(_train_setup)

    @staticmethod
    def backward(ctx, dy, dmean, dvar):
        """The hand-written backward (:func:`backward`)."""
        return _train_grad(ctx, dy, dmean, dvar)


class EvalFunction(torch.autograd.Function):
    """:func:`evaluate` as a ``torch.func``-ready Function (see :class:`TrainFunction`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, eps):
        """:func:`evaluate` (its own autograd formula off: this Function's is used)."""
        with torch.no_grad():
            return evaluate(x, weight, bias, running_mean, running_var, eps)

    setup_context = staticmethod(_eval_setup)

    @staticmethod
    def backward(ctx, dy):
        """The hand-written backward with the running statistics held constant."""
        return _eval_grad(ctx, dy)


def call_train(x, weight, bias, eps: float):
    """:func:`train`, through :class:`TrainFunction` under functorch transforms."""
    if torch._C._are_functorch_transforms_active():
        return TrainFunction.apply(x, weight, bias, eps)
    return train(x, weight, bias, eps)


def call_eval(x, weight, bias, running_mean, running_var, eps: float):
    """:func:`evaluate`, through :class:`EvalFunction` under functorch transforms."""
    if torch._C._are_functorch_transforms_active():
        return EvalFunction.apply(x, weight, bias, running_mean, running_var, eps)
    return evaluate(x, weight, bias, running_mean, running_var, eps)


class BackwardFunction(torch.autograd.Function):
    """:func:`backward` with its double backward, ``torch.func``-ready."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dy, x, weight, mean, var, eps, batch_stats):
        """:func:`backward` (its own autograd formula off: this Function's is used)."""
        with torch.no_grad():
            return backward(dy, x, weight, mean, var, eps, batch_stats)

    setup_context = staticmethod(_backward_setup)

    @staticmethod
    def backward(ctx, gdx, gdw, gdb):
        """The double backward (see the module docstring)."""
        return _backward_grad(ctx, gdx, gdw, gdb)


def call_backward(dy, x, weight, mean, var, eps: float, batch_stats: bool):
    """:func:`backward`, through :class:`BackwardFunction` under functorch transforms."""
    if torch._C._are_functorch_transforms_active():
        return BackwardFunction.apply(dy, x, weight, mean, var, eps, batch_stats)
    return backward(dy, x, weight, mean, var, eps, batch_stats)
