"""Progress on stderr that fits where it runs: a live bar on a terminal, plain lines elsewhere.

On a terminal (``stream.isatty()``) progress is a tqdm bar redrawn in place with carriage
returns. Anywhere else (a CI log, ``> log 2>&1``, a pipe) carriage-return updates would pile
up as one unreadable line, so progress is written as whole lines instead::

    demo: 30% after 0:45, about 1:45 left

A line is written when the work has crossed the next multiple of ``every_fraction`` (10 %)
and at least ``min_seconds`` (10 s) have passed since the previous line, and always at the
end; so a run writes at most ``1 / every_fraction + 1`` lines, however long it takes, and
never more than one line per ``min_seconds`` before its last. A run so long that 10 % takes
more than ``heartbeat_seconds`` (5 min) also writes a line every ``heartbeat_seconds``, so
that a log watcher sees it is alive.
"""

from __future__ import annotations

import math
import sys
import time

__all__ = ["Progress", "is_terminal"]


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed streams).

    Parameters
    ----------
    stream : file-like

    Returns
    -------
    bool
    """
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def tqdm_class():
    """tqdm's bar class, or None when tqdm is not installed (it comes with the demo extra;
    ``batchnorm warmup`` and ``bench`` run without it)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _clock_text(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) like tqdm's elapsed and remaining times."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of one command on ``stream`` (stderr), driven by ``(done, total)`` calls.

    Parameters
    ----------
    label : str
        Shown before the bar or at the start of each line (the command's name).
    unit : str
        What ``done`` and ``total`` count (shown by the bar's rate).
    stream : file-like, optional
        Where to write (default: ``sys.stderr`` at construction time).
    every_fraction : float
        Plain mode: the fraction of the work between lines (0.1: every 10 %).
    min_seconds : float
        Plain mode: the least time between two lines (the last line excepted).
    heartbeat_seconds : float
        Plain mode: a line after this long without one, whatever the fraction done.
    clock : callable, optional
        Seconds as a float (default :func:`time.monotonic`; tests pass a fake one).

    Attributes
    ----------
    terminal : bool
        Whether the live bar is used (``stream`` is a terminal).
    """

    def __init__(
        self,
        label: str,
        unit: str = "it",
        *,
        stream=None,
        every_fraction: float = 0.1,
        min_seconds: float = 10.0,
        heartbeat_seconds: float = 300.0,
        clock=time.monotonic,
    ):
        if not 0 < every_fraction <= 1:
            raise ValueError(f"every_fraction must lie in (0, 1]; got {every_fraction}")
        if not min_seconds >= 0 or not heartbeat_seconds > 0:
            raise ValueError(
                f"min_seconds must be >= 0 and heartbeat_seconds > 0; got {min_seconds} "
                f"and {heartbeat_seconds}"
            )
        self.label, self.stream = label, sys.stderr if stream is None else stream
        self.every, self.min_seconds, self.heartbeat = (
            every_fraction,
            min_seconds,
            heartbeat_seconds,
        )
        self.clock = clock
        self.terminal = is_terminal(self.stream)
        self.done, self.closed = 0.0, False
        self._start = self._last_line = clock()
        self._next = every_fraction  # the next fraction that earns a line
        self._bar = None
        tqdm = tqdm_class() if self.terminal else None
        self.terminal = tqdm is not None  # without tqdm (the demo extra) a terminal gets lines
        if tqdm is not None:
            # smoothing=0: the rate (and so the ETA) is the average since the start, which
            # is steady from the first seconds instead of following every burst
            self._bar = tqdm(
                total=1.0,
                desc=label,
                unit=unit,
                smoothing=0.0,
                file=self.stream,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
            )

    def __call__(self, done: float, total: float) -> None:
        """Record that ``done`` out of ``total`` units of work are finished.

        Parameters
        ----------
        done, total : float
            Work finished and work in all; ``done`` never goes back (smaller values are
            ignored) and reaching ``total`` ends the progress (see :meth:`close`).
        """
        if self.closed:
            return
        if self._bar is not None:
            if total and self._bar.total != total:
                self._bar.total = total
            if done > self.done:
                self._bar.update(done - self.done)
        self.done = max(self.done, done)
        if not total or not math.isfinite(total) or total <= 0:
            return
        fraction = min(1.0, self.done / total)
        if fraction >= 1.0:
            if self._bar is None:
                self._line(1.0)
            self.close()
            return
        if self._bar is not None:
            return
        now = self.clock()
        quiet_for = now - self._last_line
        if (fraction >= self._next and quiet_for >= self.min_seconds) or (
            quiet_for >= self.heartbeat
        ):
            self._line(fraction)
            # the next line waits for the next multiple of every_fraction above this one
            self._next = (math.floor(fraction / self.every + 1e-9) + 1) * self.every

    def _line(self, fraction: float) -> None:
        now = self.clock()
        elapsed = now - self._start
        text = f"{self.label}: {100 * fraction:.0f}% after {_clock_text(elapsed)}"
        if 0 < fraction < 1:
            text += f", about {_clock_text(elapsed * (1 - fraction) / fraction)} left"
        print(text, file=self.stream, flush=True)
        self._last_line = now

    def close(self) -> None:
        """End the progress: the bar ends its line (so a message after it starts on its own);
        plain mode writes nothing more. Safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
