"""Verdicts on the articles' claims, computed from the results of :mod:`.runner`.

Every number is a mean and a sample standard deviation over seeds. Two accuracies differ
*beyond the noise* when their means differ by more than twice the combined uncertainty, where
an arm's uncertainty is sqrt(p(1 - p) / n_test + sd^2 / seeds): the binomial standard error of
a test set of n_test items plus the spread over seeds. Other measures (distribution change,
ICS) differ beyond the noise when the means differ by more than twice sqrt(sd_a^2 / k_a +
sd_b^2 / k_b). A claim about generalization is judged only for arms that fit their training
data (training accuracy >= the fit threshold for every seed); otherwise, or when the
difference is within the noise, the verdict is "inconclusive". Nothing here knows what the
outcome should be: every word is chosen from the numbers. The comparisons themselves are in
:mod:`.compare`.
"""

from __future__ import annotations

from .._format import mean_sd, pm
from .claim_rules import LABELS, USABLE_MARGIN, context, fit_note
from .claims import CLAIMS
from .compare import compare_accuracy, compare_measure, fitted, usable_rates
from .verdicts import mark_borderline

__all__ = [
    "LABELS",
    "USABLE_MARGIN",
    "compare_accuracy",
    "compare_measure",
    "fitted",
    "mean_sd",
    "pm",
    "summarize",
    "usable_rates",
]


def summarize(results: dict) -> dict:
    """Numbers (mean and sd over seeds) per sub-experiment and plain-words verdicts.

    Each claim is one function of :data:`.claims.CLAIMS`; then the claims that need BN to
    fit its training data are made inconclusive where it did not, and verdicts near their
    threshold are marked borderline (:func:`.verdicts.mark_borderline`).

    Parameters
    ----------
    results : dict
        The output of :func:`batchnorm_demo.experiments.runner.run`.

    Returns
    -------
    dict
        ``claims`` (key -> ``title``, ``verdict``, ``evidence``, ``rests_on``, ``headline``
        and for some an ``aside``), ``usable`` (arm -> rates), ``usable_threshold`` and
        ``n_test``.
    """
    k = context(results)
    claims = {key: c for key, claim in CLAIMS if (c := claim(k)) is not None}
    _guard_unfitted(results, claims)
    mark_borderline(claims)
    for c in claims.values():  # sentences start with a capital
        c["evidence"] = c["evidence"][:1].upper() + c["evidence"][1:]
        c["rests_on"] = c["rests_on"][:1].upper() + c["rests_on"][1:]
    return {
        "claims": claims,
        "usable": k.usable,
        "usable_threshold": k.threshold,
        "n_test": k.n_test,
    }


def _guard_unfitted(results: dict, claims: dict) -> None:
    """A run too short for BN itself to fit its training data decides nothing about the
    claims that rest on BN's training: those become inconclusive, with the reason."""
    cfg, arms, init, deep = results["config"], results["ioffe"], results["init"], results["deep"]
    fit, small = cfg["fit_threshold"], f"{cfg['small_init_std']!r}"
    bn_fit = {"BN": arms["bn"]["final_train_accuracy"]}
    guards = {
        "learning_rates": bn_fit,
        "faster_training": bn_fit,
        "stable_distributions": bn_fit,
        "ics_gradient": bn_fit,
        "smoothness": bn_fit,
        "small_init": {f"BN at std {small}": init[small]["bn"].get("final_train_accuracy", [])},
        "depth": {"the deep BN network": deep["bn"]["final_train_accuracy"]},
        "santurkar_control": {
            "BN": arms["bn"]["final_train_accuracy"],
            "noisy BN": arms["noisy_bn"]["final_train_accuracy"],
        },
    }
    for key, needs in guards.items():
        note = fit_note(needs, fit)
        if note and key in claims:
            claims[key]["verdict"] = "inconclusive"
            claims[key]["evidence"] += f"; {note}"
            claims[key]["comparisons"] = []
