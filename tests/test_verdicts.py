"""Verdict margins ("borderline"), the smoothness claim and the BN-fit guards."""

from __future__ import annotations

import math

import pytest
from test_demo import _fake  # noqa: E402  (tests/ is on sys.path under pytest)

from batchnorm_demo.experiments import assess
from batchnorm_demo.experiments.verdicts import margin, mark_borderline, smoothness_claim

LABELS = {"no_bn": "no BN", "bn": "BN", "noisy_bn": "noisy BN"}


def test_margin_in_standard_errors():
    assert margin({"diff": 0.3, "noise": 0.2}) == pytest.approx(1.0)  # (0.3 - 0.2) / 0.1
    assert margin({"diff": -0.15, "noise": 0.2}) == pytest.approx(-0.5)
    assert margin({"diff": 0.1, "noise": math.inf}) is None
    assert margin({"diff": 0.1, "noise": 0.0}) is None


def _claim(verdict, diff, noise):
    return {"verdict": verdict, "evidence": "e", "comparisons": [{"diff": diff, "noise": noise}]}


def test_borderline_marks_only_verdicts_near_their_threshold():
    claims = {
        "near": _claim("supported", 0.25, 0.2),  # margin 0.5: could flip
        "clear": _claim("supported", 0.5, 0.2),  # margin 3: stays
        "short": _claim("inconclusive", 0.18, 0.2),  # margin -0.2
        "far": _claim("inconclusive", 0.0, 0.2),  # margin -2
    }
    mark_borderline(claims)
    assert claims["near"]["verdict"] == "borderline (supported)"
    assert "only 0.50 standard errors beyond its threshold" in claims["near"]["evidence"]
    assert claims["clear"]["verdict"] == "supported" and claims["clear"]["evidence"] == "e"
    assert claims["short"]["verdict"] == "inconclusive"
    assert "close to the threshold" in claims["short"]["evidence"]
    assert claims["far"]["evidence"] == "e"
    assert claims["near"]["margin_sigma"] == 0.5 and claims["far"]["margin_sigma"] == -2.0
    assert all("comparisons" not in c for c in claims.values())


def test_a_borderline_note_names_the_difference_it_rests_on():
    """The note says which difference, its value and noise, not only "a difference"."""
    near = _claim("supported", 0.021, 0.02)
    near["comparisons"][0]["what"] = "BN - no BN in final test accuracy"
    far = {"diff": 0.3, "noise": 0.02, "what": "BN - no BN in test accuracy at step 500"}
    near["comparisons"].append(far)  # the nearest comparison is the one named
    short = _claim("inconclusive", 0.018, 0.02)
    short["comparisons"][0]["what"] = "BN - no BN in log10 loss range"
    claims = {"near": near, "short": short}
    mark_borderline(claims)
    assert (
        "borderline: BN - no BN in final test accuracy (+2.1 points, noise 2.0) is only 0.10 "
        "standard errors beyond its threshold" in claims["near"]["evidence"]
    )
    assert "step 500" not in claims["near"]["evidence"]
    assert (
        "close to the threshold: BN - no BN in log10 loss range (+0.018, noise 0.02) is 0.20 "
        "standard errors short of it" in claims["short"]["evidence"]
    )


def _smooth(bn, nobn, seeds=3):
    def arm(v, lr):
        per = [v * (1 + 0.01 * k) for k in range(seeds)]
        return {"lr": lr, "steps": [0, 100], "multipliers": [0.5, 1.0],
                "by_lr": {"0.5": {"mean_loss_range": per, "mean_grad_change_max": per,
                                  "mean_beta": per}, "2.0": {"mean_loss_range": per,
                                  "mean_grad_change_max": per, "mean_beta": per}}}  # fmt: skip

    return {"no_bn": arm(nobn, 0.5), "bn": arm(bn, 2.0), "noisy_bn": arm(bn, 2.0)}


@pytest.mark.parametrize(
    ("bn", "nobn", "verdict"),
    [(0.1, 1.0, "supported"), (1.0, 0.1, "not supported"), (1.0, 1.0, "inconclusive")],
)
def test_smoothness_claim_follows_the_numbers(bn, nobn, verdict):
    c = smoothness_claim(_smooth(bn, nobn), "0.5", LABELS)
    assert c["verdict"] == verdict
    assert "common rate 0.5" in c["evidence"] and len(c["comparisons"]) == 3


def test_claims_need_bn_to_fit():
    arms = ("no_bn", "bn", "noisy_bn")
    clear = {"no_bn": 0.5, "bn": 0.95, "noisy_bn": 0.95}
    fitted = assess.summarize(_fake(acc=clear))["claims"]
    unfit = assess.summarize(_fake(acc=clear, train=dict.fromkeys(arms, 0.9)))["claims"]
    assert fitted["faster_training"]["verdict"] == "supported"  # the negative control
    for key in ("faster_training", "stable_distributions", "ics_gradient"):
        assert unfit[key]["verdict"] == "inconclusive", key
        assert "did not fit" in unfit[key]["evidence"]
