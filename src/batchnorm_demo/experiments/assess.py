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

import numpy as np

from .._format import mean_sd, pm
from .compare import compare_accuracy, compare_measure, fitted, usable_rates
from .verdicts import mark_borderline, smoothness_claim

__all__ = [
    "compare_accuracy",
    "compare_measure",
    "fitted",
    "mean_sd",
    "pm",
    "summarize",
    "usable_rates",
]

LABELS = {"no_bn": "no BN", "bn": "BN", "noisy_bn": "noisy BN"}
USABLE_MARGIN = 0.05  # a rate is usable if every seed ends within 5 points of the best arm


def _pp(x: float) -> str:
    return f"{100 * x:.1f}"


def _named(comparison: dict, what: str) -> dict:
    """``comparison`` with ``what`` it compares (named in a borderline note), returned."""
    comparison["what"] = what
    return comparison


def _points(c: dict, what: str) -> str:
    """``what, BN - no BN: +1.3 points (noise 2.0)`` for an accuracy comparison."""
    return f"{what}: {100 * c['diff']:+.1f} points (noise {_pp(c['noise'])})"


def _verdict(outcome: str, better: str = "higher") -> str:
    if outcome == "within noise":
        return "inconclusive"
    return "supported" if outcome == better else "not supported"


def _fit_note(names_train: dict[str, list], threshold: float) -> str | None:
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


def summarize(results: dict) -> dict:
    """Numbers (mean and sd over seeds) per sub-experiment and plain-words verdicts.

    Parameters
    ----------
    results : dict
        The output of :func:`batchnorm_demo.experiments.runner.run`.

    Returns
    -------
    dict
        ``claims`` (key -> ``verdict``, ``evidence``, ``rests_on``), ``usable`` (arm ->
        rates), ``usable_threshold`` and ``n_test``.
    """
    cfg = results["config"]
    fit = cfg["fit_threshold"]
    n_test = results["dataset"]["n_test"]
    arms = results["ioffe"]
    sweep = results["lr_sweep"]
    claims: dict[str, dict] = {}
    noise_rule = (
        "differences count only beyond twice the combined uncertainty (binomial "
        f"standard error on {n_test} test items plus the spread over seeds)"
    )

    # --- learning-rate range and speed (Ioffe & Szegedy: BN allows higher rates, trains faster)
    best = max(mean_sd(arms[a]["final_test_accuracy"])["mean"] for a in arms)
    threshold = best - USABLE_MARGIN
    usable = {a: usable_rates(sweep[a], threshold) for a in arms}
    grid = [float(x) for x in cfg["lrs"]]
    n_bn, n_nobn = len(usable["bn"]), len(usable["no_bn"])
    rng_txt = "; ".join(f"{LABELS[a]}: {_rates(usable[a], grid)}" for a in arms)
    if n_bn > n_nobn:
        v = "supported"
    elif n_bn < n_nobn:
        v = "not supported"
    else:
        v = "inconclusive"
    claims["learning_rates"] = {
        "title": "BN allows higher learning rates (Ioffe & Szegedy)",
        "verdict": v,
        "evidence": f"usable rates (every seed >= {_pp(threshold)}% test accuracy, i.e. within "
        f"{_pp(USABLE_MARGIN)} points of the best arm's mean) out of "
        f"{', '.join(f'{g:g}' for g in grid)}: {rng_txt}",
        "rests_on": f"{cfg['seeds']} seeds x {len(grid)} rates per arm, {cfg['steps']} steps; "
        "the same grid for every arm",
        "headline": "largest usable rate: "
        + ", ".join(
            f"{LABELS[a]} {max(usable[a]):g}" if usable[a] else f"{LABELS[a]} none" for a in arms
        ),
    }
    early = {a: arms[a]["early_test_accuracy"] for a in arms}
    step = arms["bn"]["early_step"]
    c = _named(
        compare_accuracy(early["bn"], early["no_bn"], n_test),
        f"BN - no BN in test accuracy at step {step}",
    )
    common = f"{grid[0]:g}"
    ce = compare_accuracy(
        sweep["bn"][common]["early_test_accuracy"],
        sweep["no_bn"][common]["early_test_accuracy"],
        n_test,
    )
    claims["faster_training"] = {
        "title": "BN trains faster",
        "verdict": _verdict(c["outcome"]),
        "evidence": f"test accuracy at step {step}, each arm at its chosen rate: BN "
        f"{pm(early['bn'])}% (lr {arms['bn']['lr']:g}) vs no BN "
        f"{pm(early['no_bn'])}% (lr {arms['no_bn']['lr']:g}), "
        f"noisy BN {pm(early['noisy_bn'])}%; BN - no BN = {_pp(c['diff'])} points, noise "
        f"{_pp(c['noise'])}",
        "rests_on": noise_rule,
        # not the verdict: at one rate for both arms, the comparison favours whichever arm
        # that rate suits; kept apart so that it never reads as the verdict's evidence
        "aside": f"Not what the verdict rests on: at the common rate {common} (the smallest "
        "of the grid, not each arm's own best) BN reaches "
        f"{pm(sweep['bn'][common]['early_test_accuracy'])}% and no BN "
        f"{pm(sweep['no_bn'][common]['early_test_accuracy'])}% at step {step} "
        f"({ce['outcome']}); a rate that suits one arm better says little about speed",
        "headline": _points(c, f"test accuracy at step {step}, BN - no BN"),
        "comparisons": [c],
    }

    # --- final accuracy, each arm at its chosen rate
    note = _fit_note({LABELS[a]: arms[a]["final_train_accuracy"] for a in ("no_bn", "bn")}, fit)
    c = _named(
        compare_accuracy(
            arms["bn"]["final_test_accuracy"], arms["no_bn"]["final_test_accuracy"], n_test
        ),
        "BN - no BN in final test accuracy",
    )
    txt = (
        f"test accuracy at each arm's validation-chosen rate: BN "
        f"{pm(arms['bn']['final_test_accuracy'])}% (lr {arms['bn']['lr']:g}), "
        f"no BN {pm(arms['no_bn']['final_test_accuracy'])}% (lr "
        f"{arms['no_bn']['lr']:g}), noisy BN "
        f"{pm(arms['noisy_bn']['final_test_accuracy'])}% (lr "
        f"{arms['noisy_bn']['lr']:g}); BN - no BN = {_pp(c['diff'])} points, noise "
        f"{_pp(c['noise'])}"
    )
    claims["accuracy"] = {
        "title": "BN reaches a higher final accuracy (both tuned)",
        "verdict": "inconclusive" if note else _verdict(c["outcome"]),
        "evidence": txt + (f"; {note}" if note else ""),
        "rests_on": noise_rule,
        "headline": _points(c, "final test accuracy, BN - no BN"),
        "comparisons": [] if note else [c],
    }

    # --- initial scale
    init = results["init"]
    small = f"{cfg['small_init_std']!r}"
    big = f"{cfg['init_std']!r}"
    c = _named(
        compare_accuracy(
            init[small]["bn"]["final_test_accuracy"],
            init[small]["no_bn"]["final_test_accuracy"],
            n_test,
        ),
        f"BN - no BN in test accuracy at init std {small}",
    )
    claims["small_init"] = {
        "title": f"BN makes training insensitive to the initial scale (std {small} vs {big})",
        "verdict": _verdict(c["outcome"]),
        "evidence": "final test accuracy at std "
        + small
        + ": "
        + ", ".join(f"{LABELS[a]} {pm(init[small][a]['final_test_accuracy'])}%" for a in arms)
        + "; at std "
        + big
        + ": "
        + ", ".join(f"{LABELS[a]} {pm(init[big][a]['final_test_accuracy'])}%" for a in arms)
        + f" (each arm at its chosen rate; BN - no BN at std {small} = "
        f"{_pp(c['diff'])} points, noise {_pp(c['noise'])})",
        "rests_on": noise_rule,
        "headline": _points(c, f"test accuracy at init std {small}, BN - no BN"),
        "comparisons": [c],
    }

    # --- depth
    deep = results["deep"]
    depth = len(cfg["deep_hidden"])
    c = _named(
        compare_accuracy(
            deep["bn"]["final_test_accuracy"], deep["no_bn"]["final_test_accuracy"], n_test
        ),
        f"BN - no BN in test accuracy with {depth} hidden layers",
    )
    claims["depth"] = {
        "title": f"BN makes a deeper sigmoid network ({depth} hidden layers) trainable",
        "verdict": _verdict(c["outcome"]),
        "evidence": f"final test accuracy after {cfg['deep_steps']} steps, rate chosen on "
        f"validation from {', '.join(f'{x:g}' for x in cfg['deep_lrs'])}: BN "
        f"{pm(deep['bn']['final_test_accuracy'])}% (lr "
        f"{deep['bn']['lr']:g}) vs no BN "
        f"{pm(deep['no_bn']['final_test_accuracy'])}% (lr "
        f"{deep['no_bn']['lr']:g}); training accuracy BN "
        f"{pm(deep['bn']['final_train_accuracy'])}%, no BN "
        f"{pm(deep['no_bn']['final_train_accuracy'])}%",
        "rests_on": noise_rule,
        "headline": f"test accuracy with {depth} hidden layers: BN "
        f"{_pp(_mean(deep['bn']['final_test_accuracy']))}% vs no BN "
        f"{_pp(_mean(deep['no_bn']['final_test_accuracy']))}%",
        "comparisons": [c],
    }

    # --- distribution change (Ioffe's ICS as stated) and the noisy-BN control
    dist = results["distribution_change"]
    w = dist["bn"]["early_window"]
    cmp_e = _named(
        compare_measure(dist["bn"]["seen"]["early"], dist["no_bn"]["seen"]["early"]),
        f"BN - no BN in layer-input change over the first {w} steps",
    )
    cmp_l = _named(
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

    def dtxt(a, key="seen"):
        d = dist[a][key]
        return f"{pm(d['early'], 1, 3)} early, {pm(d['late'], 1, 3)} late"

    claims["stable_distributions"] = {
        "title": "BN keeps the layer-input distributions stable (less internal covariate shift)",
        "verdict": v,
        "evidence": f"change of the last hidden layer's sigmoid inputs per probe interval "
        f"({cfg['probe_every']} steps; percentile change / 15-85 width, mean over "
        f"units), first {w} steps vs later: no BN {dtxt('no_bn')}; BN {dtxt('bn')}"
        f" (BN vs no BN: early {cmp_e['outcome']}, late {cmp_l['outcome']})",
        "rests_on": "the spread over seeds (twice the standard error of the difference)",
        "headline": f"layer-input change per interval, first {w} steps: BN "
        f"{_mean(dist['bn']['seen']['early']):.2f} vs no BN "
        f"{_mean(dist['no_bn']['seen']['early']):.2f}; later "
        f"{_mean(dist['bn']['seen']['late']):.2f} vs "
        f"{_mean(dist['no_bn']['seen']['late']):.2f}",
        "comparisons": [cmp_e, cmp_l],
    }
    nz_seen = _named(
        compare_measure(
            np.add(dist["noisy_bn"]["seen"]["early"], dist["noisy_bn"]["seen"]["late"]),
            np.add(dist["bn"]["seen"]["early"], dist["bn"]["seen"]["late"]),
        ),
        "noisy BN - BN in layer-input change",
    )
    nz_acc = _named(
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
    claims["santurkar_control"] = {
        "title": "BN's benefit does not rest on stable distributions (Santurkar et al.'s "
        "noisy-BN control)",
        "verdict": v,
        "evidence": f"{why}: noisy BN as the layer sees it {dtxt('noisy_bn')}, before the "
        f"noise {dtxt('noisy_bn', 'before_noise')}; BN {dtxt('bn')}; test accuracy "
        f"noisy BN {pm(arms['noisy_bn']['final_test_accuracy'])}% vs BN "
        f"{pm(arms['bn']['final_test_accuracy'])}% ({nz_acc['outcome']}) "
        f"and no BN {pm(arms['no_bn']['final_test_accuracy'])}% "
        f"({nz_vs_nobn['outcome']})",
        "rests_on": noise_rule + "; distribution change by the seed spread",
        "headline": _points(nz_acc, "final test accuracy, noisy BN - BN"),
        "comparisons": [nz_seen, nz_acc],
    }

    # --- Santurkar's gradient-based ICS
    ics = results["ics"]
    common_ics = {a: ics[a]["by_lr"][common] for a in ics}
    c = _named(
        compare_measure(common_ics["bn"]["relative"], common_ics["no_bn"]["relative"]),
        f"BN - no BN in ||G - G'||/||G|| at rate {common}",
    )

    def itxt(d):
        return f"||G - G'||/||G|| {pm(d['relative'], 1, 3)}, cos {pm(d['cosine'], 1, 3)}"

    claims["ics_gradient"] = {
        "title": "BN reduces internal covariate shift as Santurkar et al. measure it",
        "verdict": _verdict(c["outcome"], better="lower"),
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
    if "smoothness" in results:
        claims["smoothness"] = smoothness_claim(results["smoothness"], common, LABELS)

    # --- regularization on the second dataset
    reg = results["regularization"]
    reg_n = reg["dataset"]["n_test"] if reg.get("dataset") else n_test
    reg_name = reg["dataset"]["name"] if reg.get("dataset") else "?"
    # the verdict compares BN with no BN: those two must fit; noisy BN is reported alongside
    note = _fit_note({LABELS[a]: reg[a]["final_train_accuracy"] for a in ("no_bn", "bn")}, fit)
    c = _named(
        compare_accuracy(
            reg["bn"]["final_test_accuracy"], reg["no_bn"]["final_test_accuracy"], reg_n
        ),
        f"BN - no BN in {reg_name} test accuracy",
    )
    body = "; ".join(
        f"{LABELS[a]} (lr {reg[a]['lr']:g}, {_steps(reg[a])} steps) test "
        f"{pm(reg[a]['final_test_accuracy'])}%, train "
        f"{pm(reg[a]['final_train_accuracy'])}%"
        for a in arms
    )
    claims["regularization"] = {
        "title": f"BN regularizes (better test accuracy once every arm fits, on {reg_name})",
        "verdict": "inconclusive" if note else _verdict(c["outcome"]),
        "evidence": body
        + f"; BN - no BN = {_pp(c['diff'])} points, noise {_pp(c['noise'])}"
        + (f"; {note}" if note else ""),
        "rests_on": f"training until {100 * fit:.0f}% training accuracy (at most "
        f"{reg['steps']} steps); differences beyond twice the combined uncertainty "
        f"({reg_n} test items, seeds)",
        "headline": _points(c, f"{reg_name} test accuracy once fitted, BN - no BN"),
        "comparisons": [] if note else [c],
    }

    # --- ghost batches
    ghost = results["ghost"]
    sizes = sorted(ghost, key=int)
    full = sizes[-1]
    better, worse, unfit, ghost_cmp = [], [], [], []
    for k in sizes[:-1]:
        if not (
            fitted(ghost[k]["final_train_accuracy"], fit)
            and fitted(ghost[full]["final_train_accuracy"], fit)
        ):
            unfit.append(k)
            continue
        gc = _named(
            compare_accuracy(
                ghost[k]["final_test_accuracy"], ghost[full]["final_test_accuracy"], n_test
            ),
            f"ghost batch {k} - full batch {full} in test accuracy",
        )
        ghost_cmp.append(gc)
        o = gc["outcome"]
        (better if o == "higher" else worse if o == "lower" else []).append(k)
    if better and not worse:
        v = "supported"
    elif worse and not better:
        v = "not supported"
    else:
        v = "inconclusive"
    gtxt = "; ".join(
        f"{k}: test {pm(ghost[k]['final_test_accuracy'])}%, train "
        f"{pm(ghost[k]['final_train_accuracy'])}%, train-eval gap "
        f"{_pp(mean_sd(ghost[k]['train_eval_gap'])['mean'])} points"
        for k in sizes
    )
    extra = []
    if better:
        extra.append(f"better than {full} beyond noise: {', '.join(better)}")
    if worse:
        extra.append(f"worse than {full} beyond noise: {', '.join(worse)}")
    if unfit:
        extra.append(
            f"not judged (an arm did not reach {100 * fit:.0f}% training accuracy): "
            f"{', '.join(unfit)}"
        )
        if "2" in unfit:  # a property of the maths, stated only where it applies
            extra.append(
                "a virtual batch of 2 maps each unit to about +-1 whatever its input (x_hat = "
                "d / sqrt(d^2 + eps) for the half-difference d), so almost no gradient reaches "
                "the weights below a BN layer: only the output layer and the BN scales and "
                "shifts learn, and such a network cannot fit"
            )
    if not (better or worse or unfit):
        extra.append("every size within noise of the full batch")
    claims["ghost"] = {
        "title": "Statistics over smaller (ghost) batches regularize more",
        "verdict": v,
        "evidence": f"virtual batch size inside batches of {cfg['batch_size']}: "
        + gtxt
        + "; "
        + "; ".join(extra),
        "rests_on": f"BN at its chosen rate on {results['ghost_settings']['dataset']}, trained "
        f"until fitted (at most {cfg['ghost_steps']} steps); "
        "the gap is test accuracy with batch statistics (train mode) minus with "
        "running statistics (eval mode)",
        "headline": _ghost_headline(ghost, sizes, unfit, fit),
        "comparisons": ghost_cmp,
    }
    # a run too short for BN itself to fit its training data decides nothing about these
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
        note = _fit_note(needs, fit)
        if note and key in claims:
            claims[key]["verdict"] = "inconclusive"
            claims[key]["evidence"] += f"; {note}"
            claims[key]["comparisons"] = []
    mark_borderline(claims)
    for c in claims.values():  # sentences start with a capital
        c["evidence"] = c["evidence"][:1].upper() + c["evidence"][1:]
        c["rests_on"] = c["rests_on"][:1].upper() + c["rests_on"][1:]
    return {"claims": claims, "usable": usable, "usable_threshold": threshold, "n_test": n_test}


def _mean(values) -> float:
    return mean_sd(values)["mean"]


def _ghost_headline(ghost: dict, sizes: list[str], unfit: list[str], fit: float) -> str:
    """Test accuracy of each virtual batch size; the unfitted ones named as such."""
    acc = ", ".join(f"{k}: {_pp(_mean(ghost[k]['final_test_accuracy']))}%" for k in sizes)
    if unfit:
        acc += f"; {', '.join(unfit)} below {100 * fit:.0f}% training accuracy"
    return "test accuracy by virtual batch, " + acc


def _steps(r: dict) -> str:
    s = r.get("steps_run") or []
    if not s:
        return "?"
    return f"{min(s)}" if min(s) == max(s) else f"{min(s)}-{max(s)}"


def _rates(rates: list[float], grid: list[float]) -> str:
    if not rates:
        return "none"
    if rates == grid:
        return "all"
    return ", ".join(f"{r:g}" for r in rates)
