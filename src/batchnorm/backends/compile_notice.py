"""One line on stderr when a call is about to wait for numba to compile the kernels.

numba compiles a kernel on its first call for a new dtype and layout and keeps the machine
code in its on-disk cache; with an empty (or stale) cache a first training step waits for
several seconds. numba broadcasts a ``"numba:compile"`` event when it really compiles, never
when it loads the machine code from its cache, so listening for that event says exactly when
the wait happens, and says nothing when the cache is warm.

:func:`install` (called once when the compiled backend is first loaded, so the NumPy layers,
the PyTorch modules and the JAX functions all reach it) registers the listener; the first
compilation in the process then writes :data:`NOTICE` on stderr, once per process, before
the compilation starts. :func:`set_handler` replaces the printing (the ``batchnorm`` command
line routes the line through its progress bar, or counts compilations, with it).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

__all__ = ["NOTICE", "install", "set_handler", "shown"]

NOTICE = (
    "batchnorm: compiling the numba kernels for this kind of call, a one-off wait of about "
    "5-20 s (cached on disk afterwards; `batchnorm warmup` compiles them ahead of time)"
)


def _print() -> None:
    """The default handler: :data:`NOTICE` on stderr, flushed."""
    try:
        print(NOTICE, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):  # a closed or missing stderr says nothing
        pass


class _State:
    """Whether the listener is registered, whether the notice was given, and by whom."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.installed = False
        self.shown = False
        self.handler: Callable[[], None] = _print


_STATE = _State()


def _on_compile() -> None:
    """The first compilation of the process calls the handler; later ones do nothing."""
    with _STATE.lock:
        if _STATE.shown:
            return
        _STATE.shown = True
        handler = _STATE.handler
    handler()


def install() -> bool:
    """Register the listener for numba's compile events (once per process; idempotent).

    Returns
    -------
    bool
        Whether a listener is registered (False when numba is not importable).
    """
    with _STATE.lock:
        if _STATE.installed:
            return True
        try:
            from numba.core import event
        except ImportError:
            return False

        class _Listener(event.Listener):
            def on_start(self, ev) -> None:
                _on_compile()

            def on_end(self, ev) -> None:
                pass

        event.register("numba:compile", _Listener())
        _STATE.installed = True
        return True


def set_handler(handler: Callable[[], None] | None) -> Callable[[], None]:
    """Call ``handler()`` instead of printing :data:`NOTICE` at the first compilation.

    Parameters
    ----------
    handler : callable() or None
        Called once, in the compiling thread, before the first compilation of the process;
        None restores the default (the line on stderr).

    Returns
    -------
    callable()
        The handler it replaces.

    Raises
    ------
    TypeError
        When ``handler`` is neither callable nor None (the handler in place is kept).
    """
    if handler is not None and not callable(handler):
        raise TypeError(f"handler must be callable or None; got {type(handler).__name__}")
    with _STATE.lock:
        previous = _STATE.handler
        _STATE.handler = _print if handler is None else handler
    return previous


def shown() -> bool:
    """Whether the first compilation of this process has happened (and the notice was given)."""
    return _STATE.shown
