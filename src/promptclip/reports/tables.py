"""Paper-style tables from summarised runs, written as markdown and CSV.

Averaging rules (the ones that reproduce the published tables):
* a cell is the mean over seeds of one method on one dataset (± population std, or the 95% interval);
* base-to-novel: per dataset HM = 2BN / (B + N) of the seed means; the Average row holds the mean over datasets
  of B and of N, and its HM is HM(mean B, mean N), not the mean of the per-dataset HMs;
* few-shot and data-efficient: the Average row is the mean over datasets of each column;
* cross-dataset and domain generalisation: one row per method, the source dataset shown apart, then each
  target and the mean over the targets.
Numbers are rounded to two decimals only when written; every mean is computed from unrounded values.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from promptclip.io import atomic_write_text
from promptclip.protocols.spec import CROSS_DATASET_TARGETS, DG_TARGETS
from promptclip.reports.collect import (
    CellKey,
    Measurement,
    Metric,
    ResultIndex,
    Series,
    Setting,
    dataset_label,
    harmonic_mean,
    sort_datasets,
)

Spread = Literal["std", "ci95"]
DAGGER = "†"
MISSING = "—"
AVERAGE_KEY = "average"
TRANSDUCTIVE_NOTE = (
    f"{DAGGER} transductive: trained with the unlabelled test images of the evaluated data, "
    "so not comparable with the inductive columns."
)
MISSING_NOTE = f"{MISSING} no results for this method and dataset."
PROTOCOL_ORDER = ("base2new", "few_shot", "cross_dataset", "domain_generalization", "data_efficient")


@dataclass(frozen=True)
class TableOptions:
    metric: Metric = "accuracy"
    spread: Spread = "std"


@dataclass
class TableCell:
    mean: float | None = None
    spread: float | None = None
    """std or 95% interval over seeds; None for one seed and for derived cells (averages, HM)."""
    transductive: bool = False
    notes: tuple[str, ...] = ()


@dataclass
class TableRow:
    key: str
    """Machine name used in CSV (dataset or series name, `average`)."""
    label: str
    cells: list[TableCell]


@dataclass
class Table:
    name: str
    """File stem of the CSV and of the plots made from it."""
    title: str
    kind: str
    row_header: str
    columns: list[str]
    rows: list[TableRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Footnotes about the whole table (recipes, seeds)."""
    spread: Spread = "std"
    metric: Metric = "accuracy"
    series: list[str] = field(default_factory=list)
    """Series labels in column order (for plots)."""
    x_values: list[float] = field(default_factory=list)
    """Numeric value of each column where it has one (shots, ratio), for plots."""

    def row(self, key: str) -> TableRow:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(f"table {self.name} has no row {key!r}; rows: {[r.key for r in self.rows]}")

    def cell(self, row_key: str, column: str) -> TableCell:
        return self.row(row_key).cells[self.columns.index(column)]


# -- cells ---------------------------------------------------------------------------------------------------
def _seed_list(seeds: Sequence[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def measured_cell(measurement: Measurement | None, options: TableOptions, where: str) -> TableCell:
    if measurement is None:
        return TableCell()
    stat = measurement.stat
    spread = None if stat.n < 2 else (stat.std if options.spread == "std" else stat.ci95)
    notes = (f"{where}: missing {_seed_list(measurement.missing_seeds)}",) if measurement.missing_seeds else ()
    return TableCell(stat.mean, spread, measurement.transductive, notes)


def _merge_notes(cells: Iterable[TableCell]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(note for cell in cells for note in cell.notes))


def average_cell(cells: Sequence[TableCell], row_keys: Sequence[str], column: str) -> TableCell:
    """Mean over rows of the cells' means; a note names the rows left out when some are missing."""
    present = [(key, cell) for key, cell in zip(row_keys, cells, strict=True) if cell.mean is not None]
    if not present:
        return TableCell()
    mean = math.fsum(cell.mean for _, cell in present if cell.mean is not None) / len(present)
    notes = list(_merge_notes(cell for _, cell in present))
    if len(present) < len(cells):
        absent = [dataset_label(key) for key, cell in zip(row_keys, cells, strict=True) if cell.mean is None]
        notes.append(f"{column}: mean over {len(present)} of {len(cells)} (no {', '.join(absent)})")
    return TableCell(mean, None, any(cell.transductive for _, cell in present), tuple(notes))


def harmonic_cell(base: TableCell, new: TableCell) -> TableCell:
    if base.mean is None or new.mean is None:
        return TableCell()
    return TableCell(
        harmonic_mean(base.mean, new.mean), None, base.transductive or new.transductive, _merge_notes((base, new))
    )


def _column_of(rows: Sequence[TableRow], index: int) -> list[TableCell]:
    return [row.cells[index] for row in rows]


def _with_average_row(rows: list[TableRow], columns: Sequence[str]) -> list[TableRow]:
    keys = [row.key for row in rows]
    cells = [average_cell(_column_of(rows, i), keys, column) for i, column in enumerate(columns)]
    return [TableRow(AVERAGE_KEY, "Average", cells), *rows]


def _seed_note(index: ResultIndex, protocol: str) -> str:
    seeds = index.expected_seeds(protocol)
    return f"Seeds: {', '.join(str(s) for s in seeds)}."


def _recipe_note(index: ResultIndex, protocol: str, series: Iterable[Series]) -> str:
    parts = [f"{s.label}: {', '.join(index.recipes(protocol, s))}" for s in series]
    return "Recipes: " + "; ".join(parts) + "."


def _file_stem(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", part).strip("-") for part in parts if part)


# -- base-to-novel ------------------------------------------------------------------------------------------
def base2new_table(index: ResultIndex, setting: Setting, options: TableOptions) -> Table:
    protocol = "base2new"
    series_list = index.series(protocol, [setting])
    datasets = index.datasets(protocol, [setting])
    columns = [f"{s.label} {part}" for s in series_list for part in ("Base", "New", "HM")]
    rows = []
    for dataset in datasets:
        cells: list[TableCell] = []
        for series in series_list:
            key = CellKey(protocol, setting, series, dataset)
            where = f"{series.label} on {dataset_label(dataset)}"
            base = measured_cell(index.measure(key, "base", options.metric), options, where)
            new = measured_cell(index.measure(key, "new", options.metric), options, where)
            cells += [base, new, harmonic_cell(base, new)]
        rows.append(TableRow(dataset, dataset_label(dataset), cells))
    average = [average_cell(_column_of(rows, i), datasets, column) for i, column in enumerate(columns) if i % 3 != 2]
    average_cells: list[TableCell] = []
    for base, new in zip(average[0::2], average[1::2], strict=True):
        # The published rule: the HM of the averaged B and N, not the average of per-dataset HMs.
        average_cells += [base, new, harmonic_cell(base, new)]
    return Table(
        name=_file_stem(protocol, setting.slug),
        title=f"Base-to-novel generalisation ({setting.label})",
        kind=protocol,
        row_header="Dataset",
        columns=columns,
        rows=[TableRow(AVERAGE_KEY, "Average", average_cells), *rows],
        notes=[
            "HM = 2·Base·New / (Base + New) of the seed means; the Average row's HM is the HM of the "
            "averaged Base and New.",
            _seed_note(index, protocol),
            _recipe_note(index, protocol, series_list),
        ],
        spread=options.spread,
        metric=options.metric,
        series=[s.label for s in series_list],
    )


# -- few-shot and data-efficient: one table per series, one column per setting -------------------------------
def _setting_value(setting: Setting) -> float:
    if setting.ratio is not None:
        return setting.ratio
    return float(setting.shots) if setting.shots is not None and setting.shots > 0 else math.inf


def series_by_setting_table(
    index: ResultIndex,
    protocol: str,
    series: Series,
    settings: Sequence[Setting],
    evaluation: str,
    options: TableOptions,
) -> Table:
    datasets = index.datasets(protocol)
    columns = [s.label for s in settings]
    rows = []
    for dataset in datasets:
        where = f"{series.label} on {dataset_label(dataset)}"
        cells = []
        for setting in settings:
            measurement = index.measure(CellKey(protocol, setting, series, dataset), evaluation, options.metric)
            cells.append(measured_cell(measurement, options, f"{where} ({setting.label})"))
        rows.append(TableRow(dataset, dataset_label(dataset), cells))
    title = {"few_shot": "Few-shot classification", "data_efficient": "Data-efficient training"}.get(protocol, protocol)
    return Table(
        name=_file_stem(protocol, series.label),
        title=f"{title}: {series.label}",
        kind=protocol,
        row_header="Dataset",
        columns=columns,
        rows=_with_average_row(rows, columns),
        notes=[_seed_note(index, protocol), _recipe_note(index, protocol, [series])],
        spread=options.spread,
        metric=options.metric,
        series=[series.label],
        x_values=[_setting_value(s) for s in settings],
    )


def series_summary_table(
    protocol: str, per_series: Sequence[Table], settings: Sequence[Setting], split_by_selector: bool
) -> Table:
    """The Average rows of the per-series tables side by side (for data-efficient: one row per selector)."""
    rows = []
    if split_by_selector:
        ratios = sorted({s.ratio for s in settings if s.ratio is not None})
        columns = [f"{r:g}" for r in ratios]
        for table in per_series:
            average = table.row(AVERAGE_KEY).cells
            for selector in sorted({s.selector or "" for s in settings}):
                by_ratio = {s.ratio: cell for s, cell in zip(settings, average, strict=True) if s.selector == selector}
                label = f"{table.series[0]} / {selector}"
                rows.append(TableRow(label, label, [by_ratio.get(r, TableCell()) for r in ratios]))
        x_values = list(ratios)
    else:
        columns = [s.label for s in settings]
        rows = [TableRow(t.series[0], t.series[0], list(t.row(AVERAGE_KEY).cells)) for t in per_series]
        x_values = [_setting_value(s) for s in settings]
    title = {"few_shot": "Few-shot classification", "data_efficient": "Data-efficient training (ratio)"}.get(
        protocol, protocol
    )
    return Table(
        name=_file_stem(protocol, "average"),
        title=f"{title}: average over datasets",
        kind=f"{protocol}_summary",
        row_header="Method",
        columns=columns,
        rows=rows,
        notes=["Each value is the mean over datasets of the seed means (the Average rows below)."],
        spread=per_series[0].spread if per_series else "std",
        metric=per_series[0].metric if per_series else "accuracy",
        series=[t.series[0] for t in per_series],
        x_values=x_values,
    )


def per_series_tables(index: ResultIndex, protocol: str, evaluation: str, options: TableOptions) -> list[Table]:
    settings = index.settings(protocol)
    tables = [
        series_by_setting_table(index, protocol, series, settings, evaluation, options)
        for series in index.series(protocol)
    ]
    summary = series_summary_table(protocol, tables, settings, split_by_selector=protocol == "data_efficient")
    return [summary, *tables]


# -- cross-dataset and domain generalisation: one row per series ---------------------------------------------
def transfer_tables(
    index: ResultIndex, protocol: str, known_targets: Sequence[str], options: TableOptions
) -> list[Table]:
    tables = []
    for setting in index.settings(protocol):
        for source in index.datasets(protocol, [setting]):
            found = [k for k in index.evaluation_keys(protocol, setting, source) if k != "source"]
            targets = [t for t in known_targets if t in found] + sort_datasets(set(found) - set(known_targets))
            tables.append(_transfer_table(index, protocol, setting, source, targets, options))
    return tables


def _transfer_table(
    index: ResultIndex,
    protocol: str,
    setting: Setting,
    source: str,
    targets: Sequence[str],
    options: TableOptions,
) -> Table:
    series_list = [s for s in index.series(protocol, [setting]) if index.runs(CellKey(protocol, setting, s, source))]
    columns = [f"{dataset_label(source)} (source)", *(dataset_label(t) for t in targets), "Mean (targets)"]
    rows = []
    for series in series_list:
        key = CellKey(protocol, setting, series, source)
        # One run evaluates every target, so a missing seed is noted once per series, not per target.
        source_cell = measured_cell(index.measure(key, "source", options.metric), options, series.label)
        target_cells = [measured_cell(index.measure(key, t, options.metric), options, series.label) for t in targets]
        mean = average_cell(target_cells, list(targets), f"{series.label} mean")
        rows.append(TableRow(series.label, series.label, [source_cell, *target_cells, mean]))
    title = {"cross_dataset": "Cross-dataset transfer", "domain_generalization": "Domain generalisation"}.get(
        protocol, protocol
    )
    return Table(
        name=_file_stem(protocol, source, setting.slug),
        title=f"{title} from {dataset_label(source)} ({setting.label})",
        kind=protocol,
        row_header="Method",
        columns=columns,
        rows=rows,
        notes=[
            "Mean over the target datasets only; the source is shown apart.",
            _seed_note(index, protocol),
            _recipe_note(index, protocol, series_list),
        ],
        spread=options.spread,
        metric=options.metric,
        series=[s.label for s in series_list],
    )


# -- any other protocol: every evaluation of every series as a column --------------------------------------
def generic_tables(index: ResultIndex, protocol: str, options: TableOptions) -> list[Table]:
    tables = []
    for setting in index.settings(protocol):
        series_list = index.series(protocol, [setting])
        evaluations = index.evaluation_keys(protocol, setting)
        datasets = index.datasets(protocol, [setting])
        columns = [f"{s.label} {e}" for s in series_list for e in evaluations]
        rows = []
        for dataset in datasets:
            cells = [
                measured_cell(
                    index.measure(CellKey(protocol, setting, s, dataset), e, options.metric),
                    options,
                    f"{s.label} on {dataset_label(dataset)}",
                )
                for s in series_list
                for e in evaluations
            ]
            rows.append(TableRow(dataset, dataset_label(dataset), cells))
        tables.append(
            Table(
                name=_file_stem(protocol, setting.slug),
                title=f"{protocol} ({setting.label})",
                kind=protocol,
                row_header="Dataset",
                columns=columns,
                rows=_with_average_row(rows, columns),
                notes=[_seed_note(index, protocol), _recipe_note(index, protocol, series_list)],
                spread=options.spread,
                metric=options.metric,
                series=[s.label for s in series_list],
            )
        )
    return tables


def build_tables(index: ResultIndex, options: TableOptions | None = None) -> list[Table]:
    """Every table the runs support, protocols in the papers' order."""
    options = options or TableOptions()
    builders: dict[str, Callable[[str], list[Table]]] = {
        "base2new": lambda p: [base2new_table(index, s, options) for s in index.settings(p)],
        "few_shot": lambda p: per_series_tables(index, p, "all", options),
        "data_efficient": lambda p: per_series_tables(index, p, "all", options),
        "cross_dataset": lambda p: transfer_tables(index, p, CROSS_DATASET_TARGETS, options),
        "domain_generalization": lambda p: transfer_tables(index, p, DG_TARGETS, options),
    }
    protocols = sorted(index.protocols(), key=lambda p: (*PROTOCOL_ORDER, p).index(p))
    tables: list[Table] = []
    for protocol in protocols:
        builder = builders.get(protocol, lambda p: generic_tables(index, p, options))
        tables += builder(protocol)
    return tables


# -- rendering -------------------------------------------------------------------------------------------------
def _number(value: float) -> str:
    return f"{value:.2f}"


@dataclass
class _Footnotes:
    """Numbers footnote texts in order of first use; the same text keeps its number."""

    texts: dict[str, int] = field(default_factory=dict)

    def mark(self, text: str) -> str:
        number = self.texts.setdefault(text, len(self.texts) + 1)
        return f"[{number}]"


def markdown_cell(cell: TableCell, footnotes: _Footnotes) -> str:
    if cell.mean is None:
        return MISSING
    text = _number(cell.mean)
    if cell.spread is not None:
        text += f" ± {_number(cell.spread)}"
    if cell.transductive:
        text += DAGGER
    return text + "".join(footnotes.mark(note) for note in cell.notes)


def _align(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        padded = [text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in pairs]
        lines.append("| " + " | ".join(padded) + " |")
        if n == 0:
            rule = [("-" * w) if i == 0 else ("-" * (w - 1) + ":") for i, w in enumerate(widths)]
            lines.append("| " + " | ".join(rule) + " |")
    return lines


def render_markdown(table: Table) -> str:
    footnotes = _Footnotes()
    header = [table.row_header, *table.columns]
    body = []
    for row in table.rows:
        label = f"**{row.label}**" if row.key == AVERAGE_KEY else row.label
        body.append([label, *(markdown_cell(cell, footnotes) for cell in row.cells)])
    spread = "population std" if table.spread == "std" else "95% interval (1.96·std/√n)"
    lines = [f"### {table.title}", "", *_align([header, *body]), ""]
    cells = [cell for row in table.rows for cell in row.cells]
    metric = "Accuracy" if table.metric == "accuracy" else "Mean per-class accuracy"
    legend = [f"{metric} (%), mean ± {spread} over seeds.", *table.notes]
    legend += [f"[{number}] {text}" for text, number in footnotes.texts.items()]
    if any(cell.mean is None for cell in cells):
        legend.append(MISSING_NOTE)
    if any(cell.transductive for cell in cells):
        legend.append(TRANSDUCTIVE_NOTE)
    lines += [f"- {text}" for text in legend]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    """One row per table row: the mean of each column, its spread in `<column> <std|ci95>`, then `notes`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = [table.row_header.lower()]
    for column in table.columns:
        header += [column, f"{column} {table.spread}"]
    writer.writerow([*header, "notes"])
    for row in table.rows:
        values = [row.key]
        notes: list[str] = []
        transductive = []
        for column, cell in zip(table.columns, row.cells, strict=True):
            values.append("" if cell.mean is None else _number(cell.mean))
            values.append("" if cell.spread is None else _number(cell.spread))
            transductive += [column] if cell.transductive else []
            notes += list(cell.notes)
        if transductive:
            notes.append(f"transductive: {', '.join(transductive)}")
        writer.writerow([*values, "; ".join(dict.fromkeys(notes))])
    return buffer.getvalue()


def render_runs_csv(index: ResultIndex, relative_to: Path | None = None) -> str:
    """Every run and evaluation with its integer counts, for analyses the tables do not cover."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "protocol",
            "setting",
            "dataset",
            "series",
            "recipe",
            "seed",
            "evaluation",
            "correct",
            "total",
            "accuracy",
            "macro_accuracy",
            "transductive",
            "path",
        ]
    )
    for key in sorted(index.cells, key=lambda k: (k.protocol, k.setting.sort_key, k.dataset, k.series.label)):
        for seed, run in sorted(index.cells[key].items()):
            path = run.path.parent
            if relative_to is not None and path.is_relative_to(relative_to):
                path = path.relative_to(relative_to)
            for name, counts in sorted(run.evaluations.items()):
                writer.writerow(
                    [
                        key.protocol,
                        key.setting.slug,
                        key.dataset,
                        key.series.label,
                        run.recipe,
                        seed,
                        name,
                        sum(counts.correct),
                        sum(counts.total),
                        f"{counts.accuracy:.4f}",
                        f"{counts.macro_accuracy:.4f}",
                        str(run.transductive).lower(),
                        path.as_posix(),
                    ]
                )
    return buffer.getvalue()


def write_csv_files(tables: Sequence[Table], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = []
    for table in tables:
        path = out_dir / f"{table.name}.csv"
        atomic_write_text(path, render_csv(table))
        paths.append(path)
    return paths
