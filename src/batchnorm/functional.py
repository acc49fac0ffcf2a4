r"""Pure batch-normalization kernels.

For each feature :math:`c` (the entries along ``axis``), with the statistics taken over the
:math:`m` values of all other axes,

.. math::

    \mu_c = \frac{1}{m}\sum_i x_{ic}, \qquad
    \sigma^2_c = \frac{1}{m}\sum_i (x_{ic}-\mu_c)^2,

    \hat x_{ic} = \frac{x_{ic}-\mu_c}{\sqrt{\sigma^2_c+\epsilon}}, \qquad
    y_{ic} = \gamma_c \hat x_{ic} + \beta_c .

In evaluation mode :math:`\mu_c, \sigma^2_c` are given (the running statistics) and are
constants for the backward pass. With batch statistics the backward pass is

.. math::

    \frac{\partial L}{\partial x_{ic}} = \frac{\gamma_c}{\sqrt{\sigma^2_c+\epsilon}}
    \Bigl(dy_{ic} - \overline{dy}_c - \hat x_{ic}\,\overline{dy\,\hat x}_c\Bigr),

    d\gamma_c = \sum_i dy_{ic}\hat x_{ic}, \qquad d\beta_c = \sum_i dy_{ic},

where bars are means over the :math:`m` values of the feature.

Numerics. Statistics are accumulated in float64 and the data are centred before squaring, so
no E[x^2] - E[x]^2 cancellation happens even at mean 1e6 and std 1 in float32. Every path
holds the mean unrounded, as a shift plus the mean's offset from it (the NumPy backend
shifts by the float64 mean rounded to the working precision, the compiled kernels by one
sample of each feature, with the differences formed in float64), and the output pass
centres on the shift with that offset in the bias (:func:`batchnorm.core.coef.mean_offset`),
so float64 data of mean 1e12 and std 1e-3 normalize to float64 round-off of ``x_hat``.
Elementwise work runs in the working precision (float64 for float64 input, float32
otherwise; float16 is computed in float32) in the rounding-safe form ``(x - s) * a + b``.
Results come back in the input dtype. The kernels never write to their inputs (an ``out=``
that shares memory with any argument is refused), and NaN/Inf propagate without raising.

Backends. Every pass is made of four primitives (moments, the affine map, the two gradient
sums, the input gradient) behind one contract (see :mod:`batchnorm.backends`); the NumPy
backend and every other array library centre with :func:`batchnorm.core.passes.centred`
and share the output and input-gradient passes of :mod:`batchnorm.core.passes`, and the
compiled kernels compile the formulas of :mod:`batchnorm.core.coef`, so the maths lives in
one place.

Synchronization. ``comm=`` (an mpi4py communicator) or ``reducer=`` (any
:class:`batchnorm.core.reduce.Reducer`) makes a call collective: local statistics, then
the reducer merges them across processes, then the output (see
:mod:`batchnorm.distributed`). The same code runs either way: a participant's local step
goes through :func:`batchnorm.core.reduce.attempt`, the reducer raises any participant's
error on every participant, and ``reducer.dispatch`` picks the fused single-process pass
or the one that merges in between. The cache of such a forward records that it was
synchronized (never the communicator): its backward needs the same ``comm``/``reducer``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._compose import (
    BatchNormCache,
    backward_args,
    backward_pass,
    check_merged,
    eval_pass,
    inputs,
    local_moments_of,
    reducer_of,
    train_pass,
)
from .backends import BACKENDS, check_backend, numba_available
from .core.reduce import KIND_MOMENTS, LOCAL, Call, Reducer, attempt

__all__ = [
    "BACKENDS",
    "BatchNormCache",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_train",
    "moments",
    "numba_available",
]

Axis = int | Sequence[int]


# --------------------------------------------------------------------------- public API
def moments(
    x,
    *,
    axis: Axis = 1,
    backend: str = "auto",
    comm: object = None,
    reducer: Reducer | None = None,
    timeout: float | None = None,
):
    """Per-feature mean and biased variance of ``x``, accumulated in float64.

    Parameters
    ----------
    x : array, shape (N, C, *spatial) or any layout, float16/32/64
        A NumPy array or an array of any Array API library (see "Any array
        library and devices" in the user guide); never modified.
    axis : int or tuple of int
        Feature axis (or axes); statistics reduce over all the others.
    backend : {"auto", "numpy", "numba"}
        For NumPy arrays: "auto" uses the compiled kernels when numba is importable and
        ``x`` is large enough (or small and of a layout the serial kernels fuse).
    comm : mpi4py communicator, optional
        Statistics of the union of every rank's ``x`` (ranks may hold no rows; NaN when
        none holds any), bit-identical on every rank; see :mod:`batchnorm.distributed`.
    reducer : Reducer, optional
        Any reducer instead of ``comm``.
    timeout : float, optional
        With ``comm``: seconds after which a rank waiting for missing ranks aborts the job.

    Returns
    -------
    mean, var : array, shape (*features)
        float64 for NumPy input; the statistics dtype of the input's namespace otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> import batchnorm as bn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> mean, var = bn.moments(x, axis=1)
    >>> mean, var
    (array([ 2., 20.]), array([  1., 100.]))
    """
    red = reducer_of(comm, reducer, timeout)
    local, error = attempt(red, local_moments_of, x, axis, backend, red)
    inp, st = local if local is not None else (None, None)
    local = st
    st = red.merge(Call("moments", KIND_MOMENTS), st, error, inp.x.dtype if inp else None)
    if red is not LOCAL:
        if error is not None:  # the reducer returned although this participant failed
            raise error
        check_merged(red, "moments", local, st, inp.lay.fshape)
    return inp.be.from_host(st.mean), inp.be.from_host(st.var)


def batch_norm_train(
    x,
    gamma,
    beta,
    *,
    axis: Axis = 1,
    eps: float = 1e-5,
    backend: str = "auto",
    out: np.ndarray | None = None,
    comm: object = None,
    reducer: Reducer | None = None,
    timeout: float | None = None,
) -> tuple[object, BatchNormCache]:
    """Batch-norm forward pass with batch statistics (training mode).

    Parameters
    ----------
    x : array, shape (N, C, *spatial) or any layout, float16/32/64
        Input (NumPy, or any Array API library on its own device); never modified.
    gamma, beta : array, shape (*features), or None
        Scale and shift; None means 1 and 0. Same library (and device) as ``x``.
    axis : int or tuple of int
        Feature axis (or axes); negative allowed. Statistics reduce over all the others.
    eps : float
        Added to the variance before the square root.
    backend : {"auto", "numpy", "numba"}
        For NumPy arrays: "auto" uses the compiled kernels when numba is importable and
        ``x`` has at least ``AUTO_NUMBA_MIN_SIZE`` (32768) elements; feature axes that are
        not adjacent always take the NumPy path. Other arrays take the array-API path.
    out : ndarray, optional
        NumPy only: where to write ``y``: same shape and dtype as ``x``, C-contiguous or
        with the strides of ``x``, writeable, sharing no memory with ``x``, ``gamma`` or
        ``beta``.
    comm : mpi4py communicator, optional
        Synchronized batch norm: the statistics are those of the union of every rank's
        ``x`` (see :mod:`batchnorm.distributed`); the backward pass needs the same ``comm``.
    reducer : Reducer, optional
        Any reducer instead of ``comm``.
    timeout : float, optional
        With ``comm``: seconds after which a rank waiting for missing ranks aborts the job.

    Returns
    -------
    y : array, same shape, dtype, library and device as ``x`` (``out`` when given)
    cache : BatchNormCache
        ``cache.mean`` and ``cache.var`` are the batch mean and biased batch variance.

    Examples
    --------
    >>> import numpy as np
    >>> import batchnorm as bn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    >>> y, cache = bn.batch_norm_train(x, None, None, axis=1, eps=0.0)
    >>> y.round(6)
    array([[-1.224745, -1.224745],
           [ 0.      ,  0.      ],
           [ 1.224745,  1.224745]])
    >>> cache.mean, cache.var.round(4)
    (array([ 3., 30.]), array([  2.6667, 266.6667]))
    """
    red = reducer_of(comm, reducer, timeout)
    inp, error = attempt(red, inputs, x, gamma, beta, axis, eps, backend, out, reducer=red)
    y, cache, _ = train_pass(inp, red, None, error)  # the call record "batch_norm_train"
    return y, cache


def batch_norm_eval(
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    *,
    axis: Axis = 1,
    eps: float = 1e-5,
    return_cache: bool = False,
    backend: str = "auto",
    out: np.ndarray | None = None,
):
    """Batch-norm forward pass with given statistics (evaluation mode).

    Parameters
    ----------
    x : array, shape (N, C, *spatial) or any layout, float16/32/64
    gamma, beta : array, shape (*features), or None
    running_mean, running_var : array, shape (*features)
        The population estimates to normalize with; eps is always added to the variance.
    axis : int or tuple of int
    eps : float
    return_cache : bool
        Also return a cache for :func:`batch_norm_backward`, in which the statistics are
        constants.
    backend : {"auto", "numpy", "numba"}
    out : ndarray, optional
        NumPy only: where to write ``y``: same shape and dtype as ``x``, C-contiguous or
        with the strides of ``x``, writeable, sharing no memory with any input.

    Returns
    -------
    y : array, same shape, dtype, library and device as ``x`` (``out`` when given)
    cache : BatchNormCache, only when ``return_cache`` is True

    Examples
    --------
    >>> import numpy as np
    >>> import batchnorm as bn
    >>> x = np.array([[2.0], [4.0]])
    >>> bn.batch_norm_eval(x, np.array([2.0]), np.array([1.0]), np.array([3.0]),
    ...                    np.array([4.0]), eps=0.0)
    array([[0.],
           [2.]])
    """
    inp = inputs(x, gamma, beta, axis, eps, backend, out, running_mean, running_var, empty_ok=True)
    rm = inp.be.feature(running_mean, "running_mean", inp.lay, inp.x)
    rv = inp.be.feature(running_var, "running_var", inp.lay, inp.x)
    return eval_pass(inp, rm, rv, return_cache)


def batch_norm_backward(
    dy,
    cache: BatchNormCache,
    *,
    backend: str = "auto",
    out: np.ndarray | None = None,
    comm: object = None,
    reducer: Reducer | None = None,
    timeout: float | None = None,
):
    """Gradients of a batch-norm forward pass.

    Parameters
    ----------
    dy : array, same shape and library as ``cache.x``, float16/32/64
        Upstream gradient; never modified.
    cache : BatchNormCache
        From :func:`batch_norm_train`, or :func:`batch_norm_eval` with ``return_cache=True``.
    backend : {"auto", "numpy", "numba"}
    out : ndarray, optional
        NumPy only: where to write ``dx``: same shape and dtype as ``cache.x``,
        C-contiguous or with the strides of ``cache.x``, writeable, sharing no memory with
        ``dy`` or the forward input.
    comm, reducer : optional
        Required after a synchronized forward (the same ones): the two gradient sums are
        summed over every participant before ``dx`` is formed.
    timeout : float, optional
        With ``comm``: seconds after which a rank waiting for missing ranks aborts the job.

    Returns
    -------
    dx : array, same shape, dtype, library and device as ``cache.x`` (``out`` when given)
    dgamma, dbeta : array, shape (*features), or None when gamma / beta was None
        After a synchronized forward: the sums over every participant, identical everywhere.

    Examples
    --------
    >>> import numpy as np
    >>> import batchnorm as bn
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((16, 3)), rng.standard_normal((16, 3))
    >>> y, cache = bn.batch_norm_train(x, np.ones(3), np.zeros(3))
    >>> dx, dgamma, dbeta = bn.batch_norm_backward(dy, cache)
    >>> dx.shape, bool(np.allclose(dbeta, dy.sum(axis=0)))
    ((16, 3), True)
    >>> bool(np.allclose(dx.sum(axis=0), 0.0))  # the mean is subtracted: dx sums to zero
    True
    """
    check_backend(backend)
    red = reducer_of(comm, reducer, timeout)
    # every participant checks dy (and out) before any participant reduces
    args, error = attempt(red, backward_args, dy, cache, out, red, "batch_norm_backward")
    dy, out = args if args is not None else (None, None)
    return backward_pass(dy, cache, backend, out, red, None, error)  # "batch_norm_backward"
