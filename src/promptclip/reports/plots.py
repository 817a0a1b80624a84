"""PNG plots of the report tables: few-shot curves and base/new bars.

matplotlib is an optional dependency (`pip install promptclip[report]`), imported only here and only when a
plot is drawn. Figures are drawn on the Agg canvas directly, without pyplot, so the process-wide backend of an
interactive session is never changed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promptclip.io import atomic_write_bytes
from promptclip.reports.tables import DAGGER, Table

INSTALL_HINT = "pip install promptclip[report]"
_DPI = 120


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported."""


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotsUnavailable(f"matplotlib is not installed, so no plots were drawn: {INSTALL_HINT}") from err
    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _legend_label(table: Table, series_index: int, columns_per_series: int) -> str:
    label = table.series[series_index]
    first = series_index * columns_per_series
    cells = [cell for row in table.rows for cell in row.cells[first : first + columns_per_series]]
    return label + (DAGGER if any(cell.transductive for cell in cells) else "")


# -- line plots (accuracy against shots or ratio) --------------------------------------------------------------
def _line(axes: Any, xs: Sequence[float], cells: Sequence[Any], label: str) -> None:
    pairs = zip(xs, cells, strict=True)
    points = [(x, c.mean, c.spread or 0.0) for x, c in pairs if c.mean is not None and math.isfinite(x)]
    if not points:
        return
    x, y, err = zip(*points, strict=True)
    axes.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=2, linewidth=1.5, label=label)


def _shot_axis(axes: Any, xs: Sequence[float], xlabel: str) -> None:
    finite = sorted({x for x in xs if math.isfinite(x)})
    if finite and min(finite) > 0 and len(finite) > 1:
        axes.set_xscale("log", base=2)
    axes.set_xticks(finite)
    axes.set_xticklabels([f"{x:g}" for x in finite])
    axes.set_xlabel(xlabel)
    axes.set_ylabel("accuracy (%)")
    axes.grid(True, alpha=0.3)


def few_shot_curves(tables: Sequence[Table], out_dir: Path) -> list[Path]:
    """Accuracy against shots, one line per method: a grid (Average + every dataset) and the Average alone."""
    per_series = [t for t in tables if t.kind == "few_shot"]
    if not per_series:
        return []
    panels = [(row.key, row.label) for row in per_series[0].rows]
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    grid = _figure(3.2 * columns, 2.7 * rows)
    for n, (key, label) in enumerate(panels):
        axes = grid.add_subplot(rows, columns, n + 1)
        for table in per_series:
            _line(axes, table.x_values, table.row(key).cells, _legend_label(table, 0, len(table.columns)))
        _shot_axis(axes, per_series[0].x_values, "shots per class")
        axes.set_title(label)
    grid.axes[0].legend(fontsize="small")
    grid.tight_layout()
    single = _figure(5.0, 3.6)
    axes = single.add_subplot(1, 1, 1)
    for table in per_series:
        _line(axes, table.x_values, table.row("average").cells, _legend_label(table, 0, len(table.columns)))
    _shot_axis(axes, per_series[0].x_values, "shots per class")
    axes.set_title("Few-shot accuracy, average over datasets")
    axes.legend(fontsize="small")
    return [_save(grid, out_dir / "few_shot_curves.png"), _save(single, out_dir / "few_shot_average.png")]


def data_efficient_curves(tables: Sequence[Table], out_dir: Path) -> list[Path]:
    """Average accuracy against the data ratio, one line per method and selector."""
    summary = next((t for t in tables if t.kind == "data_efficient_summary"), None)
    if summary is None or not summary.rows:
        return []
    figure = _figure(5.0, 3.6)
    axes = figure.add_subplot(1, 1, 1)
    for row in summary.rows:
        _line(axes, summary.x_values, row.cells, row.label)
    _shot_axis(axes, summary.x_values, "ratio of the training data")
    axes.set_title("Data-efficient training, average over datasets")
    axes.legend(fontsize="small")
    return [_save(figure, out_dir / "data_efficient_average.png")]


# -- grouped bars (base / new / HM per dataset) ----------------------------------------------------------------
def base_new_bars(table: Table, out_dir: Path) -> Path:
    """Three panels (Base, New, HM); in each, one group of bars per dataset and one bar per method."""
    labels = [row.label for row in table.rows]
    count = len(table.series)
    width = 0.8 / max(count, 1)
    figure = _figure(min(24.0, max(7.0, 0.3 * len(labels) * max(count, 1) + 3.0)), 8.0)
    for panel, part in enumerate(("Base", "New", "HM")):
        axes = figure.add_subplot(3, 1, panel + 1)
        for s in range(count):
            column = 3 * s + panel
            positions = [i + (s - (count - 1) / 2) * width for i in range(len(labels))]
            heights = [row.cells[column].mean or 0.0 for row in table.rows]
            axes.bar(positions, heights, width=width, label=_legend_label(table, s, 3))
        axes.set_ylabel(f"{part} (%)")
        axes.set_xticks(range(len(labels)))
        axes.set_xticklabels(labels if panel == 2 else [""] * len(labels), rotation=30, ha="right")
        axes.grid(True, axis="y", alpha=0.3)
    figure.axes[0].set_title(table.title)
    figure.axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return _save(figure, out_dir / f"{table.name}.png")


def write_plots(tables: Sequence[Table], out_dir: str | Path) -> list[Path]:
    """Every plot the tables support; raises PlotsUnavailable when matplotlib is missing."""
    out_dir = Path(out_dir)
    paths = [base_new_bars(t, out_dir) for t in tables if t.kind == "base2new" and t.series]
    paths += few_shot_curves(tables, out_dir)
    paths += data_efficient_curves(tables, out_dir)
    return paths
