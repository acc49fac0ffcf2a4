"""The demo's claims, one small function each: measure, decide, say (see :mod:`.assess`).

Each function takes the shared :class:`_Context` (the results and what every claim reads:
the chance rule's wording, the usable rates, the common rate) and returns one claim:
``title``, ``verdict``, ``evidence``, ``rests_on``, ``headline`` (the one number the
summary table shows) and ``comparisons`` (for :func:`.verdicts.mark_borderline`).
:data:`CLAIMS` lists them in the report's order.
"""

from __future__ import annotations

from collections.abc import Callable

from .._format import mean_sd, pm
from .compare import compare_accuracy, fitted

__all__ = ["CLAIMS"]

from .claim_rules import (
    LABELS,
    USABLE_MARGIN,
    Context,
    fit_note,
    ghost_headline,
    mean_of,
    named,
    points,
    pp,
    rates_text,
    steps_text,
    verdict,
)
from .claims_santurkar import ics_gradient, santurkar_control, smoothness, stable_distributions


def _learning_rates(k: Context) -> dict:
    """BN allows higher learning rates: the usable rates of each arm."""
    cfg, arms, grid, threshold, usable = k.cfg, k.arms, k.grid, k.threshold, k.usable
    n_bn, n_nobn = len(usable["bn"]), len(usable["no_bn"])
    rng_txt = "; ".join(f"{LABELS[a]}: {rates_text(usable[a], grid)}" for a in arms)
    if n_bn > n_nobn:
        v = "supported"
    elif n_bn < n_nobn:
        v = "not supported"
    else:
        v = "inconclusive"
    return {
        "title": "BN allows higher learning rates (Ioffe & Szegedy)",
        "verdict": v,
        "evidence": f"usable rates (every seed >= {pp(threshold)}% test accuracy, i.e. within "
        f"{pp(USABLE_MARGIN)} points of the best arm's mean) out of "
        f"{', '.join(f'{g:g}' for g in grid)}: {rng_txt}",
        "rests_on": f"{cfg['seeds']} seeds x {len(grid)} rates per arm, {cfg['steps']} steps; "
        "the same grid for every arm",
        "headline": "largest usable rate: "
        + ", ".join(
            f"{LABELS[a]} {max(usable[a]):g}" if usable[a] else f"{LABELS[a]} none" for a in arms
        ),
    }


def _faster_training(k: Context) -> dict:
    """BN trains faster: test accuracy at the early step, each arm at its chosen rate."""
    n_test, arms, sweep, noise_rule, common = k.n_test, k.arms, k.sweep, k.noise_rule, k.common
    early = {a: arms[a]["early_test_accuracy"] for a in arms}
    step = arms["bn"]["early_step"]
    c = named(
        compare_accuracy(early["bn"], early["no_bn"], n_test),
        f"BN - no BN in test accuracy at step {step}",
    )
    ce = compare_accuracy(
        sweep["bn"][common]["early_test_accuracy"],
        sweep["no_bn"][common]["early_test_accuracy"],
        n_test,
    )
    return {
        "title": "BN trains faster",
        "verdict": verdict(c["outcome"]),
        "evidence": f"test accuracy at step {step}, each arm at its chosen rate: BN "
        f"{pm(early['bn'])}% (lr {arms['bn']['lr']:g}) vs no BN "
        f"{pm(early['no_bn'])}% (lr {arms['no_bn']['lr']:g}), "
        f"noisy BN {pm(early['noisy_bn'])}%; BN - no BN = {pp(c['diff'])} points, noise "
        f"{pp(c['noise'])}",
        "rests_on": noise_rule,
        # not the verdict: at one rate for both arms, the comparison favours whichever arm
        # that rate suits; kept apart so that it never reads as the verdict's evidence
        "aside": f"Not what the verdict rests on: at the common rate {common} (the smallest "
        "of the grid, not each arm's own best) BN reaches "
        f"{pm(sweep['bn'][common]['early_test_accuracy'])}% and no BN "
        f"{pm(sweep['no_bn'][common]['early_test_accuracy'])}% at step {step} "
        f"({ce['outcome']}); a rate that suits one arm better says little about speed",
        "headline": points(c, f"test accuracy at step {step}, BN - no BN"),
        "comparisons": [c],
    }


def _accuracy(k: Context) -> dict:
    """BN reaches a higher final accuracy, both arms tuned."""
    fit, n_test, arms, noise_rule = k.fit, k.n_test, k.arms, k.noise_rule
    note = fit_note({LABELS[a]: arms[a]["final_train_accuracy"] for a in ("no_bn", "bn")}, fit)
    c = named(
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
        f"{arms['noisy_bn']['lr']:g}); BN - no BN = {pp(c['diff'])} points, noise "
        f"{pp(c['noise'])}"
    )
    return {
        "title": "BN reaches a higher final accuracy (both tuned)",
        "verdict": "inconclusive" if note else verdict(c["outcome"]),
        "evidence": txt + (f"; {note}" if note else ""),
        "rests_on": noise_rule,
        "headline": points(c, "final test accuracy, BN - no BN"),
        "comparisons": [] if note else [c],
    }


def _small_init(k: Context) -> dict:
    """BN makes training insensitive to the initial scale."""
    results, cfg, n_test, arms, noise_rule = k.results, k.cfg, k.n_test, k.arms, k.noise_rule
    init = results["init"]
    small = f"{cfg['small_init_std']!r}"
    big = f"{cfg['init_std']!r}"
    c = named(
        compare_accuracy(
            init[small]["bn"]["final_test_accuracy"],
            init[small]["no_bn"]["final_test_accuracy"],
            n_test,
        ),
        f"BN - no BN in test accuracy at init std {small}",
    )
    return {
        "title": f"BN makes training insensitive to the initial scale (std {small} vs {big})",
        "verdict": verdict(c["outcome"]),
        "evidence": "final test accuracy at std "
        + small
        + ": "
        + ", ".join(f"{LABELS[a]} {pm(init[small][a]['final_test_accuracy'])}%" for a in arms)
        + "; at std "
        + big
        + ": "
        + ", ".join(f"{LABELS[a]} {pm(init[big][a]['final_test_accuracy'])}%" for a in arms)
        + f" (each arm at its chosen rate; BN - no BN at std {small} = "
        f"{pp(c['diff'])} points, noise {pp(c['noise'])})",
        "rests_on": noise_rule,
        "headline": points(c, f"test accuracy at init std {small}, BN - no BN"),
        "comparisons": [c],
    }


def _depth(k: Context) -> dict:
    """BN makes a deeper sigmoid network trainable."""
    results, cfg, n_test, noise_rule = k.results, k.cfg, k.n_test, k.noise_rule
    deep = results["deep"]
    depth = len(cfg["deep_hidden"])
    c = named(
        compare_accuracy(
            deep["bn"]["final_test_accuracy"], deep["no_bn"]["final_test_accuracy"], n_test
        ),
        f"BN - no BN in test accuracy with {depth} hidden layers",
    )
    return {
        "title": f"BN makes a deeper sigmoid network ({depth} hidden layers) trainable",
        "verdict": verdict(c["outcome"]),
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
        f"{pp(mean_of(deep['bn']['final_test_accuracy']))}% vs no BN "
        f"{pp(mean_of(deep['no_bn']['final_test_accuracy']))}%",
        "comparisons": [c],
    }


def _regularization(k: Context) -> dict:
    """BN regularizes, on the second dataset, once every arm fits."""
    results, fit, n_test, arms = k.results, k.fit, k.n_test, k.arms
    reg = results["regularization"]
    reg_n = reg["dataset"]["n_test"] if reg.get("dataset") else n_test
    reg_name = reg["dataset"]["name"] if reg.get("dataset") else "?"
    # the verdict compares BN with no BN: those two must fit; noisy BN is reported alongside
    note = fit_note({LABELS[a]: reg[a]["final_train_accuracy"] for a in ("no_bn", "bn")}, fit)
    c = named(
        compare_accuracy(
            reg["bn"]["final_test_accuracy"], reg["no_bn"]["final_test_accuracy"], reg_n
        ),
        f"BN - no BN in {reg_name} test accuracy",
    )
    body = "; ".join(
        f"{LABELS[a]} (lr {reg[a]['lr']:g}, {steps_text(reg[a])} steps) test "
        f"{pm(reg[a]['final_test_accuracy'])}%, train "
        f"{pm(reg[a]['final_train_accuracy'])}%"
        for a in arms
    )
    return {
        "title": f"BN regularizes (better test accuracy once every arm fits, on {reg_name})",
        "verdict": "inconclusive" if note else verdict(c["outcome"]),
        "evidence": body
        + f"; BN - no BN = {pp(c['diff'])} points, noise {pp(c['noise'])}"
        + (f"; {note}" if note else ""),
        "rests_on": f"training until {100 * fit:.0f}% training accuracy (at most "
        f"{reg['steps']} steps); differences beyond twice the combined uncertainty "
        f"({reg_n} test items, seeds)",
        "headline": points(c, f"{reg_name} test accuracy once fitted, BN - no BN"),
        "comparisons": [] if note else [c],
    }


def _ghost(k: Context) -> dict:
    """Statistics over smaller (ghost) batches regularize more."""
    results, cfg, fit, n_test = k.results, k.cfg, k.fit, k.n_test
    ghost = results["ghost"]
    sizes = sorted(ghost, key=int)
    full = sizes[-1]
    better, worse, unfit, ghost_cmp = [], [], [], []
    for size in sizes[:-1]:
        if not (
            fitted(ghost[size]["final_train_accuracy"], fit)
            and fitted(ghost[full]["final_train_accuracy"], fit)
        ):
            unfit.append(size)
            continue
        gc = named(
            compare_accuracy(
                ghost[size]["final_test_accuracy"], ghost[full]["final_test_accuracy"], n_test
            ),
            f"ghost batch {size} - full batch {full} in test accuracy",
        )
        ghost_cmp.append(gc)
        o = gc["outcome"]
        (better if o == "higher" else worse if o == "lower" else []).append(size)
    if better and not worse:
        v = "supported"
    elif worse and not better:
        v = "not supported"
    else:
        v = "inconclusive"
    gtxt = "; ".join(
        f"{size}: test {pm(ghost[size]['final_test_accuracy'])}%, train "
        f"{pm(ghost[size]['final_train_accuracy'])}%, train-eval gap "
        f"{pp(mean_sd(ghost[size]['train_eval_gap'])['mean'])} points"
        for size in sizes
    )
    extra = _ghost_notes(better, worse, unfit, full, fit)
    return {
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
        "headline": ghost_headline(ghost, sizes, unfit, fit),
        "comparisons": ghost_cmp,
    }


def _ghost_notes(better: list, worse: list, unfit: list, full: str, fit: float) -> list[str]:
    """The ghost claim's sentences: which sizes beat or trail the full batch, which were not
    judged and, for a virtual batch of 2, why it cannot fit."""
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
    return extra


# the claims in the report's order (key, function); a function answers None when the run
# did not measure what its claim needs
CLAIMS: list[tuple[str, Callable[[Context], dict | None]]] = [
    ("learning_rates", _learning_rates),
    ("faster_training", _faster_training),
    ("accuracy", _accuracy),
    ("small_init", _small_init),
    ("depth", _depth),
    ("stable_distributions", stable_distributions),
    ("santurkar_control", santurkar_control),
    ("ics_gradient", ics_gradient),
    ("smoothness", smoothness),
    ("regularization", _regularization),
    ("ghost", _ghost),
]
