"""The demo's reports: ``batchnorm demo``'s (:mod:`.write`, from the tables of :mod:`.tables`,
the figures of :mod:`.figures` and :mod:`.smoothness`, the marks of :mod:`.marks` and the
opening summary of :mod:`.summary`) and ``batchnorm sync-demo``'s (:mod:`.sync`)."""

from .tables import format_table, lr_sweep_table, main_table, render_text
from .write import pm, write_report

__all__ = ["format_table", "lr_sweep_table", "main_table", "pm", "render_text", "write_report"]
