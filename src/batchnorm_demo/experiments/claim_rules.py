"""What the demo's claims share (:mod:`.claims`): the context every claim reads, the rule
that turns a comparison into a verdict, and the few formats their sentences use."""

from __future__ import annotations

from dataclasses import dataclass

from .._format import mean_sd, pm
from .compare import fitted, usable_rates

__all__ = [
    "LABELS",
    "USABLE_MARGIN",
    "Context",
    "context",
    "dist_text",
    "fit_note",
    "ghost_headline",
    "mean_of",
    "named",
    "points",
    "pp",
    "rates_text",
    "steps_text",
    "verdict",
]

LABELS = {"no_bn": "no BN", "bn": "BN", "noisy_bn": "noisy BN"}
USABLE_MARGIN = 0.05  # a rate is usable if every seed ends within 5 points of the best arm


def pp(x: float) -> str:
    """A fraction as percentage points with one decimal."""
    return f"{100 * x:.1f}"


def named(comparison: dict, what: str) -> dict:
    """``comparison`` with ``what`` it compares (named in a borderline note), returned."""
    comparison["what"] = what
    return comparison


def points(c: dict, what: str) -> str:
    """``what, BN - no BN: +1.3 points (noise 2.0)`` for an accuracy comparison."""
    return f"{what}: {100 * c['diff']:+.1f} points (noise {pp(c['noise'])})"


def verdict(outcome: str, better: str = "higher") -> str:
    """The verdict a comparison's outcome gives when ``better`` is what the claim predicts."""
    if outcome == "within noise":
        return "inconclusive"
    return "supported" if outcome == better else "not supported"


def fit_note(names_train: dict[str, list], threshold: float) -> str | None:
    """Why a claim cannot be decided when an arm did not fit its training data, or None."""
    unfit = [
        f"{name} (training accuracy {pm(t)}%)"
        for name, t in names_train.items()
        if not fitted(t, threshold)
    ]
    if not unfit:
        return None
    return (
        ", ".join(unfit) + f" did not fit the training data (threshold "
        f"{100 * threshold:.0f}%), so the run is too short to decide"
    )


@dataclass(frozen=True)
class Context:
    """What the claims share: the results and the numbers several of them read."""

    results: dict
    cfg: dict
    fit: float
    n_test: int
    arms: dict
    sweep: dict
    noise_rule: str
    grid: list[float]
    common: str
    threshold: float
    usable: dict[str, list[float]]


def context(results: dict) -> Context:
    """The shared context of every claim, from the results of :mod:`.runner`.

    Parameters
    ----------
    results : dict

    Returns
    -------
    Context
    """
    cfg, arms, sweep = results["config"], results["ioffe"], results["lr_sweep"]
    n_test = results["dataset"]["n_test"]
    best = max(mean_sd(arms[a]["final_test_accuracy"])["mean"] for a in arms)
    threshold = best - USABLE_MARGIN
    grid = [float(x) for x in cfg["lrs"]]
    return Context(
        results=results,
        cfg=cfg,
        fit=cfg["fit_threshold"],
        n_test=n_test,
        arms=arms,
        sweep=sweep,
        noise_rule="differences count only beyond twice the combined uncertainty (binomial "
        f"standard error on {n_test} test items plus the spread over seeds)",
        grid=grid,
        common=f"{grid[0]:g}",
        threshold=threshold,
        usable={a: usable_rates(sweep[a], threshold) for a in arms},
    )


def dist_text(dist: dict, a: str, key: str = "seen") -> str:
    """An arm's layer-input change, early and late, as the evidence writes it."""
    d = dist[a][key]
    return f"{pm(d['early'], 1, 3)} early, {pm(d['late'], 1, 3)} late"


def mean_of(values) -> float:
    """The mean over seeds."""
    return mean_sd(values)["mean"]


def ghost_headline(ghost: dict, sizes: list[str], unfit: list[str], fit: float) -> str:
    """Test accuracy of each virtual batch size; the unfitted ones named as such."""
    acc = ", ".join(f"{k}: {pp(mean_of(ghost[k]['final_test_accuracy']))}%" for k in sizes)
    if unfit:
        acc += f"; {', '.join(unfit)} below {100 * fit:.0f}% training accuracy"
    return "test accuracy by virtual batch, " + acc


def steps_text(r: dict) -> str:
    """The steps a group of runs took (one number, or a range)."""
    s = r.get("steps_run") or []
    if not s:
        return "?"
    return f"{min(s)}" if min(s) == max(s) else f"{min(s)}-{max(s)}"


def rates_text(rates: list[float], grid: list[float]) -> str:
    """Usable rates: "all", "none" or the list."""
    if not rates:
        return "none"
    if rates == grid:
        return "all"
    return ", ".join(f"{r:g}" for r in rates)
