"""The Python side of the native extension's output pool (``csrc/pool.h``): its limit and
counters (:mod:`.native` re-exports :func:`pool_stats`, :func:`set_pool_limit` and
:func:`empty_cache`; docs/guide/torch.md, "The output pool").

Once the extension is loaded, large outputs (from 1 MiB) of the native node and of the
Python route (:func:`._cpu.new_like`) come from freed blocks kept by the pool, instead of
new memory from torch's allocator paid for again in page faults."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["DEFAULT_POOL_BYTES", "POOL_ENV", "attach", "configured", "empty_cache", "env_limit",
           "pool_stats", "set_pool_limit"]  # fmt: skip

#: The environment variable that sets the output pool's limit in MiB (``0``: off).
POOL_ENV = "BATCHNORM_TORCH_POOL_MB"


#: The pool's default limit: 1 GiB, or a sixteenth of the machine's memory if less.
DEFAULT_POOL_BYTES = 1 << 30
_MAX_LIMIT = 1 << 62
_LIMIT = None  # the limit set by set_pool_limit (None: the environment's or the default)


def env_limit() -> int:
    """The pool's limit in bytes: ``BATCHNORM_TORCH_POOL_MB`` (MiB, ``0``: off) or the
    default (:data:`DEFAULT_POOL_BYTES`, at most a sixteenth of the physical memory)."""
    value = os.environ.get(POOL_ENV)
    if value is not None:
        try:
            mib = float(value)
        except ValueError:
            mib = float("nan")
        if not (mib >= 0 and mib * (1 << 20) <= _MAX_LIMIT):  # (NaN fails too)
            raise ValueError(f"{POOL_ENV} must be a number of MiB >= 0, got {value!r}")
        return int(mib * (1 << 20))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * DEFAULT_POOL_BYTES
    return min(DEFAULT_POOL_BYTES, ram // 16)


def pool_stats() -> dict:
    """The output pool's counters (all zero while the extension is not loaded):
    ``cached_bytes`` and ``cached_blocks`` (freed outputs kept for reuse), ``live_blocks``
    (pooled outputs alive now), ``hits`` and ``misses`` (allocations served from the pool
    or from the system), ``limit`` (bytes; 0: off)."""
    keys = ("cached_bytes", "cached_blocks", "live_blocks", "hits", "misses", "limit")
    ext = _ext()
    return dict(zip(keys, (0,) * 6 if ext is None else ext.pool_stats(), strict=True))


def set_pool_limit(nbytes: int) -> int:
    """Set the output pool's limit in bytes (``0`` turns it off; cached blocks beyond the
    new limit are freed now); returns the previous limit. Where the extension is not
    loaded yet, the limit is kept for when it is (the route is not turned on)."""
    global _LIMIT
    if (
        isinstance(nbytes, bool)
        or not isinstance(nbytes, int | np.integer)
        or not 0 <= nbytes <= _MAX_LIMIT
    ):
        raise ValueError(
            f"the pool limit must be an int number of bytes in [0, 2**62], got {nbytes!r}"
        )
    ext = _ext()
    if ext is None:
        old = configured()
        _LIMIT = int(nbytes)
        return old
    _LIMIT = int(nbytes)
    return int(ext.set_pool_limit(_LIMIT))


def empty_cache() -> int:
    """Free the output pool's cached blocks (as ``torch.cuda.empty_cache`` for CUDA's
    caching allocator); returns the bytes freed (0 while the extension is not loaded)."""
    ext = _ext()
    return 0 if ext is None else int(ext.empty_cache())


def configured() -> int:
    """The limit the extension gets when it loads: :func:`set_pool_limit`'s, else
    :func:`env_limit`."""
    return env_limit() if _LIMIT is None else _LIMIT


def attach(ext) -> None:
    """Give the pool functions the loaded extension module and set its limit
    (:func:`configured`); called by :mod:`.native` when it loads the extension."""
    global _EXT
    ext.set_pool_limit(configured())
    _EXT = ext


_EXT = None  # the loaded extension module (attach)


def _ext():
    """The loaded extension module, or None."""
    return _EXT
