"""The marks of the demo report's tables and the sentences that explain them.

* ``†`` on a learning-rate sweep cell: some seed diverged (its loss became non-finite; it is
  counted as chance from there on) or ended below the usable threshold (5 points below the
  best arm's mean test accuracy). The unmarked rates are exactly the arm's usable rates.
* ``‡`` on a stop-at-fit run (regularization, ghost batches): some seed reached its step cap
  without reaching the fit threshold, so its test accuracy partly measures under-fitting.
"""

from __future__ import annotations

from ..experiments.assess import LABELS
from ..experiments.ioffe import ARMS

__all__ = ["failed_seeds", "failure_note", "steps_cell", "unfit_note", "unfitted_seeds"]


def failed_seeds(cell: dict, threshold: float | None = None) -> list[int]:
    """Seeds (indices) of one sweep cell that diverged or ended below ``threshold``.

    The complement of :func:`batchnorm_demo.experiments.compare.usable_rates`: a rate is
    usable exactly when no seed fails here (with the same ``threshold``).

    Parameters
    ----------
    cell : dict
        ``results["lr_sweep"][arm][repr(lr)]``: ``test_accuracy`` and ``diverged`` per seed.
    threshold : float, optional
        The usable threshold (final test accuracy, a fraction); None checks divergence only.

    Returns
    -------
    list of int
    """
    test = cell.get("test_accuracy", [])
    diverged = cell.get("diverged", [False] * len(test))
    return [
        i
        for i, (acc, div) in enumerate(zip(test, diverged, strict=False))
        if div or (threshold is not None and not acc >= threshold)  # NaN fails too
    ]


def failure_note(results: dict, summary: dict) -> str:
    """One sentence per marked (†) sweep cell: each seed's final test accuracy, diverged or not.

    Parameters
    ----------
    results, summary : dict

    Returns
    -------
    str
        Empty when no cell is marked.
    """
    threshold = summary.get("usable_threshold")
    parts = []
    for arm in ARMS:
        for lr in (float(x) for x in results["config"]["lrs"]):
            cell = results["lr_sweep"][arm][repr(lr)]
            if not failed_seeds(cell, threshold):
                continue
            div = cell.get("diverged", [False] * len(cell["test_accuracy"]))
            seeds = ", ".join(
                f"{100 * a:.1f}%" + (" (diverged)" if d else "")
                for a, d in zip(cell["test_accuracy"], div, strict=False)
            )
            parts.append(f"{LABELS[arm]} at lr {lr:g}: {seeds}")
    return ("Marked †, each seed's final test accuracy: " + "; ".join(parts) + ".") if parts else ""


def unfitted_seeds(entry: dict, fit_threshold: float, cap: int | None = None) -> list[int]:
    """Seeds (indices) of a stop-at-fit run that ended below ``fit_threshold``.

    Such a run stops at the first evaluation at which it fits, so a seed below the threshold
    ran to its cap (``steps_run`` equals ``cap`` when both are known).

    Parameters
    ----------
    entry : dict
        ``final_train_accuracy`` per seed, optionally ``steps_run`` per seed.
    fit_threshold : float
        Training accuracy (a fraction) that counts as fitted.
    cap : int, optional
        The runs' step cap.

    Returns
    -------
    list of int
    """
    train = entry.get("final_train_accuracy", [])
    steps = entry.get("steps_run", [None] * len(train))
    return [
        i
        for i, (t, n) in enumerate(zip(train, steps, strict=False))
        if not t >= fit_threshold and (cap is None or n is None or n >= cap)
    ]


def steps_cell(entry: dict, fit_threshold: float, cap: int | None = None) -> str:
    """The steps a stop-at-fit run took over seeds ("min-max"), ``‡`` if some seed did not fit.

    Parameters
    ----------
    entry : dict
        As in :func:`unfitted_seeds`.
    fit_threshold : float
    cap : int, optional

    Returns
    -------
    str
    """
    steps = entry.get("steps_run", [])
    text = "-".join(str(v) for v in sorted({min(steps), max(steps)})) if steps else "?"
    return text + ("‡" if unfitted_seeds(entry, fit_threshold, cap) else "")


def _unit_label(name: str) -> str:
    """An arm's label, or a virtual batch size as "virtual batch K"."""
    return LABELS.get(name, f"virtual batch {name}")


def unfit_note(entries: dict, fit_threshold: float, cap: int | None) -> str:
    """One sentence naming every seed marked ``‡``: its steps and final training accuracy.

    Parameters
    ----------
    entries : dict
        Name (an arm or a virtual batch size) -> entry as in :func:`unfitted_seeds`.
    fit_threshold : float
    cap : int, optional

    Returns
    -------
    str
        Empty when nothing is marked.
    """
    parts = []
    for name, entry in entries.items():
        bad = unfitted_seeds(entry, fit_threshold, cap)
        train = entry.get("final_train_accuracy", [])
        if len(bad) == len(train):  # every seed: no need to number them
            accs = [f"{100 * train[i]:.1f}%" for i in bad]
        else:
            accs = [f"seed {i} {100 * train[i]:.1f}%" for i in bad]
        if accs:
            parts.append(f"{_unit_label(name)} " + ", ".join(accs))
    if not parts:
        return ""
    return (
        f"‡: some seed hit the step cap ({cap if cap is not None else '?'}) without reaching "
        f"{100 * fit_threshold:.0f}% training accuracy, so its test accuracy partly measures "
        "under-fitting. Training accuracy at the cap: " + "; ".join(parts) + "."
    )
