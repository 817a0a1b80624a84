"""Tables from summarised runs, written as markdown and CSV.

Two layouts:
* **long** (the default): one row per series (method, recipe, variant) and dataset, a few short columns
  (Base | New | HM; one column per shot count; Accuracy), and a summary table of the averages over datasets;
  it stays readable with ten methods and eleven datasets;
* **wide** (the papers' layout): one row per dataset, one column group per series.

Averaging rules (the ones that reproduce the published tables):
* a cell is the mean over seeds of one method on one dataset (± population std, or the 95% interval);
* base-to-novel: per dataset HM = 2BN / (B + N) of the seed means; the Average row holds the mean over datasets
  of B and of N, and its HM is HM(mean B, mean N), not the mean of the per-dataset HMs;
* few-shot and data-efficient: the Average row is the mean over datasets of each column;
* cross-dataset and domain generalisation: one row per method, the source dataset shown apart, then each
  target and the mean over the targets.
Numbers are rounded to two decimals only when written; every mean is computed from unrounded values. Every
table names the backbone its numbers come from (arch and the first 8 hex digits of the weights' sha256, as
results.json recorded them): in a note when all rows share one, in a column when they differ.
"""

from promptclip.reports.long import (  # noqa: F401  (the public names of the table layouts)
    AverageCells,
    RowCells,
    base2new_long_table,
    build_long_tables,
    generic_long_tables,
    report_tables,
    settings_long_table,
    summary_table,
    transfer_long_tables,
    without_averages,
)
from promptclip.reports.render import (  # noqa: F401  (the public names of the table layouts)
    fit_header,
    markdown_cell,
    render_csv,
    render_markdown,
    render_runs_csv,
    table_lines,
    write_csv_files,
)
from promptclip.reports.table_model import (  # noqa: F401  (the public names of the table layouts)
    AVERAGE_KEY,
    DAGGER,
    LAYOUTS,
    MAX_HEADER,
    MISSING,
    MISSING_NOTE,
    PROTOCOL_ORDER,
    TRANSDUCTIVE_NOTE,
    Layout,
    Spread,
    Table,
    TableCell,
    TableOptions,
    TableRow,
    average_cell,
    harmonic_cell,
    measured_cell,
    protocol_order,
)
from promptclip.reports.wide import (  # noqa: F401  (the public names of the table layouts)
    base2new_table,
    build_tables,
    generic_tables,
    per_series_tables,
    series_by_setting_table,
    series_summary_table,
    transfer_tables,
)
