"""The demo report's opening: one table of every claim (claim, verdict, the number it rests
on, the figure to look at) and the few terms a reader needs to read it, defined once."""

from __future__ import annotations

from .._table_render import Table

__all__ = ["FIGURES", "TERMS", "figure_numbers", "summary_table", "summary_text"]

# the figure that shows each claim's evidence (None: a table only)
FIGURES: dict[str, str | None] = {
    "learning_rates": "learning_rates.png",
    "faster_training": "accuracy.png",
    "accuracy": "accuracy.png",
    "small_init": "robustness.png",
    "depth": "robustness.png",
    "stable_distributions": "distribution.png",
    "santurkar_control": "distribution.png",
    "ics_gradient": None,
    "smoothness": "smoothness.png",
    "regularization": "regularization.png",
    "ghost": "regularization.png",
}

# the terms the summary table and the details use, each defined once, before any use
TERMS: list[str] = [
    "Arms: no BN, BN, and noisy BN (BN followed by random per-unit shifts and scales, fresh "
    "at every step, which makes each layer's inputs less stable on purpose); they share "
    "their initial weights, batches and seeds.",
    "Chosen rate: the learning rate with an arm's best mean validation accuracy. Common "
    "rate: the smallest rate of the grid, the same for every arm.",
    "Noise: twice the combined uncertainty of a difference (the binomial standard error on "
    "the test items plus the spread over seeds). A difference counts only beyond its noise; "
    "otherwise the verdict is inconclusive.",
    "Borderline: the deciding difference is within one standard error of its noise "
    "threshold, so another machine or seed set could flip the verdict.",
    "Usable rate: every seed ends within 5 points of the best arm's mean test accuracy.",
    "Layer-input change: how far the inputs of the last hidden layer's sigmoids move "
    "between probes (percentile change over the 15-85 width).",
    "‖G − G′‖/‖G‖: Santurkar et al.'s internal covariate shift, the change of a layer's "
    "weight gradient when only the layers below it take their step.",
    "Loss range, gradient change, effective beta: Santurkar et al.'s smoothness measures "
    "along the gradient (the spread of the loss, the change of the gradient, the "
    "smoothness constant); lower is smoother.",
    "Virtual (ghost) batch: the batch split into parts that each get their own BN "
    "statistics. Train-eval gap: test accuracy in train mode (batch statistics) minus test "
    "accuracy in eval mode (running statistics).",
]


def figure_numbers(blocks: list[tuple]) -> dict[str, int]:
    """Figure file -> its number (1, 2, ...) in the order the report shows the figures.

    Parameters
    ----------
    blocks : list of tuple
        The report's blocks; ``("img", file, caption)`` are the figures.

    Returns
    -------
    dict
    """
    files = [blk[1] for blk in blocks if blk[0] == "img"]
    return {f: i + 1 for i, f in enumerate(dict.fromkeys(files))}


def summary_table(claims: dict, numbers: dict[str, int] | None = None) -> Table:
    """One row per claim: claim, verdict, the number it rests on, the figure to look at.

    Parameters
    ----------
    claims : dict
        ``summary["claims"]`` (key -> ``title``, ``verdict``, ``headline``).
    numbers : dict, optional
        :func:`figure_numbers` of the report; without it the figure is named by its file
        (the terminal's copy of the table).

    Returns
    -------
    (head, rows)
    """
    head = ["claim", "verdict", "the number it rests on", "figure"]
    rows = []
    for key, c in claims.items():
        fig = FIGURES.get(key)
        if fig is None:
            where = "a table only"
        elif numbers is None:
            where = fig
        else:
            where = f"Figure {numbers[fig]}"
        rows.append([c["title"], c["verdict"], c.get("headline", ""), where])
    return head, rows


def summary_text(claims: dict) -> str:
    """The summary table for a terminal: per claim, its verdict and title on one line, the
    number it rests on and the figure file indented below (a four-column table would be
    some 300 characters wide).

    Parameters
    ----------
    claims : dict
        ``summary["claims"]``.

    Returns
    -------
    str
    """
    head, rows = summary_table(claims)
    width = max(len(r[1]) for r in rows) if rows else 0
    lines = []
    for title, verdict, number, figure in rows:
        lines.append(f"{verdict:<{width}}  {title}")
        where = "no figure: a table of the report" if figure == "a table only" else figure
        lines.append(f"{'':<{width}}  {number} ({where})")
    return "\n".join(lines)
