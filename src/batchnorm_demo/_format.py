"""Formatting shared by the demo's verdicts and reports: mean and spread over seeds.

:mod:`.experiments.assess` (the verdicts) and :mod:`.report` (the tables and text) both
format every number with :func:`pm`; both import it from here.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mean_sd", "pm"]


def mean_sd(values) -> dict:
    """Mean, sample standard deviation (0 for one value) and count of finite values.

    Parameters
    ----------
    values : sequence of float

    Returns
    -------
    dict
        ``mean``, ``sd``, ``n``.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "n": int(v.size),
    }


def pm(values, scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± sd' over seeds (the one formatter of every table and text).

    Parameters
    ----------
    values : sequence of float
        One value per seed (non-finite values are left out).
    scale : float
        Multiplier (100 for accuracies in percent, 1 for plain numbers).
    digits : int
        Decimals.

    Returns
    -------
    str
    """
    s = mean_sd(values)
    if s["n"] == 0:
        return "n/a"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['sd']:.{digits}f}"


def strict_json(obj):
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, so that
    ``json.dumps(..., allow_nan=False)`` writes standard JSON (NaN is not JSON; browsers' and
    most languages' parsers refuse it). A missing value (a loss before the first step, a
    measure without a spread) then reads as ``null``.

    Parameters
    ----------
    obj : dict, list, tuple, float or other JSON-ready value

    Returns
    -------
    The same structure, tuples as lists.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj
