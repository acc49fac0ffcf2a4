"""The benchmark's results as Markdown tables (lower is faster), goals marked."""

from __future__ import annotations

__all__ = ["format_bench"]


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


_LARGE_HEAD = [
    "case",
    "dtype",
    "pass",
    "copy ms (min)",
    "numpy / copy",
    "numba / copy min",
    "numba / copy median",
    "numba fresh out / copy",
    "torch / copy",
    "numba / torch min",
    "numba / torch median",
    "numba / NCHW twin",
    "goal",
]
_SMALL_HEAD = [
    "shape (float64)",
    "layer us min / median",
    "layer reuse_buffers us",
    "pure kernels us",
    "naive NumPy us",
    "torch autograd us",
    "layer / naive",
    "layer / torch",
    "goal",
]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(head: list[str]) -> list[str]:
    return [_row(head), "|" + "---|" * len(head)]


def _large_row(r: dict) -> str:
    """One large-array row: the ratios and the goal, met or missed."""
    g = r.get("goal")
    mark = "-"
    if g is not None and r.get("numba_vs_copy") is not None:
        mark = f"<= {g:g}: " + ("met" if r["numba_vs_copy"] <= g else "MISSED")
    keys = ["numpy_vs_copy", "numba_vs_copy", "numba_vs_copy_median", "numba_new_vs_copy"]
    keys += ["torch_vs_copy", "numba_vs_torch", "numba_vs_torch_median", "numba_vs_twin"]
    return _row(
        [r["case"], r["dtype"], r["pass"], f"{1e3 * r['copy_s']:.2f}"]
        + [_f(r.get(k)) for k in keys]
        + [mark]
    )


def _small_row(r: dict) -> str:
    """One small-array row: microseconds and the goals (no slower than naive, than torch)."""
    marks = []
    if r.get("layer_vs_naive") is not None and r["case"] == "(60, 100)":
        marks.append("<= naive: " + ("met" if r["layer_vs_naive"] <= 1.0 else "MISSED"))
    if r.get("layer_vs_torch") is not None:
        marks.append("<= torch: " + ("met" if r["layer_vs_torch"] <= 1.0 else "MISSED"))
    return _row(
        [
            r["case"],
            f"{r['layer_us']:.0f} / {r['layer_median_us']:.0f}",
            f"{r['layer_reuse_us']:.0f}",
            f"{r['pure_us']:.0f}",
            _f(r.get("naive_us"), 0),
            _f(r.get("torch_us"), 0),
            _f(r.get("layer_vs_naive")),
            _f(r.get("layer_vs_torch")),
            "; ".join(marks) or "-",
        ]
    )


def _footer(result: dict) -> str:
    """The machine, the repeats and the first-call compile times."""
    m = result["machine"]
    foot = (
        f"\n{m['cpus']} CPUs, {m['threads']} threads for numba and torch; "
        f"{m['platform']}; functions interleaved within each repeat, minimum and median "
        f"of {result['repeats']} repeats (half that for arrays over 50 MB, 30x that for "
        "small arrays)."
    )
    comp = result.get("compile_s")
    if comp and "error" not in comp:
        foot += (
            " First-call compile time (empty numba cache): "
            + ", ".join(f"{k} {v:.1f}s" for k, v in comp.items())
            + "."
        )
    return foot


def format_bench(result: dict) -> str:
    """Markdown tables of the ratios (lower is faster), min and median of the repeats.

    Parameters
    ----------
    result : dict
        What :func:`batchnorm_demo.bench.run_bench` returns.

    Returns
    -------
    str
        The large-array table, the small-array one (when measured) and a footer.
    """
    out = [
        "Large arrays (ratios to np.copyto into a preallocated array; numba writes into out=):",
        "",
        *_head(_LARGE_HEAD),
        *(_large_row(r) for r in result["rows"]),
    ]
    if result.get("small"):
        out += ["", "Small arrays (forward + backward, training mode, microseconds):", ""]
        out += _head(_SMALL_HEAD) + [_small_row(r) for r in result["small"]]
    return "\n".join(out) + "\n" + _footer(result)
