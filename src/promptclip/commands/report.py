"""`promptclip report RUNS_DIR [RUNS_DIR ...]`: tables (markdown, CSV) and plots from finished run folders."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from promptclip.io import atomic_write_text
from promptclip.reports.collect import Problem, collect_runs
from promptclip.reports.index import ResultIndex
from promptclip.reports.tables import (
    LAYOUTS,
    Layout,
    Table,
    TableOptions,
    build_long_tables,
    render_markdown,
    render_runs_csv,
    report_tables,
    write_csv_files,
)

FORMATS = ("md", "csv")
PLOTS_FOLDER = "plots"
_LINKED_CONFUSION_PLOTS = 12
"""report.md links the confusion plots one by one up to this many, else names their folder."""
_PROTOCOL_HEADINGS = {
    "base2new": "Base-to-novel generalisation",
    "few_shot": "Few-shot classification",
    "data_efficient": "Data-efficient training",
    "cross_dataset": "Cross-dataset transfer",
    "domain_generalization": "Domain generalisation",
}


class ReportError(ValueError):
    """Nothing to report, or options that cannot be used."""


@dataclass
class Report:
    markdown: str
    out_dir: Path
    tables: list[Table]
    problems: list[Problem]
    files: list[Path] = field(default_factory=list)
    plot_error: str | None = None
    confusion_notes: list[str] = field(default_factory=list)


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ReportError(f"--format {text!r}: use a comma-separated list of {', '.join(FORMATS)}")
    return formats


def _display(path: Path, roots: Sequence[Path]) -> str:
    for root in roots:
        if path.is_relative_to(root):
            relative = path.relative_to(root).as_posix()
            return relative if len(roots) == 1 else f"{root.as_posix()}/{relative}"
    return str(path)


def _sources(roots: Sequence[Path]) -> str:
    return ", ".join(f"`{root}`" for root in roots)


def render_document(
    tables: Sequence[Table],
    runs_dirs: Path | Sequence[Path],
    run_count: int,
    problems: Sequence[Problem],
    plots: Sequence[Path],
    confusion: Sequence[Path] = (),
    confusion_notes: Sequence[str] = (),
) -> str:
    roots = [runs_dirs] if isinstance(runs_dirs, Path) else list(runs_dirs)
    lines = [
        "# Results",
        "",
        f"{run_count} run{'' if run_count == 1 else 's'} read from {_sources(roots)}. "
        "Every accuracy is computed from the integer per-class counts in each run's results.json; "
        "means and harmonic means use unrounded values, and the tables round to two decimals.",
        "",
    ]
    heading = None
    for table in tables:
        protocol = table.kind.removesuffix("_summary")
        if protocol != heading:
            heading = protocol
            lines += [f"## {_PROTOCOL_HEADINGS.get(protocol, protocol)}", ""]
        lines += [render_markdown(table)]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{path.stem}]({PLOTS_FOLDER}/{path.name})" for path in plots]
        lines += [""]
    if confusion or confusion_notes:
        lines += ["## Confusion matrices", ""]
        count = len(confusion)
        lines += [
            f"{count} run{'' if count == 1 else 's'} with confusion counts, one PNG each in "
            f"`{PLOTS_FOLDER}/confusion/` (rows: true class, columns: predicted class; colour: the share of the "
            "true class's test images).",
            "",
        ]
        if count <= _LINKED_CONFUSION_PLOTS:
            for path in confusion:
                link = _plots_relative(path)
                lines.append(f"- [{link.removeprefix(PLOTS_FOLDER + '/confusion/').removesuffix('.png')}]({link})")
        lines += [f"- not drawn: {note}" for note in confusion_notes]
        lines += [""]
    if problems:
        lines += ["## Files not used or used with a caveat", ""]
        lines += [f"- {_display(p.path, roots)}: {p.message}" for p in problems]
        lines += [""]
    return "\n".join(lines)


def _plots_relative(path: Path) -> str:
    parts = path.parts
    start = len(parts) - 1 - parts[::-1].index(PLOTS_FOLDER) if PLOTS_FOLDER in parts else 0
    return Path(*parts[start:]).as_posix()


def generate_report(
    runs_dir: str | Path | Sequence[str | Path],
    out_dir: str | Path | None = None,
    formats: Sequence[str] = FORMATS,
    plots: bool = True,
    options: TableOptions | None = None,
    layout: Layout = "long",
    confusion: bool = True,
    paper: bool = False,
) -> Report:
    """Read every run under the runs folder(s) and write report.md, the CSV tables and the plots to `out_dir`
    (default: the first runs folder's `report/`). `paper`: a paper row and Δ columns in every table (long
    layout; `promptclip.reports.paper`)."""
    roots = [Path(runs_dir)] if isinstance(runs_dir, str | Path) else [Path(p) for p in runs_dir]
    if not roots:
        raise ReportError("give at least one runs folder")
    for root in roots:
        if not root.is_dir():
            raise ReportError(f"{root} is not a folder; give the runs folder that `promptclip run` wrote")
    if layout not in LAYOUTS:
        raise ReportError(f"layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if paper and layout != "long":
        raise ReportError("--paper adds rows to the long layout's tables; leave out --layout wide")
    out = Path(out_dir) if out_dir is not None else roots[0] / "report"
    collection = collect_runs(roots)
    index = ResultIndex(collection.runs)
    problems = [*collection.problems, *index.problems]
    if not collection.runs:
        details = "".join(f"\n  {problem}" for problem in problems)
        where = ", ".join(str(root) for root in roots)
        raise ReportError(f"no usable results.json under {where}; finish a run with `promptclip run`{details}")
    tables = report_tables(index, options, layout)
    if paper:
        from promptclip.reports.paper import add_paper_rows

        tables = add_paper_rows(tables)
    report = Report("", out, tables, problems)
    plot_paths: list[Path] = []
    confusion_paths: list[Path] = []
    if plots:
        from promptclip.reports.plots import PlotsUnavailable, write_confusion_plots, write_plots

        try:
            plot_paths = write_plots(build_long_tables(index, options), out / PLOTS_FOLDER)
            if confusion:
                confusion_paths, report.confusion_notes = write_confusion_plots(index, out / PLOTS_FOLDER, roots)
        except PlotsUnavailable as err:
            report.plot_error = str(err)
    report.markdown = render_document(
        tables, roots, len(index.all_runs), problems, plot_paths, confusion_paths, report.confusion_notes
    )
    if "md" in formats:
        atomic_write_text(out / "report.md", report.markdown)
        report.files.append(out / "report.md")
    if "csv" in formats:
        report.files += write_csv_files(tables, out)
        atomic_write_text(out / "runs.csv", render_runs_csv(index))
        report.files.append(out / "runs.csv")
    report.files += plot_paths + confusion_paths
    return report


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="tables (markdown, CSV) and plots from run folders",
        description="Summarise every results.json under the RUNS_DIR folders: mean ± std over seeds per "
        "method and dataset, averages and harmonic means as the papers compute them. Runs of one method that "
        "differ in a setting (learning rate, backbone, ...) are shown apart, labelled by that setting.",
    )
    parser.add_argument("runs_dir", metavar="RUNS_DIR", type=Path, nargs="+", help="folder(s) holding run folders")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the first RUNS_DIR's report/ folder)"
    )
    parser.add_argument("--format", default="md,csv", help="files to write: md, csv or md,csv (default)")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="long",
        help="long: one row per method and dataset (default); wide: the papers' layout, a column group per method",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="add the published numbers (a paper row per method and dataset) and a Δ column (ours - paper) to "
        "every table (long layout)",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    parser.add_argument(
        "--no-confusion", action="store_true", help="draw no confusion-matrix PNGs (one per run otherwise)"
    )
    parser.add_argument("--ci95", action="store_true", help="show the 95%% interval 1.96·std/√n instead of std")
    parser.add_argument(
        "--metric",
        choices=("accuracy", "macro"),
        default="accuracy",
        help="accuracy over all test images (default) or the mean of the per-class accuracies",
    )
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from promptclip.errors import CLIError

    options = TableOptions(
        metric="macro_accuracy" if args.metric == "macro" else "accuracy",
        spread="ci95" if args.ci95 else "std",
    )
    try:
        report = generate_report(
            args.runs_dir,
            args.out,
            parse_formats(args.format),
            not args.no_plots,
            options,
            layout=args.layout,
            confusion=not args.no_confusion,
            paper=args.paper,
        )
    except ReportError as err:
        raise CLIError(str(err)) from None
    for problem in report.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if report.plot_error:
        print(f"warning: {report.plot_error}", file=sys.stderr)
    for note in report.confusion_notes:
        print(f"note: confusion matrix not drawn: {note}", file=sys.stderr)
    print(report.markdown)
    if report.files:
        count = len(report.files)
        print(f"wrote {count} file{'' if count == 1 else 's'} to {report.out_dir}", file=sys.stderr)
    return 0
