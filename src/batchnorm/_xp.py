"""Array namespaces, devices and the dtype policy, written once.

Every array that is not a NumPy array goes through the Array API path
(:mod:`batchnorm.core.passes`); this module answers the questions that path asks of an
array: which library it comes from (:func:`namespace`), where it lives (:func:`device`),
whether its dtype is supported (:func:`check_float`), and in which precisions the work
runs:

* the *working* dtype (:func:`work_dtype`) of the elementwise passes: float64 data stay
  float64, float16 / bfloat16 / float32 data are computed in float32;
* the *statistics* dtype (:func:`stats_dtype`) the sums are accumulated in: float64 where
  the device really has it, float32 otherwise (torch MPS, JAX without x64, array-api-strict's
  ``no_float64`` device).

It imports NumPy and ``array_api_compat`` only: the ``is_*_namespace`` tests of
``array_api_compat`` import nothing, so torch, JAX and friends are never imported here.
"""

from __future__ import annotations

import threading
import warnings

import array_api_compat as _compat
import numpy as np

__all__ = [
    "SUPPORTED",
    "check_float",
    "check_same_device",
    "cond",
    "device",
    "from_numpy",
    "is_jax",
    "is_numpy",
    "is_strict",
    "is_torch",
    "namespace",
    "same_device",
    "stats_dtype",
    "supported_dtypes",
    "to_numpy",
    "work_dtype",
]

#: Names of the supported data dtypes; ``bfloat16`` only where the library has it (torch, JAX).
SUPPORTED = ("float16", "float32", "float64", "bfloat16")

_SCALARS = (bool, int, float, complex)


def _type_name(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def namespace(*arrays: object):
    """The Array API namespace of ``arrays`` (through ``array_api_compat``).

    Parameters
    ----------
    *arrays : arrays of one library, Python scalars or None
        Python scalars and None are skipped.

    Returns
    -------
    module
        ``array_api_compat.numpy`` / ``array_api_compat.torch`` / ``jax.numpy`` /
        ``array_api_strict`` / ...

    Raises
    ------
    TypeError
        When an argument is not an array, when the arrays come from different libraries
        (e.g. a torch tensor and a NumPy array: convert one of them explicitly), or when no
        argument is an array.
    """
    found: dict[str, tuple[object, str]] = {}
    for a in arrays:
        if a is None or isinstance(a, _SCALARS):
            continue
        if not _compat.is_array_api_obj(a):
            raise TypeError(
                f"expected an array (NumPy, PyTorch, JAX, CuPy, array-api-strict, ...); got an "
                f"object of type {_type_name(a)}"
            )
        xp = _compat.array_namespace(a)
        found.setdefault(xp.__name__, (xp, _type_name(a)))
    if not found:
        raise TypeError("expected at least one array; got only Python scalars or None")
    if len(found) > 1:
        kinds = ", ".join(f"{t} ({name})" for name, (_, t) in found.items())
        raise TypeError(
            f"arrays from different libraries cannot be mixed in one call: got {kinds}. "
            "Convert them to one library first (e.g. torch.asarray(a) or numpy.asarray(t))"
        )
    return next(iter(found.values()))[0]


def is_numpy(xp) -> bool:
    """Whether ``xp`` is NumPy (the module or ``array_api_compat.numpy``)."""
    return _compat.is_numpy_namespace(xp)


def is_torch(xp) -> bool:
    """Whether ``xp`` is PyTorch (the module or ``array_api_compat.torch``)."""
    return _compat.is_torch_namespace(xp)


def is_jax(xp) -> bool:
    """Whether ``xp`` is ``jax.numpy``."""
    return _compat.is_jax_namespace(xp)


def cond(xp, pred, keep, other):
    """``keep()`` if ``pred`` else ``other()``, without a Python branch on data where the
    library traces (``jax.lax.cond`` for JAX; both functions take no arguments and return
    the same structure); for other libraries a Python branch on ``bool(pred)``."""
    if is_jax(xp):
        import jax  # only reached with JAX arrays

        return jax.lax.cond(pred, keep, other)
    return keep() if bool(pred) else other()


def is_strict(xp) -> bool:
    """Whether ``xp`` is ``array_api_strict`` (the reference implementation of the standard)."""
    return _compat.is_array_api_strict_namespace(xp)


def device(x):
    """The device of array ``x`` (``"cpu"`` for NumPy; None for a traced JAX array)."""
    return _compat.device(x)


def same_device(a, b) -> bool:
    """Whether arrays ``a`` and ``b`` live on the same device."""
    return device(a) == device(b)


def check_same_device(name_a: str, a, name_b: str, b) -> None:
    """Raise ``ValueError`` naming both devices unless ``a`` and ``b`` share a device (an
    array whose device is unknown, None, passes).

    Parameters
    ----------
    name_a, name_b : str
        The argument names the message uses.
    a, b : arrays of one namespace
    """
    da, db = device(a), device(b)
    # None is a traced JAX array's device (e.g. under jax.grad): unknown, so not a mismatch
    if da is not None and db is not None and da != db:
        raise ValueError(
            f"{name_a} is on device {da!r} but {name_b} is on device {db!r}; move one of "
            f"them (e.g. {name_b}.to_device({name_a}.device)) so both share a device"
        )


def supported_dtypes(xp) -> tuple:
    """The data dtypes of ``xp`` the kernels accept (see :data:`SUPPORTED`).

    NumPy and array-api-strict have no bfloat16; torch and JAX do.
    """
    names = SUPPORTED if (is_torch(xp) or is_jax(xp)) else SUPPORTED[:3]
    return tuple(getattr(xp, n) for n in names if hasattr(xp, n))


def check_float(x, name: str = "x"):
    """Check that ``x`` has a supported floating dtype and can be read without autograd.

    Parameters
    ----------
    x : array of any namespace
    name : str
        The argument name the messages use.

    Returns
    -------
    x : the same array

    Raises
    ------
    TypeError
        For integer, boolean, complex (or otherwise unsupported) dtypes, naming dtype and
        shape; and for a torch tensor that requires grad: the kernels compute gradients by
        hand, so autograd would silently see no dependence on ``x``.
    """
    xp = namespace(x)
    shape = tuple(x.shape)
    if not any(x.dtype == dt for dt in supported_dtypes(xp)):
        names = ", ".join(str(n) for n in SUPPORTED if hasattr(xp, n))
        raise TypeError(
            f"{name} must have a floating dtype ({names}); got dtype {x.dtype} with shape {shape}"
        )
    if is_torch(xp) and getattr(x, "requires_grad", False):
        raise TypeError(
            f"{name} (shape {shape}, dtype {x.dtype}) is a torch tensor that requires grad. "
            "These kernels compute the forward and backward passes by hand, so autograd "
            "cannot see through them and the gradient would silently be lost. Pass "
            f"{name}.detach() and compute the gradients with batch_norm_backward (or the "
            "layer's backward())"
        )
    return x


def work_dtype(xp, dtype):
    """The precision of the elementwise work for data of ``dtype``.

    float64 stays float64; float16, bfloat16 and float32 are computed in float32.
    """
    return xp.float64 if dtype == xp.float64 else xp.float32


# (namespace name, device, default float dtype) -> statistics dtype. The default float
# dtype is part of the key because JAX switches float64 on and off process-wide (x64).
_STATS: dict = {}
_STATS_LOCK = threading.Lock()


def _default_float(xp, dev):
    try:
        return xp.__array_namespace_info__().default_dtypes(device=dev)["real floating"]
    except Exception:  # a library without the inspection API: one key for all
        return None


def _has_float64(xp, dev) -> bool:
    """Probe whether ``dev`` really computes in float64 (called once per key)."""
    if is_torch(xp) and getattr(dev, "type", None) == "mps":
        return False  # MPS lists float64 but fails on it: do not even try
    try:
        listed = xp.__array_namespace_info__().dtypes(kind="real floating", device=dev)
        if "float64" not in listed:
            return False
    except Exception:  # no inspection API: rely on the probe below
        pass
    try:
        with warnings.catch_warnings():
            # JAX without x64 warns and silently gives float32 for a float64 request
            warnings.simplefilter("ignore")
            probe = xp.asarray(1.0, dtype=xp.float64, device=dev)
            return probe.dtype == xp.float64 and (probe + probe).dtype == xp.float64
    except Exception:  # the device refuses float64
        return False


def stats_dtype(xp, device=None):
    """The dtype statistics and per-feature values are accumulated in on ``device``.

    float64 where the device really supports it, float32 otherwise: torch MPS (never
    tried), JAX without x64 (which silently turns float64 requests into float32),
    array-api-strict's ``Device("no_float64")``. The probe runs once per (namespace,
    device, x64 state) and is cached; thread-safe.

    Parameters
    ----------
    xp : array namespace
    device : device of ``xp``, optional
        None means the namespace's default device (and is what a traced JAX array reports).
    """
    key = (xp.__name__, device, _default_float(xp, device))
    try:
        return _STATS[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable device
        key = (key[0], repr(device), key[2])
        if key in _STATS:
            return _STATS[key]
    with _STATS_LOCK:
        if key not in _STATS:
            _STATS[key] = xp.float64 if _has_float64(xp, device) else xp.float32
        return _STATS[key]


def to_numpy(x) -> np.ndarray:
    """An explicit conversion of array ``x`` to a NumPy array (for saving and converting).

    NumPy input is returned as is; a CPU torch tensor and a CPU JAX array share their
    memory with the result (copy it to keep it past changes of ``x``). torch tensors are
    detached and moved to the CPU first; torch bfloat16, which NumPy lacks, comes back as
    float32 (exactly). array-api-strict arrays are moved to its default device first.
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    xp = namespace(x)
    if is_torch(xp):
        t = x.detach()
        if t.dtype == xp.bfloat16:
            t = t.float()
        return t.cpu().numpy()
    if is_strict(xp):
        x = x.to_device(xp.__array_namespace_info__().default_device())
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError):  # libraries with DLPack only
        return np.from_dlpack(x)


def from_numpy(xp, a, device=None, dtype=None):
    """A copy of NumPy array ``a`` as an array of namespace ``xp`` on ``device``.

    Parameters
    ----------
    xp : array namespace
    a : array_like
    device : device of ``xp``, optional (the namespace's default)
    dtype : dtype of ``xp``, optional
        Give it for float64 data bound for JAX without x64 (which would truncate them with
        a warning) or a device without float64.
    """
    return xp.asarray(a, dtype=dtype, device=device, copy=True)


def is_array(v) -> bool:
    """Whether ``v`` is an array of an Array API library (NumPy included)."""
    return _compat.is_array_api_obj(v)


def namespace_of_module(mod):
    """The (compat) namespace of an array library given as a module (``numpy``, ``torch``,
    ``jax.numpy``, ``array_api_strict``, or a namespace itself)."""
    if mod is None or getattr(mod, "__name__", "") == "numpy":
        return _compat.array_namespace(np.zeros(0))
    if not hasattr(mod, "asarray"):
        raise TypeError(f"expected an array or an array library module; got {mod!r}")
    return _compat.array_namespace(mod.asarray([0.0]))


def same_device_obj(a, b) -> bool:
    """Whether two device objects denote the same device."""
    try:
        return a == b
    except Exception:  # noqa: BLE001 - devices that do not compare
        return repr(a) == repr(b)


def describe(xp, dev) -> str:
    """``'torch arrays on device cuda:0'`` for messages."""
    name = getattr(xp, "__name__", repr(xp)).replace("array_api_compat.", "")
    return f"{name} arrays on device {dev}"


def astype_like(v, like):
    """``v`` in the dtype of ``like`` (same namespace)."""
    return namespace(v).astype(v, like.dtype)
