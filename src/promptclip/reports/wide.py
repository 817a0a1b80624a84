"""The papers' wide layout: one row per dataset, one column group per series."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from promptclip.protocols.spec import CROSS_DATASET_TARGETS, DG_TARGETS
from promptclip.reports.collect import Setting, dataset_label, sort_datasets
from promptclip.reports.index import CellKey, ResultIndex
from promptclip.reports.series import Series
from promptclip.reports.table_model import (
    AVERAGE_KEY,
    Table,
    TableCell,
    TableOptions,
    TableRow,
    _column_of,
    _file_stem,
    _seed_note,
    _series_notes,
    _with_average_row,
    average_cell,
    harmonic_cell,
    measured_cell,
    protocol_order,
)


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
    for protocol in protocol_order(index):
        builder = builders.get(protocol, lambda p: generic_tables(index, p, options))
        tables += builder(protocol)
    return tables
