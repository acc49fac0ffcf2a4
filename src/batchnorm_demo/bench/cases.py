"""The benchmark's cases: the large arrays (shape, layout, dtype), the small batches, and
the goals of issue 11 for the numba backend's ratio to a plain copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CASES", "PASSES", "SMALL_CASES", "Case", "goal"]

PASSES = ("train", "eval", "backward")


@dataclass(frozen=True)
class Case:
    """One benchmarked array: a name, shape, feature axis and dtype; ``memory`` the order
    of its axes in memory, outermost first (None: C order; ``(0, 3, 1, 2)`` for an NHWC
    view of NCHW memory), and ``twin`` the name of the case holding the same bytes in NCHW
    order, whose numba time the table divides by (None: no such column)."""

    name: str
    shape: tuple[int, ...]
    axis: int
    dtype: str = "float32"
    memory: tuple[int, ...] | None = None
    twin: str | None = None

    @property
    def nbytes(self) -> int:
        """Size of the array in bytes."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def arrange(self, a: np.ndarray) -> np.ndarray:
        """``a`` (of shape ``shape``) laid out in memory as this case says (a copy)."""
        if self.memory is None:
            return np.ascontiguousarray(a)
        return np.ascontiguousarray(a.transpose(self.memory)).transpose(np.argsort(self.memory))


_NHWC_OF_NCHW = (0, 3, 1, 2)  # an NHWC view (axis -1) of NCHW memory: x.transpose(0, 2, 3, 1)
_NCHW_OF_NHWC = (0, 2, 3, 1)  # an NCHW view (axis 1) of channels-last memory (torch's)

CASES = {
    "quick": [
        Case("NCHW", (32, 64, 56, 56), 1),
        Case("NHWC", (32, 56, 56, 64), -1, twin="NCHW"),
        Case("NHWC view of NCHW", (32, 56, 56, 64), -1, memory=_NHWC_OF_NCHW, twin="NCHW"),
        Case("(N, D)", (1024, 4096), 1),
        Case("(N, C) small C", (4096, 64), 1),
        Case("NCHW cache-sized", (16, 64, 16, 16), 1),
    ],
    "full": [
        Case("NCHW", (32, 64, 56, 56), 1),
        Case("NHWC", (32, 56, 56, 64), -1, twin="NCHW"),
        Case("NHWC view of NCHW", (32, 56, 56, 64), -1, memory=_NHWC_OF_NCHW, twin="NCHW"),
        Case("NCHW view of NHWC", (32, 64, 56, 56), 1, memory=_NCHW_OF_NHWC, twin="NCHW"),
        Case("(N, D)", (1024, 4096), 1),
        Case("(N, C) small C", (4096, 64), 1),
        Case("NCHW cache-sized", (16, 64, 16, 16), 1),
        Case("NHWC cache-sized", (16, 16, 16, 64), -1, twin="NCHW cache-sized"),
        Case("(N, D) cache-sized", (256, 1024), 1),
        Case("NCHW 100MB", (128, 64, 56, 56), 1),
        Case("NHWC 100MB", (128, 56, 56, 64), -1, twin="NCHW 100MB"),
        Case("(N, D) 134MB", (8192, 4096), 1),
        Case("NCHW float64", (32, 64, 56, 56), 1, "float64"),
        Case("NCHW float16", (32, 64, 56, 56), 1, "float16"),
        Case("NHWC float16", (32, 56, 56, 64), -1, "float16", twin="NCHW float16"),
    ],
}

#: Small float64 batches: (name, shape); axis 1.
SMALL_CASES = {
    "quick": [("(60, 100)", (60, 100))],
    "full": [
        ("(60, 100)", (60, 100)),
        ("(256, 512)", (256, 512)),
        ("(32, 64, 8, 8)", (32, 64, 8, 8)),
    ],
}


def goal(case: Case, pass_: str) -> float | None:
    """The issue's goal for ``numba / copy`` (None where it sets none)."""
    if case.dtype == "float16":
        return 3.0 if pass_ == "train" else None
    if case.dtype != "float32":
        return None
    if case.nbytes >= 50e6:
        return {"train": 1.2, "eval": 1.05, "backward": 1.6}[pass_]
    if case.nbytes <= 2e6 and pass_ == "train":
        return 1.5
    return None
