"""Comparisons of two arms over seeds: beyond the noise, or within it.

Two accuracies differ *beyond the noise* when their means differ by more than twice the
combined uncertainty, where an arm's uncertainty is sqrt(p(1 - p) / n_test + sd^2 / seeds):
the binomial standard error of a test set of n_test items plus the spread over seeds. Other
measures (distribution change, ICS) differ beyond the noise when the means differ by more
than twice sqrt(sd_a^2 / k_a + sd_b^2 / k_b).
"""

from __future__ import annotations

import math

from .._format import mean_sd

__all__ = ["compare_accuracy", "compare_measure", "fitted", "usable_rates"]


def _acc_uncertainty(values, n_test: int) -> float:
    s = mean_sd(values)
    p = min(max(s["mean"], 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n_test + s["sd"] ** 2 / max(1, s["n"]))


def compare_accuracy(a, b, n_test: int) -> dict:
    """Compare two arms' accuracies (per seed) measured on the same test set of ``n_test``.

    Parameters
    ----------
    a, b : sequence of float
        Accuracies per seed.
    n_test : int
        Test-set size.

    Returns
    -------
    dict
        ``diff`` (mean a - mean b), ``noise`` (twice the combined uncertainty) and ``outcome``:
        ``"higher"``, ``"lower"`` (a vs b, beyond the noise) or ``"within noise"``.
    """
    sa, sb = mean_sd(a), mean_sd(b)
    diff = sa["mean"] - sb["mean"]
    noise = 2 * math.sqrt(_acc_uncertainty(a, n_test) ** 2 + _acc_uncertainty(b, n_test) ** 2)
    outcome = "within noise"
    if math.isfinite(diff) and abs(diff) > noise:
        outcome = "higher" if diff > 0 else "lower"
    return {"diff": diff, "noise": noise, "outcome": outcome}


def compare_measure(a, b) -> dict:
    """Compare a measure (per seed) between two arms using only the spread over seeds.

    Parameters
    ----------
    a, b : sequence of float

    Returns
    -------
    dict
        ``diff``, ``noise`` and ``outcome`` as in :func:`compare_accuracy`; with fewer than
        two seeds per arm the outcome is ``"within noise"`` (the spread is unknown).
    """
    sa, sb = mean_sd(a), mean_sd(b)
    diff = sa["mean"] - sb["mean"]
    if sa["n"] < 2 or sb["n"] < 2 or not math.isfinite(diff):
        return {"diff": diff, "noise": math.inf, "outcome": "within noise"}
    noise = 2 * math.sqrt(sa["sd"] ** 2 / sa["n"] + sb["sd"] ** 2 / sb["n"])
    outcome = "within noise"
    if abs(diff) > noise:
        outcome = "higher" if diff > 0 else "lower"
    return {"diff": diff, "noise": noise, "outcome": outcome}


def fitted(train_accuracy, threshold: float) -> bool:
    """Whether every seed reached ``threshold`` training accuracy.

    Parameters
    ----------
    train_accuracy : sequence of float
    threshold : float

    Returns
    -------
    bool
    """
    return len(train_accuracy) > 0 and all(t >= threshold for t in train_accuracy)


def usable_rates(sweep: dict, threshold: float) -> list[float]:
    """Learning rates at which every seed's final test accuracy is >= ``threshold``.

    Parameters
    ----------
    sweep : dict
        lr (as a string) -> {"test_accuracy": per seed, ...} for one arm.
    threshold : float

    Returns
    -------
    list of float, ascending
    """
    return sorted(
        float(lr)
        for lr, v in sweep.items()
        if v["test_accuracy"] and min(v["test_accuracy"]) >= threshold
    )
