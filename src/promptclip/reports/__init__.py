"""Tables (markdown, CSV) and plots from run folders; see `promptclip report`."""

from promptclip.reports.collect import Collection, ResultIndex, collect_runs, harmonic_mean, read_result, summarize
from promptclip.reports.tables import Table, TableOptions, build_tables, render_csv, render_markdown

__all__ = [
    "Collection",
    "ResultIndex",
    "Table",
    "TableOptions",
    "build_tables",
    "collect_runs",
    "harmonic_mean",
    "read_result",
    "render_csv",
    "render_markdown",
    "summarize",
]
