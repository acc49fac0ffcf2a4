"""Compiling the numba kernels ahead of time (``batchnorm warmup``) and saying when they compile.

numba compiles each kernel on its first call and keeps the machine code in its on-disk cache;
with an empty cache the first call of a training step takes several seconds. The library
itself says so on stderr, once per process (:mod:`batchnorm.backends.compile_notice`); the
command line routes that line through its progress bars instead:

* :func:`watch_compiles` calls a function once when numba starts compiling inside a block
  (numba's event API reports a compilation, never a load from the cache);
* :func:`notices_through` sends the library's notice to a function for the length of a block
  (the commands print :data:`COMPILE_NOTICE` with ``tqdm.write`` there);
* :func:`announce_compiles` does the same for the rest of a worker process's life;
* :func:`warmup` calls the public kernels (:func:`batchnorm.batch_norm_train`,
  :func:`batchnorm.batch_norm_eval`, :func:`batchnorm.batch_norm_backward`) with
  ``backend="numba"`` on small and large arrays (:func:`warmup_cases`) of every float dtype
  and the common layouts, so that the serial kernels (small arrays) and the parallel ones
  (above :data:`batchnorm.backends.AUTO_NUMBA_MIN_SIZE` elements) are all compiled and cached.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from batchnorm.backends import compile_notice

__all__ = [
    "COMPILE_NOTICE",
    "WarmupCase",
    "announce_compiles",
    "notices_through",
    "warmup",
    "warmup_cases",
    "watch_compiles",
]

COMPILE_NOTICE = compile_notice.NOTICE
DTYPES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class WarmupCase:
    """One array the kernels are compiled for: a layout name, a shape and the feature axis."""

    layout: str
    shape: tuple[int, ...]
    axis: int

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape))


def warmup_cases(threshold: int | None = None) -> list[WarmupCase]:
    """The layouts compiled by :func:`warmup`: each below and above ``threshold`` elements.

    The small arrays take the serial kernels (one pass, no thread launch), the large ones the
    parallel kernels. Layouts: NCHW (fused channel blocks; one channel, which takes the
    two-pass kernels), ``(N, D)``, ``(N, C, L)`` with a short ``L`` and channels-last NHWC.

    Parameters
    ----------
    threshold : int, optional
        Element count that separates the two (default
        :data:`batchnorm.backends.AUTO_NUMBA_MIN_SIZE`).

    Returns
    -------
    list of WarmupCase
    """
    if threshold is None:
        from batchnorm.backends import AUTO_NUMBA_MIN_SIZE as threshold
    small = [
        WarmupCase("NCHW", (4, 4, 8, 8), 1),
        WarmupCase("(N, D)", (60, 100), 1),
        WarmupCase("(N, C, L)", (8, 16, 4), 1),
        WarmupCase("NHWC", (4, 4, 4, 16), -1),
    ]
    large = []
    for case in small:
        shape = list(case.shape)
        while int(np.prod(shape)) < threshold:  # grow the batch axis past the threshold
            shape[0] *= 2
        large.append(WarmupCase(case.layout, tuple(shape), case.axis))
    n = max(1, -(-threshold // (32 * 32)))
    large.append(WarmupCase("NCHW C=1", (n, 1, 32, 32), 1))
    return small + large


class _Counter:
    """Counts the compilations numba starts and calls ``callback`` at the first."""

    def __init__(self, callback: Callable[[], None]):
        self.callback = callback
        self.count = 0

    def started(self) -> None:
        """One more compilation starts."""
        self.count += 1
        if self.count == 1:
            self.callback()


def _listener(counter: _Counter):
    """A numba listener for ``"numba:compile"`` events that tells ``counter``."""
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, ev) -> None:
            counter.started()

        def on_end(self, ev) -> None:
            pass

    return Listener()


@contextlib.contextmanager
def watch_compiles(callback: Callable[[], None]) -> Iterator[_Counter | None]:
    """Call ``callback()`` once, when numba first starts compiling inside the block.

    numba broadcasts a ``"numba:compile"`` event when a dispatcher compiles, never when it
    loads the machine code from its on-disk cache, so this says exactly when the slow first
    call happens.

    Parameters
    ----------
    callback : callable()
        Called in the compiling thread, before the compilation; at most once.

    Yields
    ------
    object or None
        The counter (its ``count`` is the number of compilations started so far), or None
        when numba is not installed (nothing is watched).
    """
    try:
        from numba.core import event
    except ImportError:
        yield None
        return
    counter = _Counter(callback)
    with event.install_listener("numba:compile", _listener(counter)):
        yield counter


@contextlib.contextmanager
def notices_through(callback: Callable[[], None]) -> Iterator[_Counter | None]:
    """Inside the block, the library's compile notice calls ``callback()`` instead of printing.

    The library gives its notice once per process; a command that runs in a process where
    something compiled already still wants to say so when it compiles, so the block also
    watches compilations itself (:func:`watch_compiles`). ``callback`` is called at most once
    by the watch, and possibly once more by the library: it should itself say things once.

    Parameters
    ----------
    callback : callable()
        Called in the compiling thread, before the first compilation inside the block.

    Yields
    ------
    object or None
        As :func:`watch_compiles`.
    """
    previous = compile_notice.set_handler(callback)
    try:
        with watch_compiles(callback) as counter:
            yield counter
    finally:
        compile_notice.set_handler(previous)


def announce_compiles(callback: Callable[[], None]) -> bool:
    """Send the library's compile notice to ``callback`` for the rest of the process's life.

    Used by the demo's worker processes, which report to the main process instead of
    printing (the main process prints the line above its progress bar).

    Parameters
    ----------
    callback : callable()
        Called once, at the first compilation numba starts in this process.

    Returns
    -------
    bool
        Whether compilations are watched (False when numba is not installed).
    """
    compile_notice.set_handler(callback)
    return compile_notice.install()


def warmup(
    dtypes: tuple[str, ...] = DTYPES,
    cases: list[WarmupCase] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Compile (or load from numba's cache) every kernel for these dtypes and layouts.

    For each dtype and case: the training forward with and without ``gamma``/``beta``, the
    evaluation forward with the batch's statistics, and the backward of both forwards, all
    with ``backend="numba"``.

    Parameters
    ----------
    dtypes : tuple of str
        Float dtypes (default float16, float32 and float64).
    cases : list of WarmupCase, optional
        Default :func:`warmup_cases`.
    progress : callable(done, total), optional
        Called after each (dtype, case).

    Returns
    -------
    dict
        ``seconds`` (wall time), ``calls`` (kernel calls made), ``compiled`` (numba
        compilations started; 0 when everything came from the cache) and ``cases``.

    Raises
    ------
    ImportError
        When numba is not installed.
    """
    import batchnorm as bn
    from batchnorm.backends import numba_available

    if not numba_available():
        raise ImportError("the numba kernels need numba: pip install numba")
    cases = warmup_cases() if cases is None else cases
    rng = np.random.default_rng(0)
    total, done, calls = len(dtypes) * len(cases), 0, 0
    start = time.perf_counter()
    with watch_compiles(lambda: None) as seen:
        for dtype in dtypes:
            for case in cases:
                x = (rng.standard_normal(case.shape) * 2 + 3).astype(dtype)
                c = case.shape[case.axis]
                gamma, beta = np.ones(c), np.zeros(c)
                dy = rng.standard_normal(case.shape).astype(dtype)
                for g, b in ((gamma, beta), (None, None)):
                    _, cache = bn.batch_norm_train(x, g, b, axis=case.axis, backend="numba")
                    bn.batch_norm_eval(
                        x, g, b, cache.mean, cache.var, axis=case.axis, backend="numba"
                    )
                    bn.batch_norm_backward(dy, cache, backend="numba")
                    calls += 3
                done += 1
                if progress is not None:
                    progress(done, total)
    return {
        "seconds": time.perf_counter() - start,
        "calls": calls,
        "compiled": 0 if seen is None else seen.count,
        "cases": [
            {"dtype": d, "layout": c.layout, "shape": list(c.shape), "axis": c.axis}
            for d in dtypes
            for c in cases
        ],
    }
