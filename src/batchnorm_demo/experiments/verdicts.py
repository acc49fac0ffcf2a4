"""Two parts of the verdicts (:mod:`.assess`): the smoothness claim of Santurkar et al. (2018,
section 3), and how close each verdict is to flipping.

*Smoothness.* Per seed, each measure of :mod:`.smoothness` is averaged over the run; BN and
no BN are compared at the common (smallest) rate, where both move the same multiples of the
same learning rate, on the logarithm of the measure (they range over orders of magnitude, and
the spread over seeds is multiplicative). "Supported" when BN's loss range, gradient change and
effective beta-smoothness are all lower beyond the noise; "not supported" when BN's are higher
and none lower; "partly supported" when some are lower and none higher; otherwise
"inconclusive".

*Margins.* A comparison decides at ``|diff| > noise`` (twice the combined standard error s).
Its margin is ``(|diff| - noise) / s``: how many standard errors the difference would have
to move to flip the outcome. A verdict that rests on a comparison with margin below 1 becomes
"borderline" (it could flip on another machine, where float rounding sends the chaotic
training elsewhere); an inconclusive one within 1 of the threshold says so.
"""

from __future__ import annotations

import math

from .._format import pm
from .compare import compare_measure

__all__ = ["BORDERLINE_SIGMA", "mark_borderline", "margin", "smoothness_claim"]

BORDERLINE_SIGMA = 1.0
MEASURES = (
    ("mean_loss_range", "loss range"),
    ("mean_grad_change_max", "gradient change"),
    ("mean_beta", "effective beta"),
)


def margin(comparison: dict) -> float | None:
    """``(|diff| - noise) / (noise / 2)``, or None when the noise is unknown or zero."""
    d, noise = comparison.get("diff"), comparison.get("noise")
    if d is None or noise is None or not (math.isfinite(d) and math.isfinite(noise)) or noise <= 0:
        return None
    return (abs(d) - noise) / (noise / 2)


def _log(values) -> list[float]:
    return [math.log10(v) for v in values if v is not None and math.isfinite(v) and v > 0]


def smoothness_claim(smooth: dict, common: str, labels: dict) -> dict:
    """The claim "BN smooths the loss landscape" from ``results["smoothness"]``.

    Parameters
    ----------
    smooth : dict
        Arm -> the collected smoothness numbers (``by_lr`` etc.).
    common : str
        The common rate (a key of ``by_lr``).
    labels : dict
        Arm -> display name.

    Returns
    -------
    dict
        ``title``, ``verdict``, ``evidence``, ``rests_on`` and ``comparisons``.
    """
    outcomes, parts, comps = [], [], []
    for key, name in MEASURES:
        bn, nobn = smooth["bn"]["by_lr"][common][key], smooth["no_bn"]["by_lr"][common][key]
        c = compare_measure(_log(bn), _log(nobn))
        c["what"] = f"BN - no BN in log10 {name}"
        ratio = 10 ** c["diff"] if math.isfinite(c["diff"]) else math.nan
        outcomes.append(c["outcome"])
        comps.append(c)
        parts.append(
            f"{name}: BN {pm(bn, 1, 3)} vs no BN {pm(nobn, 1, 3)} (BN/no BN = {ratio:.2g}, "
            f"{c['outcome']})"
        )
    chosen = "; ".join(
        f"{labels[a]} (lr {smooth[a]['lr']:g}) loss range "
        f"{pm(smooth[a]['by_lr'][repr(float(smooth[a]['lr']))]['mean_loss_range'], 1, 3)}, "
        f"effective beta {pm(smooth[a]['by_lr'][repr(float(smooth[a]['lr']))]['mean_beta'], 1, 3)}"
        for a in smooth
    )
    if all(o == "lower" for o in outcomes):
        v = "supported"
    elif "lower" in outcomes and "higher" not in outcomes:
        v = "partly supported"
    elif "higher" in outcomes and "lower" not in outcomes:
        v = "not supported"
    else:
        v = "inconclusive"
    mult = ", ".join(f"{m:g}" for m in smooth["bn"]["multipliers"])
    return {
        "title": "BN smooths the loss landscape (Santurkar et al. 2018, section 3)",
        "verdict": v,
        "evidence": f"along the gradient, moving {mult} times the learning rate, mean over "
        f"the run at the common rate {common}: "
        + "; ".join(parts)
        + f". At each arm's chosen rate: {chosen}",
        "rests_on": "the spread over seeds of the logarithm of each measure (twice the "
        "standard error of the difference); lower is smoother",
        "headline": "BN / no BN at rate "
        + common
        + ": "
        + ", ".join(
            f"{name} {10 ** c['diff']:.2g}x" if math.isfinite(c["diff"]) else f"{name} ?"
            for (_, name), c in zip(MEASURES, comps, strict=True)
        ),
        "comparisons": comps,
    }


def _num(c: dict) -> str:
    """A comparison's difference and noise, as the evidence writes them."""
    if "accuracy" in c.get("what", ""):
        return f"{100 * c['diff']:+.1f} points, noise {100 * c['noise']:.1f}"
    return f"{c['diff']:+.3g}, noise {c['noise']:.3g}"


def mark_borderline(claims: dict) -> None:
    """Mark, in place, verdicts that rest on a comparison within :data:`BORDERLINE_SIGMA`
    standard errors of flipping, and record every claim's smallest margin (``margin_sigma``)."""
    for c in claims.values():
        comps = c.pop("comparisons", [])
        ms = [m for m in (margin(x) for x in comps) if m is not None]
        c["margin_sigma"] = round(min(ms, key=abs), 2) if ms else None
        if not ms:
            continue
        near_c = min((x for x in comps if margin(x) is not None), key=lambda x: abs(margin(x)))
        near = margin(near_c)
        if abs(near) >= BORDERLINE_SIGMA:
            continue
        what = near_c.get("what", "a deciding difference")
        if c["verdict"] in ("supported", "not supported", "partly supported"):
            side = "beyond" if near >= 0 else "short of"
            c["evidence"] += (
                f"; borderline: {what} ({_num(near_c)}) is only {abs(near):.2f} standard "
                f"errors {side} its threshold (the noise), so another machine or seed set "
                "could change the verdict"
            )
            c["verdict"] = f"borderline ({c['verdict']})"
        elif near < 0:
            c["evidence"] += (
                f"; close to the threshold: {what} ({_num(near_c)}) is {abs(near):.2f} "
                "standard errors short of it"
            )
