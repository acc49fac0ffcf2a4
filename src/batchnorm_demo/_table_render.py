"""A report table, ``(head, rows)`` of strings, rendered as plain text, Markdown or HTML."""

from __future__ import annotations

import html

__all__ = ["Table", "render_html", "render_md", "render_text"]

Table = tuple[list[str], list[list[str]]]


def render_text(table: Table) -> str:
    """A table as aligned plain text (for the terminal).

    Parameters
    ----------
    table : (head, rows)

    Returns
    -------
    str
    """
    head, rows = table
    allrows = [head, *rows]
    widths = [max(len(r[i]) for r in allrows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in allrows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_md(table: Table) -> str:
    """A table as Markdown."""
    head, rows = table
    return "\n".join(
        [
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *["| " + " | ".join(r) + " |" for r in rows],
        ]
    )


def render_html(table: Table) -> str:
    """A table as an HTML ``<table>`` (cells escaped)."""
    head, rows = table
    esc = html.escape
    return (
        "<table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        + "</table>"
    )
