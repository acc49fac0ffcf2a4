"""``batchnorm warmup``: compile the numba kernels once (:mod:`.compiles`), and the compile
watching that the other commands use to say when a kernel compiles.

:mod:`.command` holds the subcommand's arguments and body.
"""

from .compiles import (
    COMPILE_NOTICE,
    DTYPES,
    WarmupCase,
    announce_compiles,
    notices_through,
    warmup,
    warmup_cases,
    watch_compiles,
)

__all__ = [
    "COMPILE_NOTICE",
    "DTYPES",
    "WarmupCase",
    "announce_compiles",
    "notices_through",
    "warmup",
    "warmup_cases",
    "watch_compiles",
]
