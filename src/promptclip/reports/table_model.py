"""The table model shared by every layout: cells, rows, tables, options and the cell arithmetic (means over
seeds, averages over datasets, harmonic means)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from promptclip.reports.collect import Measurement, Metric, Setting, dataset_label, harmonic_mean
from promptclip.reports.index import ResultIndex
from promptclip.reports.series import Series

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


def protocol_order(index: ResultIndex) -> list[str]:
    """The protocols of `index` in the papers' order (others after them)."""
    return sorted(index.protocols(), key=lambda p: (*PROTOCOL_ORDER, p).index(p))
