"""What the MPI scenario scripts record per case: the exception (type and message, or None)
and whether the layers' state is unchanged by the call (imported by the scripts, which run
with this folder first on ``sys.path``)."""

from __future__ import annotations

import numpy as np


def attempt(out: dict, name: str, fn, *layers) -> None:
    """Run ``fn()``; store in ``out[name]`` its error (None when it returned) and whether
    every layer's ``state_dict()`` is the same after as before."""
    before = [layer.state_dict() for layer in layers]
    try:
        fn()
        out[name] = {"error": None}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        out[name] = {"error": type(exc).__name__, "message": str(exc)}
    after = [layer.state_dict() for layer in layers]
    out[name]["unchanged"] = all(
        all(np.array_equal(np.asarray(b[k]), np.asarray(a[k])) for k in b)
        for b, a in zip(before, after, strict=True)
    )
