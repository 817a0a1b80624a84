"""Writing tables: markdown with footnotes, CSV, and the per-run CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from promptclip.io import atomic_write_text
from promptclip.reports.index import ResultIndex
from promptclip.reports.table_model import (
    AVERAGE_KEY,
    DAGGER,
    MAX_HEADER,
    MISSING,
    MISSING_NOTE,
    TRANSDUCTIVE_NOTE,
    Table,
    TableCell,
    TableRow,
)


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
