"""Published numbers beside a report's own (`promptclip report --paper`).

The papers' numbers ship as package data, one JSON file per method or plug-in stack in `paper_numbers/`,
each naming its source (paper and table, or the repository figure) and how the values were obtained. For
every long table, each method's first row per dataset is followed by a **paper row** with the published
numbers, and every row gets a **Δ column** per number column: ours − paper, on our rows, where both exist.

* A dataset (or a method) the source has no number for shows a blank (—), never a zero.
* An average row compares like with like: when the source has every dataset the row averages, the paper
  value is computed over those datasets with the report's own rule (base-to-novel: the HM of the averaged
  Base and New); over the source's own 11 datasets it is the printed average. Otherwise the printed average
  is shown with a note, and no Δ.
* Base-to-novel and transfer numbers are 16-shot numbers: a table of another shot count gets blanks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from promptclip.protocols.spec import CROSS_DATASET_TARGETS
from promptclip.reports.collect import harmonic_mean
from promptclip.reports.table_model import AVERAGE_KEY, Table, TableCell, TableRow

FORMAT = "promptclip-paper-numbers/1"
PAPER_DATASETS = ("imagenet", *CROSS_DATASET_TARGETS)
"""The 11 datasets of the field's tables: every published average is over these."""
BASE2NEW_COLUMNS = {"Base": "base", "New": "new", "HM": "hm"}
PAPER_NOTE = (
    "Paper rows: the published numbers (ViT-B/16 on the field's datasets: another backbone and other data "
    "wherever this report's are not those); — where the source has no number for that method and dataset. "
    "Δ = ours − paper, on our rows, where both exist over the same datasets."
)


class PaperNumbersError(ValueError):
    """A paper-numbers file that cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class PaperResults:
    """One method's published numbers for one protocol."""

    method: str
    protocol: str
    source: str
    provenance: str
    columns: tuple[str, ...]
    """`base`, `new`, `hm` (base-to-novel) or shot counts `1`, `2`, ... (few-shot)."""
    datasets: Mapping[str, tuple[float, ...]]
    average: tuple[float, ...] | None
    """The printed average over `PAPER_DATASETS`."""
    shots: int | None = None
    """The shot count of the numbers, where the protocol has one setting (base-to-novel: 16)."""
    transductive: bool = False
    note: str = ""

    def value(self, dataset: str, column: str) -> float | None:
        values = self.datasets.get(dataset)
        return None if values is None or column not in self.columns else values[self.columns.index(column)]

    def average_over(self, datasets: Sequence[str], column: str) -> tuple[float | None, bool]:
        """(the paper's value for an average over `datasets`, whether it covers the same datasets)."""
        if column not in self.columns:
            return None, False
        if set(datasets) == set(PAPER_DATASETS) and self.average is not None:
            return self.average[self.columns.index(column)], True
        if datasets and all(d in self.datasets for d in datasets):
            if self.protocol == "base2new" and column == "hm":
                base, new = (self._mean(datasets, part) for part in ("base", "new"))
                return harmonic_mean(base, new), True
            return self._mean(datasets, column), True
        if self.average is not None:
            return self.average[self.columns.index(column)], False
        return None, False

    def _mean(self, datasets: Sequence[str], column: str) -> float:
        index = self.columns.index(column)
        return math.fsum(self.datasets[d][index] for d in datasets) / len(datasets)


@dataclass
class PaperNumbers:
    """Every shipped (or given) paper-numbers file: by (method, protocol)."""

    results: dict[tuple[str, str], PaperResults] = field(default_factory=dict)

    def get(self, method: str, protocol: str) -> PaperResults | None:
        return self.results.get((method, protocol))


# -- reading ------------------------------------------------------------------------------------------------------
def _field(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind):
        raise PaperNumbersError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    return value


def _numbers(value: Any, width: int, where: str) -> tuple[float, ...]:
    if (
        not isinstance(value, list)
        or len(value) != width
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 100 for v in value)
    ):
        raise PaperNumbersError(f"{where}: expected {width} accuracies in [0, 100] (one per column), got {value!r}")
    return tuple(float(v) for v in value)


def parse_paper_numbers(data: Any, where: str) -> list[PaperResults]:
    """The entries of one paper-numbers file (`where` names it in errors)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PaperNumbersError(f"{where}: not a paper-numbers file (expected an object with format {FORMAT!r})")
    method = _field(data, "method", str, where)
    entries = []
    for protocol, entry in _field(data, "protocols", dict, where).items():
        at = f"{where}: protocols.{protocol}"
        if not isinstance(entry, dict):
            raise PaperNumbersError(f"{at}: expected an object")
        columns = tuple(_field(entry, "columns", list, at))
        datasets = {
            name: _numbers(values, len(columns), f"{at}.datasets.{name}")
            for name, values in _field(entry, "datasets", dict, at).items()
        }
        average = entry.get("average")
        shots = entry.get("shots")
        if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool)):
            raise PaperNumbersError(f"{at}: field 'shots' must be an integer")
        entries.append(
            PaperResults(
                method=method,
                protocol=protocol,
                source=_field(entry, "source", str, at),
                provenance=_field(entry, "provenance", str, at),
                columns=tuple(str(c) for c in columns),
                datasets=datasets,
                average=None if average is None else _numbers(average, len(columns), f"{at}.average"),
                shots=shots,
                transductive=bool(entry.get("transductive", False)),
                note=str(entry.get("note", "")),
            )
        )
    return entries


def load_paper_numbers(folder: Path | Traversable | None = None) -> PaperNumbers:
    """Read every `*.json` of `folder` (default: the shipped `paper_numbers/`)."""
    root = folder if folder is not None else resources.files("promptclip.reports") / "paper_numbers"
    numbers = PaperNumbers()
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PaperNumbersError(f"{entry}: not valid JSON ({err}); fix or remove the file") from None
        for results in parse_paper_numbers(data, str(entry)):
            key = (results.method, results.protocol)
            if key in numbers.results:
                raise PaperNumbersError(f"{entry}: a second file for {results.method} {results.protocol}; keep one")
            numbers.results[key] = results
    return numbers


# -- the tables ---------------------------------------------------------------------------------------------------
def _table_shots(table: Table) -> int | None:
    """The shot count of a one-setting table: its file stem carries the setting (`base2new_shots16`)."""
    found = re.search(r"_shots(-?\d+)(?:_|$)", table.name)
    return int(found.group(1)) if found else None


def _paper_columns(table: Table) -> list[str | None]:
    """The source's column for each of the table's columns (None: the source has none)."""
    if table.protocol == "base2new":
        return [BASE2NEW_COLUMNS.get(column) for column in table.columns]
    if table.protocol == "few_shot" and len(table.x_values) == len(table.columns):
        return [str(int(x)) if math.isfinite(x) else None for x in table.x_values]
    return [None] * len(table.columns)


def _covered_datasets(tables: Iterable[Table]) -> dict[str, dict[str, list[str]]]:
    """Per table name and series: the datasets of its per-dataset rows (what its average row averages)."""
    covered: dict[str, dict[str, list[str]]] = {}
    for table in tables:
        per_series = covered.setdefault(table.name, {})
        for row in table.rows:
            per_dataset = not row.average and row.dataset not in ("", AVERAGE_KEY, "source")
            if per_dataset and any(cell.mean is not None for cell in row.cells):
                per_series.setdefault(row.series, []).append(row.dataset)
    return covered


def _paper_cells(
    results: PaperResults | None, row: TableRow, columns: Sequence[str | None], covered: Sequence[str] | None
) -> tuple[list[TableCell], list[bool]]:
    """The paper's cells for `row`'s dataset (or average), and whether each may be compared with ours."""
    cells, comparable = [], []
    for column in columns:
        value, same = None, False
        if results is not None and column is not None:
            if row.average or row.dataset == AVERAGE_KEY:
                value, same = results.average_over(covered or [], column)
            else:
                value = results.value(row.dataset, column)
                same = value is not None
        notes: tuple[str, ...] = ()
        if results is not None and value is not None and not same:
            notes = (
                f"{results.method} (paper): the source's average over its 11 datasets, not over the ones "
                "averaged here; no Δ.",
            )
        transductive = results is not None and results.transductive and value is not None
        cells.append(TableCell(value, None, transductive, notes))
        comparable.append(same)
    return cells, comparable


def _delta(ours: TableCell, paper: TableCell, comparable: bool) -> TableCell:
    if not comparable or ours.mean is None or paper.mean is None:
        return TableCell()
    return TableCell(ours.mean - paper.mean, None, ours.transductive or paper.transductive)


def with_paper_rows(table: Table, numbers: PaperNumbers, covered: Mapping[str, list[str]] | None = None) -> Table:
    """`table` (a long-layout table) with a paper row after each method's first row per dataset and a Δ column
    per number column. `covered`: per series, the datasets its average rows average (from the per-dataset
    table of the same setting)."""
    columns = _paper_columns(table)
    shots = _table_shots(table)
    backbone_at = table.extra_headers.index("Backbone") if "Backbone" in table.extra_headers else None
    rows: list[TableRow] = []
    shown: set[tuple[str, str]] = set()
    sources: dict[str, PaperResults] = {}
    missing: list[str] = []
    for row in table.rows:
        results = numbers.get(row.method, table.protocol)
        if results is not None and results.shots is not None and shots is not None and results.shots != shots:
            results = None  # numbers of another shot count say nothing about this table
        if results is not None:
            sources[row.method] = results
        elif row.method not in missing:
            missing.append(row.method)
        paper, comparable = _paper_cells(results, row, columns, (covered or {}).get(row.series))
        deltas = [_delta(o, p, c) for o, p, c in zip(row.cells, paper, comparable, strict=True)]
        rows.append(replace(row, cells=[*row.cells, *deltas]))
        if (row.method, row.dataset) in shown:
            continue
        shown.add((row.method, row.dataset))
        extra = list(row.extra)
        if backbone_at is not None:
            extra[backbone_at] = "ViT-B/16 (paper)"
        label = f"{row.method} (paper)"
        blank = [TableCell() for _ in table.columns]
        rows.append(
            TableRow(f"{row.key}|paper", label, [*paper, *blank], extra, label, row.method, row.dataset, row.average)
        )
    notes = [PAPER_NOTE]
    notes += [f"{method} (paper): {r.source}. {r.provenance} {r.note}".rstrip() for method, r in sources.items()]
    if missing:
        notes.append(f"No published numbers shipped for: {', '.join(missing)}.")
    if table.protocol in ("base2new",) and shots is not None and shots != 16:
        notes.append("The published base-to-novel numbers are 16-shot numbers: none is shown beside this setting.")
    return replace(
        table, columns=[*table.columns, *(f"Δ {c}" for c in table.columns)], rows=rows, notes=[*table.notes, *notes]
    )


def add_paper_rows(tables: Sequence[Table], numbers: PaperNumbers | None = None) -> list[Table]:
    """Every table of a long-layout report with its paper rows and Δ columns (see `with_paper_rows`). A summary
    table (`<name>_average`) learns which datasets each series averages from its per-dataset table."""
    numbers = numbers if numbers is not None else load_paper_numbers()
    covered = _covered_datasets(tables)
    return [with_paper_rows(t, numbers, covered.get(t.name.removesuffix("_average"), {})) for t in tables]
