"""Where a layer's state lives: one array namespace and one device per layer.

NumPy by default; a layer that has not run yet moves its state to the namespace and device
of its first batch (or explicitly with :meth:`ArrayPlacement.to`); afterwards an input of
another library or device is refused with an error naming both. State dicts and files are
always NumPy (an explicit conversion); loading stores into the layer's namespace.
"""

from __future__ import annotations

import numpy as np

from .. import _xp


class ArrayPlacement:
    """Mixin: the namespace (``_xp``, None for NumPy) and device of a layer's arrays."""

    def host(self, name: str) -> np.ndarray | None:
        """A NumPy copy of the layer's array ``name`` ("gamma", "running_mean", ...), in the
        layer's dtype, wherever the layer keeps it (None for an absent array)."""
        v = getattr(self, name)
        return None if v is None else self._host(v)

    def _host(self, a):
        """A NumPy copy of one of the layer's arrays (explicit, for state and files)."""
        return a.copy() if isinstance(a, np.ndarray) else np.array(_xp.to_numpy(a))

    @staticmethod
    def _host_any(v):
        """A state value as NumPy when it is an array of another library (explicit)."""
        if v is None or isinstance(v, (np.ndarray, np.generic, int, float, bool)):
            return v
        if _xp.is_array(v):
            return np.asarray(_xp.to_numpy(v))
        return v

    def _store(self, key: str, value: np.ndarray) -> None:
        """Store a checked NumPy value (the layer's dtype) as the layer's array ``key``."""
        if self._xp is None:
            getattr(self, key)[...] = value
        else:
            target = self._target_dtype(self._xp, self._device)
            object.__setattr__(self, key, _xp.from_numpy(self._xp, value, self._device, target))

    def to(self, like: object, device: object = None) -> ArrayPlacement:
        """Move the state to the namespace (and device) of the array ``like``, or to a
        namespace module with ``device``; returns self."""
        if _xp.is_array(like):
            xp, dev = _xp.namespace(like), _xp.device(like)
        else:
            xp, dev = _xp.namespace_of_module(like), device
        with self._lock:
            names = ["gamma", "beta", *self.running_stat_names, "dgamma", "dbeta"]
            target = None if _xp.is_numpy(xp) else self._target_dtype(xp, dev)
            for key in names:
                v = getattr(self, key, None)
                if v is not None:
                    host = self._host(v).astype(self.dtype, copy=False)
                    object.__setattr__(
                        self,
                        key,
                        host if target is None else _xp.from_numpy(xp, host, dev, target),
                    )
            self._xp = None if _xp.is_numpy(xp) else xp
            self._device = None if _xp.is_numpy(xp) else dev
            self._placed = True
            self._cache = None
        return self

    def _fresh(self) -> bool:
        """Whether the layer has never run nor been loaded (then its state may still move
        to the library of its first batch)."""
        return (
            self._cache is None
            and self.num_batches_tracked == 0
            and self.last_batch_stats is None
            and self.dgamma is None
        )

    def _settle_placement(self, ok: bool) -> None:
        """After a forward: keep the placement it made (``ok``) or undo it exactly."""
        d = self.__dict__
        undo = d.pop("_placing", None)
        if ok and undo is not None:
            d["_placed"] = True  # a layer that moved stays where it is
        elif undo is not None:
            d.update(undo)
            d["_xp"] = d["_device"] = None
            d["_placed"] = False

    def _target_dtype(self, xp, dev):
        """The layer's dtype in ``xp`` (float32 where the device has no float64)."""
        if self.dtype == np.float64 and _xp.stats_dtype(xp, dev) != xp.float64:
            return xp.float32
        return getattr(xp, self.dtype.name)

    def _check_namespace(self, x) -> None:
        """``x`` must live in the layer's namespace and on its device (a fresh layer moves)."""
        if isinstance(x, np.ndarray):
            if self._xp is None:
                return
            raise TypeError(
                f"{type(self).__name__} keeps its state in {_xp.describe(self._xp, self._device)}"
                f" but x is a NumPy array of shape {x.shape}; convert x, or call layer.to(x)"
            )
        xp, dev = _xp.namespace(x), _xp.device(x)
        if self._xp is None and not self._placed and self._fresh():
            # a layer that has not run takes the first batch's namespace and device; if this
            # call is then refused, the forward moves it back (see _undo_placement)
            keys = ("gamma", "beta", *self.running_stat_names, "dgamma", "dbeta", "_cache")
            self.__dict__["_placing"] = {k: self.__dict__.get(k) for k in keys}
            self.to(x)
            return
        if self._xp is None or xp is not self._xp or not _xp.same_device_obj(dev, self._device):
            where = "NumPy" if self._xp is None else _xp.describe(self._xp, self._device)
            raise TypeError(
                f"{type(self).__name__} keeps its state in {where} but x is in "
                f"{_xp.describe(xp, dev)} (shape {tuple(x.shape)}); move x there, or move the "
                "layer with layer.to(x)"
            )
