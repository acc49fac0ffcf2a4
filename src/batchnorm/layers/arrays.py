"""Where a layer's state lives: one array namespace and one device per layer.

NumPy by default; a layer that has not run yet moves its state to the namespace and device
of its first batch (or explicitly with ``layer.to``); afterwards an input of another library
or device is refused with an error naming both. State dicts and files are always NumPy (an
explicit conversion); loading stores into the layer's namespace.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _xp

__all__ = ["Placement"]


class Placement:
    """The namespace (``xp``, None for NumPy) and device of one layer's arrays.

    Attributes
    ----------
    xp : module or None
    device : object
    placed : bool
        True once the namespace and device are settled (the layer ran, loaded or moved).
    undo : dict or None
        While a forward that moved a fresh layer runs: the arrays to put back if it fails.
    """

    def __init__(self) -> None:
        self.xp: Any = None
        self.device: Any = None
        self.placed = False
        self.undo: dict | None = None

    def __getstate__(self) -> dict:  # modules and device handles are not copied
        return {"placed": self.placed, "moved": self.xp is not None}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.placed = state["placed"]
        self.moved = state["moved"]  # the layer reads xp and device off its arrays

    def adopt(self, array: object) -> None:
        """Take the namespace and device of ``array`` (after a copy of a moved layer)."""
        self.xp, self.device = _xp.namespace(array), _xp.device(array)

    def describe(self) -> str:
        """Where the state lives, in words."""
        return "NumPy" if self.xp is None else _xp.describe(self.xp, self.device)

    @staticmethod
    def host(a: object) -> np.ndarray:
        """A NumPy copy of one of the layer's arrays (explicit, for state and files)."""
        return a.copy() if isinstance(a, np.ndarray) else np.array(_xp.to_numpy(a))

    @staticmethod
    def host_any(v: object) -> object:
        """A state value as NumPy when it is an array of another library (explicit)."""
        if v is None or isinstance(v, (np.ndarray, np.generic, int, float, bool)):
            return v
        if _xp.is_array(v):
            return np.asarray(_xp.to_numpy(v))
        return v

    def target_dtype(self, dtype: np.dtype, xp: Any = None, dev: Any = None) -> Any:
        """``dtype`` in ``xp`` (default: the layer's), float32 where the device lacks float64."""
        xp = self.xp if xp is None else xp
        dev = self.device if xp is self.xp else dev
        if dtype == np.float64 and _xp.stats_dtype(xp, dev) != xp.float64:
            return xp.float32
        return getattr(xp, dtype.name)

    def from_host(self, value: np.ndarray, dtype: np.dtype) -> object:
        """A checked NumPy value as an array of the layer's namespace and device."""
        if self.xp is None:
            return value
        return _xp.from_numpy(self.xp, value, self.device, self.target_dtype(dtype))

    def move(self, arrays: dict, like: object, device: object, dtype: np.dtype) -> dict:
        """``arrays`` (None entries kept) moved to ``like``'s namespace and device (or the
        namespace module ``like`` and ``device``); the placement follows."""
        if _xp.is_array(like):
            xp, dev = _xp.namespace(like), _xp.device(like)
        else:
            xp, dev = _xp.namespace_of_module(like), device
        numpy = _xp.is_numpy(xp)
        target = None if numpy else self.target_dtype(dtype, xp, dev)
        out = {}
        for key, v in arrays.items():
            if v is not None:
                h = self.host(v).astype(dtype, copy=False)
                v = h if target is None else _xp.from_numpy(xp, h, dev, target)
            out[key] = v
        self.xp, self.device = (None, None) if numpy else (xp, dev)
        self.placed = True
        return out

    def settle(self, ok: bool, state: Any) -> None:
        """After a forward: keep the placement it made (``ok``) or put ``state``'s arrays
        back exactly as :attr:`undo` holds them."""
        undo, self.undo = self.undo, None
        if undo is None or ok:
            return
        for key, value in undo.items():
            setattr(state, key, value)
        self.xp = self.device = None
        self.placed = False

    def check(self, x: object, owner: str, fresh: bool) -> bool:
        """Whether ``x`` is in the layer's namespace and on its device; False when the layer
        is fresh and should move to ``x`` first; TypeError naming both otherwise."""
        if isinstance(x, np.ndarray):
            if self.xp is None:
                return True
            raise TypeError(
                f"{owner} keeps its state in {self.describe()} but x is a NumPy array of shape "
                f"{x.shape}; convert x, or call layer.to(x)"
            )
        xp, dev = _xp.namespace(x), _xp.device(x)
        if self.xp is None and not self.placed and fresh:
            return False
        if self.xp is None or xp is not self.xp or not _xp.same_device_obj(dev, self.device):
            raise TypeError(
                f"{owner} keeps its state in {self.describe()} but x is in "
                f"{_xp.describe(xp, dev)} (shape {tuple(x.shape)}); move x there, or move the "
                "layer with layer.to(x)"
            )
        return True
