"""Stopping on SIGINT and SIGTERM: one handler for both, a stop that cannot be lost.

Python's default SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread happens
to be, and two things can go wrong with that (both seen in the Ctrl-C test, a few runs in a
hundred, when the signal arrived while the demo was starting its workers):

- the exception is raised inside a weakref callback or a ``__del__`` (importlib's module locks
  have one), where Python prints "Exception ignored" and drops it: the Ctrl-C is lost and
  the demo runs to the end;
- even after the command caught the interrupt, printed its line and returned 130, the
  interpreter sent itself SIGINT at exit (status -2; seen under strace). CPython keeps a
  process-wide "unhandled KeyboardInterrupt" flag that some C paths set on the way and
  nothing clears; an exception of another class never sets it.

:func:`stop_signals_raise` therefore installs its own handler for both signals. It records
the first signal and raises :class:`Stopped` (a ``BaseException`` that is not
``KeyboardInterrupt``, so the process-wide flag is never set); a raise that something swallowed
is raised again by the next :func:`check` (the demo's main loops call it at least every 0.2 s)
and, when Python dropped it in a weakref callback or a ``__del__`` (where it would print
"Exception ignored" and a traceback), by the signal sent again 50 ms later, without the
traceback.
Later signals are recorded only, so a second Ctrl-C cannot interrupt the clean-up of the first.
Inside :func:`deferred` the handler only records; the stop is raised when the block ends.
For the console script, a signal during the interpreter's shut-down is ignored (see
``then_ignore``): the exit status stays the command's, never Python's -2 or a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = ["STOP_SIGNALS", "Stopped", "check", "deferred", "stop_received", "stop_signals_raise"]

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class _State:
    """What the handler knows (main thread only): one instance, :data:`_state`."""

    received: int | None = None  # the first stop signal since stop_signals_raise began
    depth = 0  # how many deferred() blocks the main thread is in
    swallowed = False  # Python dropped the last raise (see _unraisable)
    block = 0  # counts the blocks, so that a late retry of an ended one does nothing


_state = _State()
RETRY_S = 0.05  # how soon a dropped raise is tried again


class Stopped(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrived (see :func:`stop_signals_raise`).

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    swallows it; the clean-up code on the way (worker processes, partial outputs) runs.

    Parameters
    ----------
    signum : int
        The signal received.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        """The signal's name (``"SIGINT"``, ``"SIGTERM"``)."""
        return signal.Signals(self.signum).name


def _handler(signum, frame):
    if _state.received is not None and not _state.swallowed:
        return  # already stopping: a second Ctrl-C must not break the clean-up
    if _state.received is None:
        _state.received = signum
    _state.swallowed = False
    if _state.depth == 0:
        raise Stopped(_state.received)


def _retry(block: int, signum: int) -> None:
    """Send the stop signal again, if the raise is still dropped and the block still open."""
    if _state.swallowed and _state.block == block:
        os.kill(os.getpid(), signum)


def _unraisable(hook, args) -> None:
    """``sys.unraisablehook`` inside the block: a :class:`Stopped` raised where Python cannot
    raise (a weakref callback, a ``__del__``; importlib has one) is not printed as "Exception
    ignored" with a traceback; the signal is sent again in :data:`RETRY_S` seconds, to be
    raised where the main thread then is. Anything else goes to the previous hook."""
    if isinstance(args.exc_value, Stopped):
        _state.swallowed = True
        timer = threading.Timer(RETRY_S, _retry, (_state.block, args.exc_value.signum))
        timer.daemon = True
        timer.start()
        return
    hook(args)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_signals_raise(*, then_ignore: bool = False) -> Iterator[None]:
    """Inside the block, SIGINT and SIGTERM raise :class:`Stopped` (main thread only; elsewhere
    the block changes nothing). A signal ignored on entry (``SIG_IGN``) stays ignored, as
    Python itself leaves an ignored SIGINT alone.

    Parameters
    ----------
    then_ignore : bool
        For a process that ends right after the block (the console script): leave both
        signals ignored instead of restoring the previous handlers. The command has then
        finished or stopped, and only the interpreter's shut-down is left, where Python's
        handlers would turn a late signal (a second Ctrl-C after the first was reported) into
        a traceback from an ``atexit`` function or a death by the signal (status -2 or -15);
        ignored, it leaves the command's own exit status.
    """
    if not _main_thread():
        yield
        return
    before = {}
    try:
        for s in STOP_SIGNALS:
            # a signal ignored on entry stays ignored (a shell starts a job put in the
            # background with `&` from a script that way, so that Ctrl-C leaves it running)
            if signal.getsignal(s) != signal.SIG_IGN:
                before[s] = signal.signal(s, _handler)
    except (ValueError, OSError):  # pragma: no cover - no such signal here
        pass
    _state.received, _state.swallowed, _state.block = None, False, _state.block + 1
    hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_unraisable, hook)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, signal.SIG_IGN if then_ignore else h)
        sys.unraisablehook = hook
        _state.received, _state.swallowed, _state.block = None, False, _state.block + 1


def stop_received() -> int | None:
    """The first stop signal received inside :func:`stop_signals_raise`, or None."""
    return _state.received


def check() -> None:
    """Raise :class:`Stopped` if a stop signal arrived (its first raise may have been lost)."""
    if _state.received is not None and _state.depth == 0:
        raise Stopped(_state.received)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop until the end of the block, then raise it.

    In the main thread the handler only records a signal inside the block, and the signals
    are blocked at the kernel level too (``pthread_sigmask``), so that processes started
    inside the block begin with them blocked. Elsewhere (other threads, no
    ``pthread_sigmask``) the block changes nothing.
    """
    mask = getattr(signal, "pthread_sigmask", None)
    if not _main_thread():
        yield
        return
    before = mask(signal.SIG_BLOCK, STOP_SIGNALS) if mask is not None else None
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if mask is not None:
            mask(signal.SIG_SETMASK, before)  # a pending signal arrives here
    check()
