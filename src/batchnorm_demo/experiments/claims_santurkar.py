"""The demo's claims from Santurkar et al. 2018 and Ioffe's internal covariate shift: stable
layer inputs, the noisy-BN control, the gradient-based ICS and smoothness (see :mod:`.claims`)."""

from __future__ import annotations

import numpy as np

from .._format import pm
from .claim_rules import (
    LABELS,
    Context,
    dist_text,
    mean_of,
    named,
    points,
    verdict,
)
from .compare import compare_accuracy, compare_measure
from .verdicts import smoothness_claim

__all__ = ["ics_gradient", "santurkar_control", "smoothness", "stable_distributions"]


def stable_distributions(k: Context) -> dict:
    """BN keeps the layer-input distributions stable."""
    results, cfg = k.results, k.cfg
    dist = results["distribution_change"]
    w = dist["bn"]["early_window"]
    cmp_e = named(
        compare_measure(dist["bn"]["seen"]["early"], dist["no_bn"]["seen"]["early"]),
        f"BN - no BN in layer-input change over the first {w} steps",
    )
    cmp_l = named(
        compare_measure(dist["bn"]["seen"]["late"], dist["no_bn"]["seen"]["late"]),
        "BN - no BN in layer-input change after them",
    )
    outs = {cmp_e["outcome"], cmp_l["outcome"]}
    if outs == {"lower"}:
        v = "supported"
    elif "lower" in outs and "higher" not in outs:
        v = "partly supported"
    elif "lower" not in outs and "higher" in outs:
        v = "not supported"
    else:
        v = "inconclusive"

    return {
        "title": "BN keeps the layer-input distributions stable (less internal covariate shift)",
        "verdict": v,
        "evidence": f"change of the last hidden layer's sigmoid inputs per probe interval "
        f"({cfg['probe_every']} steps; percentile change / 15-85 width, mean over "
        f"units), first {w} steps vs later: no BN {dist_text(dist, 'no_bn')}; BN "
        f"{dist_text(dist, 'bn')}"
        f" (BN vs no BN: early {cmp_e['outcome']}, late {cmp_l['outcome']})",
        "rests_on": "the spread over seeds (twice the standard error of the difference)",
        "headline": f"layer-input change per interval, first {w} steps: BN "
        f"{mean_of(dist['bn']['seen']['early']):.2f} vs no BN "
        f"{mean_of(dist['no_bn']['seen']['early']):.2f}; later "
        f"{mean_of(dist['bn']['seen']['late']):.2f} vs "
        f"{mean_of(dist['no_bn']['seen']['late']):.2f}",
        "comparisons": [cmp_e, cmp_l],
    }


def santurkar_control(k: Context) -> dict:
    """BN's benefit does not rest on stable distributions (the noisy-BN control)."""
    n_test, arms, noise_rule = k.n_test, k.arms, k.noise_rule
    dist = k.results["distribution_change"]
    nz_seen = named(
        compare_measure(
            np.add(dist["noisy_bn"]["seen"]["early"], dist["noisy_bn"]["seen"]["late"]),
            np.add(dist["bn"]["seen"]["early"], dist["bn"]["seen"]["late"]),
        ),
        "noisy BN - BN in layer-input change",
    )
    nz_acc = named(
        compare_accuracy(
            arms["noisy_bn"]["final_test_accuracy"], arms["bn"]["final_test_accuracy"], n_test
        ),
        "noisy BN - BN in final test accuracy",
    )
    nz_vs_nobn = compare_accuracy(
        arms["noisy_bn"]["final_test_accuracy"], arms["no_bn"]["final_test_accuracy"], n_test
    )
    if nz_seen["outcome"] == "higher" and nz_acc["outcome"] != "lower":
        v = "supported"
        why = (
            "noisy BN's layer sees a less stable distribution than BN's yet tests "
            f"{'as well (within noise)' if nz_acc['outcome'] == 'within noise' else 'better'}"
        )
    elif nz_seen["outcome"] == "higher":
        v = "not supported"
        why = "noisy BN's less stable distributions go with a lower test accuracy"
    else:
        v = "inconclusive"
        why = "the injected noise did not make the distributions measurably less stable"
    return {
        "title": "BN's benefit does not rest on stable distributions (Santurkar et al.'s "
        "noisy-BN control)",
        "verdict": v,
        "evidence": f"{why}: noisy BN as the layer sees it {dist_text(dist, 'noisy_bn')}, "
        f"before the noise {dist_text(dist, 'noisy_bn', 'before_noise')}; BN "
        f"{dist_text(dist, 'bn')}; test accuracy "
        f"noisy BN {pm(arms['noisy_bn']['final_test_accuracy'])}% vs BN "
        f"{pm(arms['bn']['final_test_accuracy'])}% ({nz_acc['outcome']}) "
        f"and no BN {pm(arms['no_bn']['final_test_accuracy'])}% "
        f"({nz_vs_nobn['outcome']})",
        "rests_on": noise_rule + "; distribution change by the seed spread",
        "headline": points(nz_acc, "final test accuracy, noisy BN - BN"),
        "comparisons": [nz_seen, nz_acc],
    }


def ics_gradient(k: Context) -> dict:
    """BN reduces internal covariate shift as Santurkar et al. measure it."""
    results, common = k.results, k.common
    ics = results["ics"]
    common_ics = {a: ics[a]["by_lr"][common] for a in ics}
    c = named(
        compare_measure(common_ics["bn"]["relative"], common_ics["no_bn"]["relative"]),
        f"BN - no BN in ||G - G'||/||G|| at rate {common}",
    )

    def itxt(d):
        return f"||G - G'||/||G|| {pm(d['relative'], 1, 3)}, cos {pm(d['cosine'], 1, 3)}"

    return {
        "title": "BN reduces internal covariate shift as Santurkar et al. measure it",
        "verdict": verdict(c["outcome"], better="lower"),
        "evidence": f"last hidden layer's weight gradient before and after the earlier layers' "
        f"update, mean over the run, at the common rate {common}: "
        + "; ".join(f"{LABELS[a]} {itxt(common_ics[a])}" for a in ics)
        + ". At each arm's chosen rate: "
        + "; ".join(f"{LABELS[a]} (lr {ics[a]['lr']:g}) {itxt(ics[a])}" for a in ics)
        + ". BN's ||G - G'||/||G|| at the common rate is "
        + {
            "higher": "higher than no BN's beyond the noise (more shift with BN)",
            "lower": "lower than no BN's beyond the noise (less shift with BN)",
            "within noise": "within the noise of no BN's",
        }[c["outcome"]]  # fmt: skip
        + f" (difference {c['diff']:+.3f}, noise {c['noise']:.3f})",
        "rests_on": "the spread over seeds; compared at a common rate because the measure grows "
        "with the step size",
        "headline": f"‖G − G′‖/‖G‖ at rate {common}, BN - no BN: {c['diff']:+.3f} (noise "
        f"{c['noise']:.3f})",
        "comparisons": [c],
    }


def smoothness(k: Context) -> dict | None:
    """BN smooths the loss landscape (only when the run measured it)."""
    if "smoothness" not in k.results:
        return None
    return smoothness_claim(k.results["smoothness"], k.common, LABELS)
