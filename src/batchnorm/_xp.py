"""Array namespaces (provisional: replaced by the full dtype policy module)."""

from __future__ import annotations

import numpy as np


def is_array(v) -> bool:
    import array_api_compat

    return array_api_compat.is_array_api_obj(v)


def namespace(*arrays):
    import array_api_compat

    return array_api_compat.array_namespace(*[a for a in arrays if a is not None])


def namespace_of_module(mod):
    import array_api_compat

    if mod is np or getattr(mod, "__name__", "") == "numpy":
        return array_api_compat.array_namespace(np.zeros(0))
    return array_api_compat.array_namespace(mod.zeros(0))


def is_numpy(xp) -> bool:
    import array_api_compat

    return xp is None or array_api_compat.is_numpy_namespace(xp)


def device(x):
    import array_api_compat

    return array_api_compat.device(x)


def same_device_obj(a, b) -> bool:
    return str(a) == str(b)


def describe(xp, dev) -> str:
    return f"{getattr(xp, '__name__', xp)} arrays on device {dev}"


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def from_numpy(xp, a, dev, dtype=None):
    return xp.asarray(a, device=dev)


def astype_like(v, like):
    return namespace(v).astype(v, like.dtype)
