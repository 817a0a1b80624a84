"""The long layout: one row per series (method, recipe, variant) and dataset, and a summary of the averages."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from promptclip.protocols.spec import CROSS_DATASET_TARGETS, DG_TARGETS
from promptclip.reports.collect import Setting, dataset_label, harmonic_mean, sort_datasets
from promptclip.reports.index import CellKey, ResultIndex
from promptclip.reports.series import Series
from promptclip.reports.table_model import (
    AVERAGE_KEY,
    Layout,
    Table,
    TableCell,
    TableOptions,
    TableRow,
    _file_stem,
    _recipe_note,
    _seed_note,
    average_cell,
    harmonic_cell,
    measured_cell,
    protocol_order,
)
from promptclip.reports.wide import _setting_value, build_tables

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
    for protocol in protocol_order(index):
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
