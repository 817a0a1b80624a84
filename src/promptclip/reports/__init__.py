"""Tables (markdown, CSV) and plots from run folders; see `promptclip report`."""

from promptclip.reports.collect import (
    Backbone,
    Collection,
    RunResult,
    collect_runs,
    harmonic_mean,
    read_result,
    summarize,
)
from promptclip.reports.index import ResultIndex
from promptclip.reports.series import Series
from promptclip.reports.tables import (
    Table,
    TableOptions,
    build_long_tables,
    build_tables,
    render_csv,
    render_markdown,
    report_tables,
)

__all__ = [
    "Backbone",
    "Collection",
    "ResultIndex",
    "RunResult",
    "Series",
    "Table",
    "TableOptions",
    "build_long_tables",
    "build_tables",
    "collect_runs",
    "harmonic_mean",
    "read_result",
    "render_csv",
    "render_markdown",
    "report_tables",
    "summarize",
]
