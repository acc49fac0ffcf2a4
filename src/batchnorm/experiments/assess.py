"""Verdicts on the article's claims, computed from the results of :mod:`.ioffe`.

Every number is a mean and a sample standard deviation over seeds; two arms are
*separated* when their means differ by more than one standard deviation of each.
"""

from __future__ import annotations

import numpy as np

__all__ = ["summarize"]


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "n": int(v.size)}


def _compare(a: dict, b: dict) -> str:
    """'lower', 'higher' (a vs b, separated by more than one sd each) or 'overlap'."""
    if a["mean"] + a["sd"] < b["mean"] - b["sd"]:
        return "lower"
    if a["mean"] - a["sd"] > b["mean"] + b["sd"]:
        return "higher"
    return "overlap"


def summarize(results: dict) -> dict:
    """Numbers (mean and sd over seeds) per arm and plain-words verdicts on the two claims.

    The verdicts are computed from the numbers: "separated" means the means differ by more
    than one standard deviation of each arm.
    """
    arms = results["ioffe"]
    table = {}
    for arm, r in arms.items():
        steps = r["test_accuracy_curve"]["steps"]
        early_i = min(range(len(steps)), key=lambda i: abs(steps[i] - steps[-1] / 10))
        table[arm] = {
            "lr": r["lr"],
            "test": _stats(r["final_test_accuracy"]),
            "train": _stats(r["final_train_accuracy"]),
            "gap": _stats(r["train_test_gap"]),
            "instability": _stats([i["score"] for i in r["instability"]]),
            "early_step": steps[early_i],
            "early_test": _stats([v[early_i] for v in r["test_accuracy_curve"]["values"]]),
        }
    nb, b, nz = table["no_bn"], table["bn"], table["noisy_bn"]

    def pm(s, pct=False):
        k = 100 if pct else 1
        return f"{k * s['mean']:.{1 if pct else 3}f} ± {k * s['sd']:.{1 if pct else 3}f}"

    stab = _compare(b["instability"], nb["instability"])
    if stab == "lower":
        c1 = ("supported", f"With BN the last hidden layer's sigmoid inputs are more stable "
              f"(instability {pm(b['instability'])} vs {pm(nb['instability'])} without BN)")
    elif b["instability"]["mean"] < nb["instability"]["mean"]:
        c1 = ("weakly supported", f"BN's sigmoid inputs are somewhat more stable "
              f"({pm(b['instability'])} vs {pm(nb['instability'])}), within the seed spread")
    else:
        c1 = ("not supported", f"BN's sigmoid inputs are not more stable "
              f"({pm(b['instability'])} vs {pm(nb['instability'])} without BN)")
    noisy_less_stable = _compare(nz["instability"], b["instability"]) == "higher"
    acc_tol = max(0.01, b["test"]["sd"] + nz["test"]["sd"])
    noisy_as_good = abs(nz["test"]["mean"] - b["test"]["mean"]) <= acc_tol
    vs_nobn = ("even less stable than without BN"
               if _compare(nz["instability"], nb["instability"]) == "higher"
               else "though not less stable than without BN")
    if noisy_less_stable and noisy_as_good:
        santurkar = ("noisy BN makes the distributions less stable than BN "
                     f"({pm(nz['instability'])} vs {pm(b['instability'])}; {vs_nobn}) yet "
                     f"reaches the same test accuracy ({pm(nz['test'], True)}% vs "
                     f"{pm(b['test'], True)}%): BN's benefit does not rest on that stability "
                     "(Santurkar et al.'s point)")
    elif noisy_less_stable:
        santurkar = ("noisy BN makes the distributions less stable than BN "
                     f"({pm(nz['instability'])} vs {pm(b['instability'])}; {vs_nobn}) and "
                     f"tests differently ({pm(nz['test'], True)}% vs {pm(b['test'], True)}%)")
    else:
        santurkar = ("the injected noise did not make the distributions measurably less stable "
                     f"than BN's ({pm(nz['instability'])} vs {pm(b['instability'])})")

    gap_cmp = _compare(b["gap"], nb["gap"])
    test_cmp = _compare(b["test"], nb["test"])
    gap_txt = (f"train-test gap {pm(b['gap'], True)} points with BN vs {pm(nb['gap'], True)} "
               f"without; test accuracy {pm(b['test'], True)}% vs {pm(nb['test'], True)}%")
    if gap_cmp == "lower" and test_cmp != "lower":
        c2 = ("supported", "BN narrows the generalization gap: " + gap_txt)
    elif gap_cmp == "higher" or test_cmp == "lower":
        c2 = ("not supported", "BN does not regularize here: " + gap_txt)
    elif b["gap"]["mean"] < nb["gap"]["mean"]:
        c2 = ("weakly supported", "BN's gap is smaller but within the seed spread: " + gap_txt)
    else:
        c2 = ("not supported", "no regularization effect is visible: " + gap_txt)

    speed = _compare(b["early_test"], nb["early_test"])
    speed_txt = (f"At step {b['early_step']} test accuracy is {pm(b['early_test'], True)}% with "
                 f"BN vs {pm(nb['early_test'], True)}% without")
    return {
        "table": table,
        "claims": {
            "stable_distributions": {"verdict": c1[0], "evidence": c1[1],
                                     "noisy_bn": santurkar},
            "regularization": {"verdict": c2[0], "evidence": c2[1]},
            "faster_training": {"verdict": {"higher": "supported", "overlap": "inconclusive",
                                            "lower": "not supported"}[speed],
                                "evidence": speed_txt},
        },
        "no_bn_lr": {"chosen": nb["lr"], "rule": "lowest mean final training loss",
                     "candidates": sorted(v["lr"] for v in arms["no_bn"]["lr_sweep"].values())},
    }
