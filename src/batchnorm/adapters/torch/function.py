"""The one ``torch.autograd.Function`` of the adapters and the operations it runs.

Forward and backward of every module are this library's kernels
(:mod:`batchnorm.functional`, :mod:`batchnorm.renorm`): the forward records no autograd
graph of small torch operations, and the backward is the hand-written one
(:func:`batchnorm.functional.batch_norm_backward`). An operation object (:class:`BatchNormOp`,
:class:`RenormOp`, :class:`GhostOp`) holds what one forward needs besides the tensors (eps,
running statistics, a reducer) and, after the forward, the batch statistics the module uses
to update its running statistics.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ...core.stats import BatchStats
from ...functional import batch_norm_backward, batch_norm_eval, batch_norm_train
from ...renorm import batch_renorm_backward, batch_renorm_train
from ...variants import ghost_slices
from . import _bridge as B


class _State:
    """What a forward keeps for its backward (internal)."""

    __slots__ = ("view", "x", "dtype", "cache")

    def __init__(self, view, x, dtype, cache) -> None:
        self.view, self.x, self.dtype, self.cache = view, x, dtype, cache


class BatchNormOp:
    """Batch norm with batch statistics (``running_mean is None``) or given statistics.

    Parameters
    ----------
    eps : float
    running_mean, running_var : torch.Tensor, optional
        Normalize with these (evaluation); None: with the batch statistics (training).
    reducer : batchnorm.core.reduce.Reducer, optional
        Merges the batch statistics and gradient sums across processes.

    Attributes
    ----------
    stats : BatchStats or None
        After a training forward: the (merged) batch count, mean and biased variance.
    """

    def __init__(self, eps: float, running_mean=None, running_var=None, reducer=None) -> None:
        self.eps, self.reducer = eps, reducer
        self.running_mean, self.running_var = running_mean, running_var
        self.stats: BatchStats | None = None

    def forward(self, x, weight, bias, keep: bool = True):
        """``(y, state)``: the output and what the backward needs (None unless ``keep``)."""
        v = B.plan(x)
        xa = B.arrange(x, v)
        xn = B.array(xa, v)
        g, b = B.feature(weight, v), B.feature(bias, v)
        y, out = B.empty(x, v) if v.cpu else (None, None)
        if self.running_mean is None:
            yk, cache = batch_norm_train(
                xn, g, b, axis=v.axis, eps=self.eps, out=out, reducer=self.reducer
            )
            self.stats = BatchStats(cache.count, cache.mean, cache.var)
        else:
            rm, rv = B.feature(self.running_mean, v), B.feature(self.running_var, v)
            yk, cache = batch_norm_eval(
                xn, g, b, rm, rv, axis=v.axis, eps=self.eps, return_cache=True, out=out
            )
        y = yk if y is None else y
        return B.result(y, x.dtype), (_State(v, xa, x.dtype, cache) if keep else None)

    def backward(self, dy, state: _State):
        """``(dx, dgamma, dbeta)`` (the last two per feature, float64 on CPU)."""
        v = state.view
        dyn = B.array(B.arrange(dy, v), v)
        dx, out = B.empty(state.x, v) if v.cpu else (None, None)
        dxk, dg, db = batch_norm_backward(dyn, state.cache, out=out, reducer=self.reducer)
        dx = dxk if dx is None else dx
        return B.result(dx, state.dtype), dg, db


class RenormOp(BatchNormOp):
    """Batch renorm in training (Ioffe 2017; :func:`batchnorm.renorm.batch_renorm_train`).

    Parameters
    ----------
    eps, rmax, dmax : float
    running_mean, running_std : torch.Tensor
        The current population estimates (``running_std > 0``) that r and d compare with.
    reducer : Reducer, optional
    """

    def __init__(self, eps, rmax, dmax, running_mean, running_std, reducer=None) -> None:
        super().__init__(eps, None, None, reducer)
        self.rmax, self.dmax = rmax, dmax
        self.mu, self.sigma = running_mean, running_std

    def forward(self, x, weight, bias, keep: bool = True):
        """``(y, state)``: the renormalized output and what the backward needs."""
        v = B.plan(x)
        xa = B.arrange(x, v)
        xn = B.array(xa, v)
        g, b = B.feature(weight, v), B.feature(bias, v)
        yk, cache = batch_renorm_train(
            xn,
            g,
            b,
            B.feature(self.mu, v),
            B.feature(self.sigma, v),
            rmax=self.rmax,
            dmax=self.dmax,
            axis=v.axis,
            eps=self.eps,
            reducer=self.reducer,
        )
        self.stats = BatchStats(cache.bn.count, cache.mean, cache.var)
        y = B.from_array(yk, v).to(x.device)
        return B.result(y, x.dtype), (_State(v, xa, x.dtype, cache) if keep else None)

    def backward(self, dy, state: _State):
        """``(dx, dgamma, dbeta)`` with r and d held constant."""
        v = state.view
        dyn = B.array(B.arrange(dy, v), v)
        dxk, dg, db = batch_renorm_backward(dyn, state.cache, reducer=self.reducer)
        return B.result(B.from_array(dxk, v), state.dtype), dg, db


class GhostOp(BatchNormOp):
    """Ghost batch norm: batch statistics per virtual batch of samples along dim 0.

    Parameters
    ----------
    eps : float
    virtual_batch_size : int

    Attributes
    ----------
    parts : list of BatchStats
        After a forward: the statistics of each virtual batch.
    """

    def __init__(self, eps: float, virtual_batch_size: int) -> None:
        super().__init__(eps)
        self.virtual_batch_size = virtual_batch_size
        self.parts: list[BatchStats] = []

    def forward(self, x, weight, bias, keep: bool = True):
        """``(y, state)``: every virtual batch normalized with its own statistics."""
        v = B.plan(x)
        xa = B.arrange(x, v)
        xn = B.array(xa, v)
        g, b = B.feature(weight, v), B.feature(bias, v)
        per_sample = x[:1].numel() // max(x.shape[1], 1)
        slices = ghost_slices(x.shape[0], self.virtual_batch_size, per_sample)
        y, out = B.empty(x, v) if v.cpu else (None, None)
        outs, caches = [], []
        for sl in slices:
            part = None if out is None else out[sl]
            yk, cache = batch_norm_train(xn[sl], g, b, axis=v.axis, eps=self.eps, out=part)
            outs.append(yk)
            caches.append((sl, cache))
        self.parts = [BatchStats(c.count, c.mean, c.var) for _, c in caches]
        self.stats = BatchStats.combine(self.parts)
        y = torch.cat(outs, 0) if y is None else y
        return B.result(y, x.dtype), (_State(v, xa, x.dtype, caches) if keep else None)

    def backward(self, dy, state: _State):
        """``(dx, dgamma, dbeta)``: each virtual batch's backward; the sums added."""
        v = state.view
        dyn = B.array(B.arrange(dy, v), v)
        dx, out = B.empty(state.x, v) if v.cpu else (None, None)
        dxs, dg, db = [], 0.0, 0.0
        for sl, cache in state.cache:
            part = None if out is None else out[sl]
            dxk, g, b = batch_norm_backward(dyn[sl], cache, out=part)
            dxs.append(dxk)
            dg = dg + (0.0 if g is None else g)
            db = db + (0.0 if b is None else b)
        dx = torch.cat(dxs, 0) if dx is None else dx
        return B.result(dx, state.dtype), dg, db


class NormFunction(torch.autograd.Function):
    """``y = op(x, weight, bias)`` with the op's hand-written backward (see the module
    docstring); ``weight`` and ``bias`` may be None."""

    @staticmethod
    def forward(ctx, x, weight, bias, op):
        """Run ``op.forward`` and keep its state for the backward."""
        y, state = op.forward(x, weight, bias)
        ctx.op, ctx.state = op, state
        ctx.save_for_backward(x, weight, bias)  # in-place changes are then detected
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        """Gradients for ``x``, ``weight`` and ``bias`` (None for ``op``)."""
        x, weight, bias = ctx.saved_tensors
        dx, dg, db = ctx.op.backward(dy, ctx.state)
        dw = None if weight is None or dg is None else B.tensor(dg, weight)
        dbias = None if bias is None or db is None else B.tensor(db, bias)
        return (dx if ctx.needs_input_grad[0] else None), dw, dbias, None


def apply(op, x, weight, bias):
    """``op`` on ``(x, weight, bias)``, through :class:`NormFunction` when a gradient is
    needed and directly (no saved state) otherwise."""
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if grads:
        return NormFunction.apply(x, weight, bias, op)
    return op.forward(x, weight, bias, keep=False)[0]
