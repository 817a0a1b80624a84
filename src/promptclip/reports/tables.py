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
Layout = Literal["long", "wide"]
LAYOUTS: tuple[Layout, ...] = ("long", "wide")
MAX_HEADER = 40
"""No column header is longer (longer ones are cut with an ellipsis)."""
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
    extra: list[str] = field(default_factory=list)
    """Text columns after the label (long tables: the dataset, and the backbone where rows differ in it)."""
    series: str = ""
    method: str = ""
    dataset: str = ""
    """Long tables: the dataset's key, `average` for an average row, `source` for a transfer's source."""
    average: bool = False


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
    x_groups: list[str] = field(default_factory=list)
    """The line each column belongs to where a series draws several (data-efficient: the selector)."""
    extra_headers: list[str] = field(default_factory=list)
    layout: str = "wide"
    protocol: str = ""
    chance: dict[str, list[float | None]] = field(default_factory=dict)
    """Chance accuracy (100 / classes) per dataset key (and `average`) and column, for plots."""

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
    """The recipes of each method (variants of one method share its entry)."""
    recipes: dict[str, set[str]] = {}
    for s in series:
        name = s.method if s.recipe is None else f"{s.method}/{s.recipe}"
        recipes.setdefault(name, set()).update(index.recipes(protocol, s))
    return "Recipes: " + "; ".join(f"{name}: {', '.join(sorted(names))}" for name, names in recipes.items()) + "."


def _series_backbones(index: ResultIndex, protocol: str, series: Series, settings: Iterable[Setting] | None) -> str:
    return " / ".join(b.label for b in index.backbones(index.series_runs(protocol, series, settings)))


def _backbone_note(
    index: ResultIndex, protocol: str, series: Sequence[Series], settings: Iterable[Setting] | None
) -> str:
    settings = None if settings is None else list(settings)
    per_series = {s.label: _series_backbones(index, protocol, s, settings) for s in series}
    if len(set(per_series.values())) <= 1:
        return f"Backbone: {next(iter(per_series.values()), 'none')}."
    return "Backbones: " + "; ".join(f"{label}: {text}" for label, text in per_series.items()) + "."


def _series_notes(
    index: ResultIndex, protocol: str, series: Sequence[Series], settings: Iterable[Setting] | None = None
) -> list[str]:
    return [_recipe_note(index, protocol, series), _backbone_note(index, protocol, series, settings)]


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
            *_series_notes(index, protocol, series_list, [setting]),
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
        notes=[_seed_note(index, protocol), *_series_notes(index, protocol, [series])],
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
            *_series_notes(index, protocol, series_list),
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
                notes=[_seed_note(index, protocol), *_series_notes(index, protocol, series_list)],
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
    tables: list[Table] = []
    for protocol in _protocol_order(index):
        builder = builders.get(protocol, lambda p: generic_tables(index, p, options))
        tables += builder(protocol)
    return tables


# -- long form: one row per series and dataset ------------------------------------------------------------------
RowCells = Callable[[Series, str], list[TableCell]]
AverageCells = Callable[[Series, Sequence[list[TableCell]], Sequence[str]], list[TableCell]]


def _ordered(series: Sequence[Series], order: Sequence[str]) -> list[Series]:
    """Series in `order` of their method (others after, alphabetically), variants of a method together."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(series, key=lambda s: (rank.get(s.method, len(rank)), *s.sort_key))


def _mean_columns(columns: Sequence[str]) -> AverageCells:
    """Average rows that hold the mean over datasets of each column."""

    def average(owner: Series, rows: Sequence[list[TableCell]], keys: Sequence[str]) -> list[TableCell]:
        return [
            average_cell([row[i] for row in rows], keys, f"{owner.label} {column}") for i, column in enumerate(columns)
        ]

    return average


def _row_backbone(
    index: ResultIndex, protocol: str, settings: Sequence[Setting], series: Series, dataset: str | None
) -> str:
    """The backbones of the runs one long row summarises (`dataset` None: an average row, all the series' runs)."""
    if dataset is None:
        runs = index.series_runs(protocol, series, settings)
    else:
        runs = [run for s in settings for run in index.runs(CellKey(protocol, s, series, dataset)).values()]
    return " / ".join(b.label for b in index.backbones(runs))


def _long_rows(
    index: ResultIndex,
    protocol: str,
    settings: Sequence[Setting],
    datasets: Sequence[str],
    row_cells: RowCells,
    average_cells: AverageCells | None,
    order: Sequence[str] = (),
    dataset_labels: dict[str, str] | None = None,
    averaged: Sequence[str] | None = None,
    average_label: str = "Average",
    backbone_dataset: str | None = None,
) -> list[TableRow]:
    """Per series (in `order`): its average row (when `average_cells` is given), then a row per dataset it has
    results for. `averaged`: the datasets the average covers (default: all); `backbone_dataset`: the dataset
    whose runs a row's backbone comes from (transfer: the source) instead of the row's own."""
    labels = dataset_labels or {}
    averaged = list(datasets) if averaged is None else list(averaged)
    rows: list[TableRow] = []
    for series in _ordered(index.series(protocol, settings), order):
        per_dataset = {d: row_cells(series, d) for d in datasets}
        present = [d for d in datasets if any(cell.mean is not None for cell in per_dataset[d])]
        if not present:
            continue

        def row(dataset: str, cells: list[TableCell], label: str, series: Series = series) -> TableRow:
            average = dataset == AVERAGE_KEY
            source = backbone_dataset or (None if average else dataset)
            extra = [label, _row_backbone(index, protocol, settings, series, source)]
            key = f"{series.label}|{dataset}"
            return TableRow(key, series.label, cells, extra, series.label, series.method, dataset, average)

        if average_cells is not None:
            rows.append(
                row(AVERAGE_KEY, average_cells(series, [per_dataset[d] for d in averaged], averaged), average_label)
            )
        rows += [row(d, per_dataset[d], labels.get(d, dataset_label(d))) for d in present]
    return rows


def _finish_long(table: Table, index: ResultIndex, series: Sequence[Series]) -> Table:
    """The backbone in a column when rows differ in it, else in a note; the seeds and recipes in notes."""
    backbones = {row.extra[1] for row in table.rows}
    if len(backbones) > 1:
        table.extra_headers.append("Backbone")
    else:
        table.notes.append(f"Backbone: {next(iter(backbones), 'none')}.")
        for row in table.rows:
            del row.extra[1:]
    table.notes += [_seed_note(index, table.protocol), _recipe_note(index, table.protocol, series)]
    return table


def _long_table(
    index: ResultIndex,
    protocol: str,
    settings: Sequence[Setting],
    name: str,
    title: str,
    columns: list[str],
    rows: list[TableRow],
    options: TableOptions,
    notes: Sequence[str] = (),
    **fields: object,
) -> Table:
    shown = list(dict.fromkeys(row.series for row in rows))
    series = sorted(
        (s for s in index.series(protocol, settings) if s.label in shown), key=lambda s: shown.index(s.label)
    )
    table = Table(
        name=name,
        title=title,
        kind=protocol,
        row_header="Method",
        columns=columns,
        rows=rows,
        notes=list(notes),
        spread=options.spread,
        metric=options.metric,
        series=shown,
        extra_headers=["Dataset"],
        layout="long",
        protocol=protocol,
        **fields,  # type: ignore[arg-type]
    )
    return _finish_long(table, index, series)


def _chance(classes: int | None) -> float | None:
    return None if not classes else 100.0 / classes


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def _chance_rows(per_dataset: dict[str, list[float | None]], average: bool) -> dict[str, list[float | None]]:
    chance = dict(per_dataset)
    if average and per_dataset:
        width = len(next(iter(per_dataset.values())))
        chance[AVERAGE_KEY] = [_mean_or_none(v[i] for v in per_dataset.values()) for i in range(width)]
    return chance


def base2new_long_table(
    index: ResultIndex, setting: Setting, options: TableOptions, order: Sequence[str] = (), title: str | None = None
) -> Table:
    protocol, columns = "base2new", ["Base", "New", "HM"]
    datasets = index.datasets(protocol, [setting])

    def row_cells(series: Series, dataset: str) -> list[TableCell]:
        key = CellKey(protocol, setting, series, dataset)
        where = f"{series.label} on {dataset_label(dataset)}"
        base = measured_cell(index.measure(key, "base", options.metric), options, where)
        new = measured_cell(index.measure(key, "new", options.metric), options, where)
        return [base, new, harmonic_cell(base, new)]

    def average(series: Series, rows: Sequence[list[TableCell]], keys: Sequence[str]) -> list[TableCell]:
        # The published rule: the HM of the averaged Base and New, not the average of per-dataset HMs.
        base = average_cell([row[0] for row in rows], keys, f"{series.label} Base")
        new = average_cell([row[1] for row in rows], keys, f"{series.label} New")
        return [base, new, harmonic_cell(base, new)]

    several = len(datasets) > 1
    rows = _long_rows(index, protocol, [setting], datasets, row_cells, average if several else None, order)
    chance: dict[str, list[float | None]] = {}
    for dataset in datasets:
        base, new = (_chance(index.class_count(protocol, setting, dataset, e)) for e in ("base", "new"))
        chance[dataset] = [base, new, None]
    chance = _chance_rows(chance, several)
    for values in chance.values():
        values[2] = harmonic_mean(values[0], values[1]) if values[0] is not None and values[1] is not None else None
    return _long_table(
        index,
        protocol,
        [setting],
        _file_stem(protocol, setting.slug),
        title or f"Base-to-novel generalisation ({setting.label})",
        columns,
        rows,
        options,
        notes=[
            "HM = 2·Base·New / (Base + New) of the seed means; over datasets, HM is the HM of the averaged "
            "Base and New (not the mean of the per-dataset HMs)."
        ],
        chance=chance,
    )


def settings_long_table(
    index: ResultIndex, protocol: str, evaluation: str, options: TableOptions, order: Sequence[str] = ()
) -> Table:
    """Few-shot and data-efficient: one column per setting (shot count, or selector and ratio)."""
    settings = index.settings(protocol)
    datasets = index.datasets(protocol)
    columns = [s.label for s in settings]

    def row_cells(series: Series, dataset: str) -> list[TableCell]:
        where = f"{series.label} on {dataset_label(dataset)}"
        return [
            measured_cell(
                index.measure(CellKey(protocol, s, series, dataset), evaluation, options.metric),
                options,
                f"{where} ({s.label})",
            )
            for s in settings
        ]

    several = len(datasets) > 1
    average = _mean_columns(columns) if several else None
    rows = _long_rows(index, protocol, settings, datasets, row_cells, average, order)
    chance = {d: [_chance(index.class_count(protocol, None, d, evaluation))] * len(columns) for d in datasets}
    title = {"few_shot": "Few-shot classification", "data_efficient": "Data-efficient training"}.get(protocol, protocol)
    return _long_table(
        index,
        protocol,
        settings,
        protocol,
        title,
        columns,
        rows,
        options,
        x_values=[_setting_value(s) for s in settings],
        x_groups=[s.selector or "" for s in settings],
        chance=_chance_rows(chance, several),
    )


def transfer_long_tables(
    index: ResultIndex, protocol: str, known_targets: Sequence[str], options: TableOptions, order: Sequence[str] = ()
) -> list[Table]:
    """Cross-dataset and domain generalisation: per series, the mean over the targets, the source, then each
    target, in one Accuracy column."""
    title = {"cross_dataset": "Cross-dataset transfer", "domain_generalization": "Domain generalisation"}.get(
        protocol, protocol
    )
    tables = []
    for setting in index.settings(protocol):
        for source in index.datasets(protocol, [setting]):
            found = [k for k in index.evaluation_keys(protocol, setting, source) if k != "source"]
            targets = [t for t in known_targets if t in found] + sort_datasets(set(found) - set(known_targets))

            def row_cells(series: Series, evaluation: str, source: str = source, setting: Setting = setting) -> list:
                key = CellKey(protocol, setting, series, source)
                return [measured_cell(index.measure(key, evaluation, options.metric), options, series.label)]

            average = _mean_columns(["mean of the targets"]) if len(targets) > 1 else None
            labels = {"source": f"{dataset_label(source)} (source)"}
            rows = _long_rows(
                index,
                protocol,
                [setting],
                ["source", *targets],
                row_cells,
                average,
                order,
                dataset_labels=labels,
                averaged=targets,
                average_label="Mean (targets)",
                backbone_dataset=source,
            )
            tables.append(
                _long_table(
                    index,
                    protocol,
                    [setting],
                    _file_stem(protocol, source, setting.slug),
                    f"{title} from {dataset_label(source)} ({setting.label})",
                    ["Accuracy"],
                    rows,
                    options,
                    notes=["Mean (targets): the mean over the target datasets only; the source is shown apart."],
                )
            )
    return tables


def generic_long_tables(
    index: ResultIndex, protocol: str, options: TableOptions, order: Sequence[str] = ()
) -> list[Table]:
    tables = []
    for setting in index.settings(protocol):
        evaluations = index.evaluation_keys(protocol, setting)
        datasets = index.datasets(protocol, [setting])

        def row_cells(series: Series, dataset: str, setting: Setting = setting, evaluations: list = evaluations):
            key = CellKey(protocol, setting, series, dataset)
            where = f"{series.label} on {dataset_label(dataset)}"
            return [measured_cell(index.measure(key, e, options.metric), options, where) for e in evaluations]

        several = len(datasets) > 1
        average = _mean_columns(evaluations) if several else None
        rows = _long_rows(index, protocol, [setting], datasets, row_cells, average, order)
        tables.append(
            _long_table(
                index,
                protocol,
                [setting],
                _file_stem(protocol, setting.slug),
                f"{protocol} ({setting.label})",
                list(evaluations),
                rows,
                options,
            )
        )
    return tables


def build_long_tables(
    index: ResultIndex, options: TableOptions | None = None, order: Sequence[str] = ()
) -> list[Table]:
    """Every long table the runs support (average rows inline), protocols in the papers' order."""
    options = options or TableOptions()
    builders: dict[str, Callable[[str], list[Table]]] = {
        "base2new": lambda p: [base2new_long_table(index, s, options, order) for s in index.settings(p)],
        "few_shot": lambda p: [settings_long_table(index, p, "all", options, order)],
        "data_efficient": lambda p: [settings_long_table(index, p, "all", options, order)],
        "cross_dataset": lambda p: transfer_long_tables(index, p, CROSS_DATASET_TARGETS, options, order),
        "domain_generalization": lambda p: transfer_long_tables(index, p, DG_TARGETS, options, order),
    }
    tables: list[Table] = []
    for protocol in _protocol_order(index):
        builder = builders.get(protocol, lambda p: generic_long_tables(index, p, options, order))
        tables += builder(protocol)
    return tables


def summary_table(table: Table) -> Table | None:
    """The average rows of a long table as a table of their own (one row per series), None when it has none.
    A transfer table's summary shows each series' source accuracy beside its mean over the targets."""
    averages = [row for row in table.rows if row.average]
    if not averages:
        return None
    keep_backbone = "Backbone" in table.extra_headers
    transfer = table.columns == ["Accuracy"]
    rows = []
    for row in averages:
        cells = list(row.cells)
        columns = list(table.columns)
        if transfer:
            source = next((r for r in table.rows if r.series == row.series and r.dataset == "source"), None)
            cells = [source.cells[0] if source else TableCell(), *row.cells]
        extra = row.extra[1:] if keep_backbone else []
        rows.append(TableRow(row.series, row.label, cells, extra, row.series, row.method, AVERAGE_KEY))
    if transfer:
        source_label = next((r.extra[0] for r in table.rows if r.dataset == "source"), "Source")
        columns = [source_label, "Mean (targets)"]
    what = "mean over the target datasets" if transfer else "average over datasets"
    return Table(
        name=f"{table.name}_average",
        title=f"{table.title}: {what}",
        kind=f"{table.kind}_summary",
        row_header="Method",
        columns=columns,
        rows=rows,
        notes=[n for n in table.notes if not n.startswith("Seeds:")],
        spread=table.spread,
        metric=table.metric,
        series=list(table.series),
        x_values=list(table.x_values) if not transfer else [],
        extra_headers=["Backbone"] if keep_backbone else [],
        layout="long",
        protocol=table.protocol,
    )


def without_averages(table: Table) -> Table:
    """The long table's rows per dataset only (its averages go to `summary_table`)."""
    from dataclasses import replace

    return replace(table, rows=[row for row in table.rows if not row.average])


def report_tables(index: ResultIndex, options: TableOptions | None = None, layout: Layout = "long") -> list[Table]:
    """The tables `promptclip report` writes: long (per protocol and setting, the summary of averages, then
    one row per series and dataset) or the papers' wide tables."""
    if layout == "wide":
        return build_tables(index, options)
    tables: list[Table] = []
    for table in build_long_tables(index, options):
        summary = summary_table(table)
        tables += [summary, without_averages(table)] if summary is not None else [table]
    return tables


def _protocol_order(index: ResultIndex) -> list[str]:
    return sorted(index.protocols(), key=lambda p: (*PROTOCOL_ORDER, p).index(p))


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


def fit_header(text: str, limit: int = MAX_HEADER) -> str:
    """A column header of at most `limit` characters (cut with an ellipsis)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _align(rows: Sequence[Sequence[str]], text_columns: int = 1) -> list[str]:
    """Markdown table lines, columns padded; the first `text_columns` left-aligned, the numbers right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        padded = [text.ljust(w) if i < text_columns else text.rjust(w) for i, (text, w) in pairs]
        lines.append("| " + " | ".join(padded) + " |")
        if n == 0:
            rule = [("-" * w) if i < text_columns else ("-" * (w - 1) + ":") for i, w in enumerate(widths)]
            lines.append("| " + " | ".join(rule) + " |")
    return lines


def _is_average(row: TableRow) -> bool:
    return row.average or row.key == AVERAGE_KEY


def table_lines(table: Table) -> tuple[list[str], list[str]]:
    """The aligned markdown lines of a table and its legend (the notes, footnotes and marks)."""
    footnotes = _Footnotes()
    header = [fit_header(text) for text in (table.row_header, *table.extra_headers, *table.columns)]
    body = []
    for row in table.rows:
        texts = [row.label, *row.extra]
        if _is_average(row):
            texts = [f"**{text}**" for text in texts]
        body.append([*texts, *(markdown_cell(cell, footnotes) for cell in row.cells)])
    spread = "population std" if table.spread == "std" else "95% interval (1.96·std/√n)"
    cells = [cell for row in table.rows for cell in row.cells]
    metric = "Accuracy" if table.metric == "accuracy" else "Mean per-class accuracy"
    legend = [f"{metric} (%), mean ± {spread} over seeds.", *table.notes]
    legend += [f"[{number}] {text}" for text, number in footnotes.texts.items()]
    if any(cell.mean is None for cell in cells):
        legend.append(MISSING_NOTE)
    if any(cell.transductive for cell in cells):
        legend.append(TRANSDUCTIVE_NOTE)
    return _align([header, *body], 1 + len(table.extra_headers)), legend


def render_markdown(table: Table) -> str:
    lines, legend = table_lines(table)
    return "\n".join([f"### {table.title}", "", *lines, "", *(f"- {text}" for text in legend)]) + "\n"


def render_csv(table: Table) -> str:
    """One row per table row: its text columns (wide tables: the row key; long tables: the series, the
    dataset's key and the backbone where shown), the mean of each column, its spread in `<column> <std|ci95>`,
    then `notes`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if table.layout == "long":
        header = ["method", *(text.lower() for text in table.extra_headers)]
    else:
        header = [table.row_header.lower()]
    for column in table.columns:
        header += [column, f"{column} {table.spread}"]
    writer.writerow([*header, "notes"])
    for row in table.rows:
        if table.layout == "long":
            extra = list(row.extra)
            if table.extra_headers[:1] == ["Dataset"]:
                extra[0] = row.dataset
            values = [row.series or row.label, *extra]
        else:
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


def render_runs_csv(index: ResultIndex) -> str:
    """Every run and evaluation with its integer counts, backbone and identity fingerprints, for analyses the
    tables do not cover (`path`: the run folder inside `runs_dir`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "protocol",
            "setting",
            "dataset",
            "series",
            "method",
            "recipe",
            "seed",
            "evaluation",
            "classes",
            "correct",
            "total",
            "accuracy",
            "macro_accuracy",
            "transductive",
            "backbone",
            "weights_sha256",
            "run_id",
            "variant_id",
            "runs_dir",
            "path",
        ]
    )
    for key in sorted(index.cells, key=lambda k: (k.protocol, k.setting.sort_key, k.dataset, k.series.label)):
        for seed, run in sorted(index.cells[key].items()):
            for name, evaluation in sorted(run.evaluations.items()):
                writer.writerow(
                    [
                        key.protocol,
                        key.setting.slug,
                        key.dataset,
                        key.series.label,
                        run.method,
                        run.recipe,
                        seed,
                        name,
                        len(evaluation.total),
                        sum(evaluation.correct),
                        sum(evaluation.total),
                        f"{evaluation.accuracy:.4f}",
                        f"{evaluation.macro_accuracy:.4f}",
                        str(run.transductive).lower(),
                        run.backbone.arch,
                        run.backbone.weights_sha256 or ("random" if run.backbone.weights_recorded else ""),
                        run.run_id,
                        run.results.variant_id,
                        run.root.as_posix(),
                        run.relative_folder.as_posix(),
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
