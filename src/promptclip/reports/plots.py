"""PNG plots of the report: base/new bars, accuracy curves against shots or data ratio, confusion matrices.

What is drawn is computed first, without matplotlib (`bar_panels`, `curve_panels`, `confusion_panels`), so
it can be checked as data: every bar and point carries its seed error bar (the table's spread over seeds), and
every panel its reference lines: chance (100 / number of classes of that evaluation) and zero-shot (the
`zeroshot` method's value, when the results hold it; it is drawn as a line, not as a bar or curve).
Base-to-novel results that stack plug-ins on a method (coop, coop+dept, coop+dpc) also get the plug-in
comparison (`plugin_panels`): a panel per method, a group of Base/New/HM bars per series.

matplotlib is an optional dependency (`pip install promptclip[report]`), imported only here and only when a
plot is drawn. Figures are drawn on the Agg canvas directly, without pyplot, so the process-wide backend of an
interactive session is never changed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from promptclip.io import atomic_write_bytes
from promptclip.reports.collect import ZEROSHOT, RunResult
from promptclip.reports.index import ResultIndex
from promptclip.reports.tables import AVERAGE_KEY, DAGGER, Table, TableRow

INSTALL_HINT = "pip install promptclip[report]"
CONFUSION_FOLDER = "confusion"
MAX_LABELLED_CLASSES = 50
"""Above this many classes a confusion matrix is drawn without per-cell counts and class names."""
MAX_DRAWN_CLASSES = 200
"""Above this many classes a confusion matrix is not drawn (its counts stay in results.json)."""
_DPI = 120
_CHANCE_STYLE: dict[str, Any] = {"color": "0.45", "linestyle": ":"}
# One style per zero-shot line (several when the results hold zeroshot runs of several backbones).
_ZEROSHOT_STYLES: tuple[dict[str, Any], ...] = (
    {"color": "black", "linestyle": "--"},
    {"color": "tab:red", "linestyle": "-."},
    {"color": "tab:green", "linestyle": (0, (5, 1))},
    {"color": "tab:purple", "linestyle": (0, (3, 1, 1, 1, 1, 1))},
)


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported."""


# -- what is drawn -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """A horizontal reference line: `chance` (100 / classes) or `zero-shot` (a zeroshot series' value)."""

    kind: Literal["chance", "zero-shot"]
    label: str
    value: float


@dataclass(frozen=True)
class Bar:
    series: str
    value: float | None
    error: float
    """The seed spread (std, or the 95% interval); 0 for one seed and for derived values (averages, HM)."""


@dataclass(frozen=True)
class BarGroup:
    label: str
    """The dataset (or Average)."""
    bars: tuple[Bar, ...]
    references: tuple[Reference, ...]


@dataclass(frozen=True)
class BarPanel:
    title: str
    """Base, New or HM."""
    groups: tuple[BarGroup, ...]


@dataclass(frozen=True)
class Line:
    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    error: tuple[float, ...]


@dataclass(frozen=True)
class CurvePanel:
    title: str
    """The dataset (or Average)."""
    lines: tuple[Line, ...]
    references: tuple[Reference, ...]
    xlabel: str


def _rows_by(table: Table) -> dict[tuple[str, str], TableRow]:
    return {(row.series, row.dataset): row for row in table.rows}


def _datasets(table: Table) -> list[tuple[str, str]]:
    """(key, label) of the table's datasets in row order, the average first."""
    seen = dict.fromkeys((row.dataset, row.extra[0] if row.extra else row.dataset) for row in table.rows)
    ordered = sorted(seen, key=lambda pair: pair[0] != AVERAGE_KEY)
    labels: dict[str, str] = {}
    for key, label in ordered:
        labels.setdefault(key, "Average" if key == AVERAGE_KEY else label)
    return list(labels.items())


def _zeroshot_series(table: Table) -> set[str]:
    return {row.series for row in table.rows if row.method == ZEROSHOT}


def _drawn_series(table: Table) -> list[str]:
    zeroshot = _zeroshot_series(table)
    return [s for s in table.series if s not in zeroshot]


def _legend(table: Table, series: str) -> str:
    transductive = any(cell.transductive for row in table.rows if row.series == series for cell in row.cells)
    return series + (DAGGER if transductive else "")


def _chance_references(values: Iterable[float | None]) -> list[Reference]:
    """The chance line from the table's chance values of the columns drawn (100 / classes; averaged)."""
    chances = [v for v in values if v is not None]
    return [Reference("chance", "chance", math.fsum(chances) / len(chances))] if chances else []


def _zeroshot_references(table: Table, dataset: str, columns: Iterable[int]) -> list[Reference]:
    """One line per zeroshot series with a value on `dataset` (the mean of the columns drawn)."""
    references = []
    rows = _rows_by(table)
    for series in sorted(_zeroshot_series(table)):
        row = rows.get((series, dataset))
        means = [row.cells[i].mean for i in columns] if row is not None else []
        present = [m for m in means if m is not None]
        if present:
            references.append(Reference("zero-shot", series, math.fsum(present) / len(present)))
    return references


def bar_panels(table: Table) -> list[BarPanel]:
    """Base-to-novel (a long table with its average rows): one panel per column (Base, New, HM); in each, a
    group per dataset (the Average first) with a bar per series and the chance and zero-shot lines."""
    rows = _rows_by(table)
    series = _drawn_series(table)
    panels = []
    for column, title in enumerate(table.columns):
        groups = []
        for dataset, label in _datasets(table):
            bars = []
            for name in series:
                row = rows.get((name, dataset))
                cell = row.cells[column] if row is not None else None
                mean = cell.mean if cell is not None else None
                bars.append(Bar(name, mean, (cell.spread or 0.0) if cell is not None else 0.0))
            chance = table.chance.get(dataset, [])
            references = _chance_references(chance[column : column + 1])
            references += _zeroshot_references(table, dataset, [column])
            groups.append(BarGroup(label, tuple(bars), tuple(references)))
        panels.append(BarPanel(title, tuple(groups)))
    return panels


def plugin_panels(table: Table) -> list[BarPanel]:
    """Base-to-novel with plug-ins: a panel per wrapped method that has series with plug-ins (coop: coop,
    coop+dept, coop+dpc), in it a group per series with its Base, New and HM bars, from the average over
    datasets (or the one dataset's row). Empty when no series stacks a plug-in."""
    rows = [row for row in table.rows if row.average] or [row for row in table.rows if row.method != ZEROSHOT]
    if len({row.dataset for row in rows}) > 1:
        return []  # several datasets without average rows: no single value per series
    by_method: dict[str, list[TableRow]] = {}
    for row in rows:
        by_method.setdefault(row.method.split("+")[0], []).append(row)
    panels = []
    for method, members in by_method.items():
        if not any("+" in row.method for row in members):
            continue
        panels.append(BarPanel(method, tuple(BarGroup(row.series, _column_bars(table, row), ()) for row in members)))
    return panels


def _column_bars(table: Table, row: TableRow) -> tuple[Bar, ...]:
    """A bar per column of `row` (Base, New, HM), named by the column."""
    return tuple(
        Bar(column, cell.mean, cell.spread or 0.0) for column, cell in zip(table.columns, row.cells, strict=True)
    )


def curve_panels(table: Table) -> list[CurvePanel]:
    """Few-shot or data-efficient (a long table): one panel per dataset (the Average first), a line per series
    (and per selector) against shots or ratio, with seed error bars and the chance and zero-shot lines."""
    rows = _rows_by(table)
    groups = list(dict.fromkeys(table.x_groups)) or [""]
    xlabel = "ratio of the training data" if table.kind == "data_efficient" else "shots per class"
    panels = []
    for dataset, label in _datasets(table):
        lines = []
        for name in _drawn_series(table):
            row = rows.get((name, dataset))
            if row is None:
                continue
            for group in groups:
                points = [
                    (x, cell.mean, cell.spread or 0.0)
                    for i, (x, cell) in enumerate(zip(table.x_values, row.cells, strict=True))
                    if cell.mean is not None and math.isfinite(x) and (not table.x_groups or table.x_groups[i] == group)
                ]
                if points:
                    xs, ys, errors = zip(*points, strict=True)
                    legend = _legend(table, name) + (f" / {group}" if len(groups) > 1 else "")
                    lines.append(Line(legend, tuple(xs), tuple(ys), tuple(errors)))
        references = _chance_references(table.chance.get(dataset, []))
        references += _zeroshot_references(table, dataset, range(len(table.columns)))
        panels.append(CurvePanel(label, tuple(lines), tuple(references), xlabel))
    return panels


@dataclass(frozen=True)
class ConfusionPanel:
    evaluation: str
    title: str
    classnames: tuple[str, ...]
    matrix: tuple[tuple[int, ...], ...]
    """Rows: true class, columns: predicted class; counts of test images."""
    labelled: bool
    """Per-cell counts and class names drawn (at most MAX_LABELLED_CLASSES classes)."""


def confusion_panels(run: RunResult) -> tuple[list[ConfusionPanel], list[str]]:
    """The confusion matrix of every evaluation of `run` that recorded one, and notes about those left out."""
    panels, notes = [], []
    for key, evaluation in sorted(run.evaluations.items()):
        if not evaluation.has_confusion:
            continue
        classes = len(evaluation.total)
        if classes > MAX_DRAWN_CLASSES:
            notes.append(
                f"{key}: {classes} classes, more than the {MAX_DRAWN_CLASSES} a confusion plot draws; "
                "its counts are in results.json"
            )
            continue
        names = evaluation.classnames if len(evaluation.classnames) == classes else tuple(map(str, range(classes)))
        title = f"{key}: {evaluation.accuracy:.1f}% ({classes} classes)"
        matrix = tuple(tuple(row) for row in evaluation.confusion())
        panels.append(ConfusionPanel(key, title, names, matrix, classes <= MAX_LABELLED_CLASSES))
    return panels, notes


# -- drawing ---------------------------------------------------------------------------------------------------
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


def _draw_reference(axes: Any, reference: Reference, start: float, end: float, shown: dict[str, int]) -> None:
    """A reference line over [start, end], in the legend once per label (`shown`: labels drawn so far)."""
    label = "chance" if reference.kind == "chance" else reference.label
    legend = label if label not in shown else None
    number = shown.setdefault(label, sum(1 for name in shown if name != "chance"))
    style = _CHANCE_STYLE if reference.kind == "chance" else _ZEROSHOT_STYLES[number % len(_ZEROSHOT_STYLES)]
    axes.hlines(reference.value, start, end, linewidth=1.2, label=legend, **style)


def draw_bars(panels: Sequence[BarPanel], title: str, path: Path) -> Path:
    groups = len(panels[0].groups) if panels else 0
    count = len(panels[0].groups[0].bars) if groups else 0
    width = 0.8 / max(count, 1)
    figure = _figure(min(24.0, max(7.0, 0.3 * groups * max(count, 1) + 3.0)), 2.7 * len(panels))
    for n, panel in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, n + 1)
        shown: dict[str, int] = {}
        for s in range(count):
            positions = [i + (s - (count - 1) / 2) * width for i in range(groups)]
            bars = [group.bars[s] for group in panel.groups]
            heights = [bar.value or 0.0 for bar in bars]
            errors = [bar.error for bar in bars]
            axes.bar(positions, heights, width=width, yerr=errors, capsize=2, label=bars[0].series if bars else None)
        for i, group in enumerate(panel.groups):
            for reference in group.references:
                _draw_reference(axes, reference, i - 0.45, i + 0.45, shown)
        axes.set_ylabel(f"{panel.title} (%)")
        axes.set_xticks(range(groups))
        labels = [group.label for group in panel.groups]
        axes.set_xticklabels(labels if n == len(panels) - 1 else [""] * groups, rotation=30, ha="right")
        axes.grid(True, axis="y", alpha=0.3)
    if figure.axes:
        figure.axes[0].set_title(title)
        figure.axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return _save(figure, path)


def draw_plugin_bars(panels: Sequence[BarPanel], title: str, path: Path) -> Path:
    """The plug-in comparison: the panels side by side, a group of bars (Base, New, HM) per series."""
    figure = _figure(max(6.0, sum(1.4 * len(panel.groups) + 1.0 for panel in panels)), 3.6)
    for n, panel in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), n + 1)
        count = len(panel.groups[0].bars) if panel.groups else 0
        width = 0.8 / max(count, 1)
        for b in range(count):
            bars = [group.bars[b] for group in panel.groups]
            positions = [i + (b - (count - 1) / 2) * width for i in range(len(panel.groups))]
            drawn = axes.bar(positions, [bar.value or 0.0 for bar in bars], width=width,
                             yerr=[bar.error for bar in bars], capsize=2, label=bars[0].series)  # fmt: skip
            axes.bar_label(drawn, labels=[_value_label(bar.value) for bar in bars], fontsize="x-small", padding=2)
        axes.set_xticks(range(len(panel.groups)))
        axes.set_xticklabels([group.label for group in panel.groups], rotation=20, ha="right")
        axes.set_title(panel.title)
        axes.set_ylabel("accuracy (%)" if n == 0 else "")
        axes.grid(True, axis="y", alpha=0.3)
    if figure.axes:
        figure.axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def _value_label(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _curve_axes(axes: Any, panel: CurvePanel) -> None:
    shown: dict[str, int] = {}
    xs = sorted({x for line in panel.lines for x in line.x})
    for line in panel.lines:
        axes.errorbar(line.x, line.y, yerr=line.error, marker="o", markersize=4, capsize=2, linewidth=1.5,
                      label=line.label)  # fmt: skip
    if xs:
        start, end = (xs[0], xs[-1]) if len(xs) > 1 else (xs[0] * 0.8, xs[0] * 1.25)
        for reference in panel.references:
            _draw_reference(axes, reference, start, end, shown)
        if min(xs) > 0 and len(xs) > 1:
            axes.set_xscale("log", base=2)
        axes.set_xticks(xs)
        axes.set_xticklabels([f"{x:g}" for x in xs])
    axes.set_xlabel(panel.xlabel)
    axes.set_ylabel("accuracy (%)")
    axes.set_title(panel.title)
    axes.grid(True, alpha=0.3)


def draw_curves(panels: Sequence[CurvePanel], path: Path) -> Path:
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = _figure(3.4 * columns, 2.8 * rows)
    for n, panel in enumerate(panels):
        _curve_axes(figure.add_subplot(rows, columns, n + 1), panel)
    if figure.axes[0].get_legend_handles_labels()[0]:
        figure.axes[0].legend(fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def draw_confusion(panels: Sequence[ConfusionPanel], title: str, path: Path) -> Path:
    sizes = [max(3.5, 0.32 * len(p.classnames) + 1.5) if p.labelled else 6.0 for p in panels]
    figure = _figure(sum(sizes) + 0.5, max(sizes) + 0.8)
    for n, panel in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), n + 1)
        rates = [[count / max(sum(row), 1) for count in row] for row in panel.matrix]
        axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        classes = len(panel.classnames)
        if panel.labelled:
            axes.set_xticks(range(classes))
            axes.set_yticks(range(classes))
            axes.set_xticklabels(panel.classnames, rotation=90, fontsize="small")
            axes.set_yticklabels(panel.classnames, fontsize="small")
            for i, row in enumerate(panel.matrix):
                for j, count in enumerate(row):
                    if count:
                        colour = "white" if rates[i][j] > 0.5 else "black"
                        axes.text(j, i, str(count), ha="center", va="center", fontsize="x-small", color=colour)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        axes.set_title(panel.title, fontsize="medium")
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


# -- files -------------------------------------------------------------------------------------------------------
def write_plots(tables: Sequence[Table], out_dir: str | Path) -> list[Path]:
    """The bars and curves of the long tables (with their average rows); raises PlotsUnavailable when
    matplotlib is missing."""
    out_dir = Path(out_dir)
    paths = []
    for table in tables:
        if table.layout != "long" or not table.rows:
            continue
        if table.kind == "base2new":
            paths.append(draw_bars(bar_panels(table), table.title, out_dir / f"{table.name}.png"))
            plugins = plugin_panels(table)
            if plugins:
                title = f"{table.title}: methods with their plug-ins"
                paths.append(draw_plugin_bars(plugins, title, out_dir / f"{table.name}_plugins.png"))
        elif table.kind in ("few_shot", "data_efficient") and table.x_values:
            panels = curve_panels(table)
            paths.append(draw_curves(panels, out_dir / f"{table.kind}_curves.png"))
            if panels[0].title == "Average" and len(panels) > 1:
                paths.append(draw_curves(panels[:1], out_dir / f"{table.kind}_average.png"))
    return paths


def confusion_path(run: RunResult, out_dir: Path, roots: Sequence[Path] = ()) -> Path:
    """`confusion/<the run folder inside its runs folder>.png` (the runs folder's name first when several)."""
    folder = run.relative_folder
    if len(roots) > 1 and run.root in roots:
        folder = Path(f"{roots.index(run.root) + 1}-{run.root.name}") / folder
    return out_dir / CONFUSION_FOLDER / folder.parent / f"{folder.name}.png"


def write_confusion_plots(
    index: ResultIndex, out_dir: str | Path, roots: Sequence[Path] = ()
) -> tuple[list[Path], list[str]]:
    """One PNG per run that recorded confusion counts (a panel per evaluation); notes name what was not drawn.
    Raises PlotsUnavailable when matplotlib is missing."""
    out_dir = Path(out_dir)
    paths, notes = [], []
    for run in index.all_runs:
        panels, left_out = confusion_panels(run)
        notes += [f"{run.relative_folder.as_posix()}: {note}" for note in left_out]
        if not panels:
            continue
        title = f"{run.method} on {run.dataset}, {run.setting.label}, seed {run.seed} — {run.backbone.label}"
        paths.append(draw_confusion(panels, title, confusion_path(run, out_dir, roots)))
    return paths, notes
