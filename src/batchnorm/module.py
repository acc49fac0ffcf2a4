"""The one module interface shared by the norm layers and :mod:`batchnorm.nn`.

Every module has

* ``forward(x, *, training=None, update_stats=True) -> y`` (also ``module(x)``);
* ``backward(dy) -> dx``, which uses what the last forward cached and sets the parameter
  gradients;
* ``parameters()`` / ``gradients()``: dicts of arrays by name (the arrays themselves, so an
  optimizer updates them in place);
* ``train(mode=True)`` / ``eval()``, returning the module.

``training=None`` means "the module's own mode"; ``update_stats=False`` runs a training-mode
forward that changes no running statistics (for probing activations or recalibration).
"""

from __future__ import annotations

import numpy as np

__all__ = ["Module", "NoForwardError"]


class NoForwardError(ValueError, RuntimeError):
    """``backward()`` was called before any forward pass.

    (After a rejected forward, ``backward()`` uses the last successful forward's cache.)

    A :class:`ValueError` (the library's errors are ``TypeError`` or ``ValueError``) and, for
    code written against earlier versions, a :class:`RuntimeError`.
    """


_MISSING = object()


class Module:
    """Base class of every module: parameter-free, stateless defaults."""

    training: bool = True
    #: The attributes in which a forward leaves what its backward needs. Tools that run
    #: forwards of their own (:func:`batchnorm.recalibrate`) save and restore them, so the
    #: caller's pending backward is unaffected.
    forward_state: tuple[str, ...] = ()

    def save_forward_state(self) -> dict:
        """What the last forward left for :meth:`backward` (see :attr:`forward_state`)."""
        return {k: self.__dict__.get(k, _MISSING) for k in self.forward_state}

    def restore_forward_state(self, saved: dict) -> None:
        """Put back what :meth:`save_forward_state` returned."""
        for k, v in saved.items():
            if v is _MISSING:
                self.__dict__.pop(k, None)
            else:
                self.__dict__[k] = v

    def forward(self, x: np.ndarray, *, training: bool | None = None, update_stats: bool = True):
        """Compute the output for ``x`` (subclasses implement this)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward()")

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient with respect to the last forward input (subclasses implement this)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement backward()")

    def __call__(self, x: np.ndarray, **kwargs) -> np.ndarray:
        return self.forward(x, **kwargs)

    def parameters(self) -> dict[str, np.ndarray]:
        """Learnable parameters by name (none by default)."""
        return {}

    def gradients(self) -> dict[str, np.ndarray | None]:
        """Gradients of :meth:`parameters` from the last backward pass (none by default)."""
        return {}

    def train(self, mode: bool = True) -> Module:
        """Switch to training mode (evaluation mode with ``mode=False``); return self."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be True or False; got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self) -> Module:
        """Switch to evaluation mode; return self."""
        return self.train(False)

    def _mode(self, training: bool | None) -> bool:
        """The mode of one call: the override when given, else the module's own."""
        if training is None:
            return self.training
        if not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be True, False or None; got {training!r}")
        return bool(training)

    def _need_cache(self, cache):
        """Return ``cache``, or raise :class:`NoForwardError` when no forward has run."""
        if cache is None:
            raise NoForwardError(f"{type(self).__name__}.backward() called before any forward pass")
        return cache
