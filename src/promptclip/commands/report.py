"""`promptclip report RUNS_DIR`: paper-style tables (markdown, CSV) and plots from finished run folders."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from promptclip.io import atomic_write_text
from promptclip.reports.collect import Problem, ResultIndex, collect_runs
from promptclip.reports.tables import (
    Table,
    TableOptions,
    build_tables,
    render_markdown,
    render_runs_csv,
    write_csv_files,
)

FORMATS = ("md", "csv")
PLOTS_FOLDER = "plots"
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


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ReportError(f"--format {text!r}: use a comma-separated list of {', '.join(FORMATS)}")
    return formats


def _display(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def render_document(
    tables: Sequence[Table], runs_dir: Path, run_count: int, problems: Sequence[Problem], plots: Sequence[Path]
) -> str:
    lines = [
        "# Results",
        "",
        f"{run_count} run{'' if run_count == 1 else 's'} read from `{runs_dir}`. "
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
    if problems:
        lines += ["## Files not used or used with a caveat", ""]
        lines += [f"- {_display(p.path, runs_dir)}: {p.message}" for p in problems]
        lines += [""]
    return "\n".join(lines)


def generate_report(
    runs_dir: str | Path,
    out_dir: str | Path | None = None,
    formats: Sequence[str] = FORMATS,
    plots: bool = True,
    options: TableOptions | None = None,
) -> Report:
    """Read every run under `runs_dir` and write report.md, the CSV tables and the plots to `out_dir`."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir} is not a folder; give the runs folder that `promptclip run` wrote")
    out = Path(out_dir) if out_dir is not None else runs_dir / "report"
    collection = collect_runs(runs_dir)
    index = ResultIndex(collection.runs)
    problems = [*collection.problems, *index.problems]
    if not collection.runs:
        details = "".join(f"\n  {problem}" for problem in problems)
        raise ReportError(f"no usable results.json under {runs_dir}; finish a run with `promptclip run`{details}")
    tables = build_tables(index, options)
    report = Report("", out, tables, problems)
    plot_paths: list[Path] = []
    if plots:
        from promptclip.reports.plots import PlotsUnavailable, write_plots

        try:
            plot_paths = write_plots(tables, out / PLOTS_FOLDER)
        except PlotsUnavailable as err:
            report.plot_error = str(err)
    report.markdown = render_document(tables, runs_dir, len(collection.runs), problems, plot_paths)
    if "md" in formats:
        atomic_write_text(out / "report.md", report.markdown)
        report.files.append(out / "report.md")
    if "csv" in formats:
        report.files += write_csv_files(tables, out)
        atomic_write_text(out / "runs.csv", render_runs_csv(index, relative_to=runs_dir))
        report.files.append(out / "runs.csv")
    report.files += plot_paths
    return report


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="paper-style tables (markdown, CSV) and plots from run folders",
        description="Summarise every results.json under RUNS_DIR: mean ± std over seeds per dataset, "
        "averages and harmonic means laid out like the papers.",
    )
    parser.add_argument("runs_dir", metavar="RUNS_DIR", type=Path, help="folder holding the run folders")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUNS_DIR/report)")
    parser.add_argument("--format", default="md,csv", help="files to write: md, csv or md,csv (default)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    parser.add_argument("--ci95", action="store_true", help="show the 95%% interval 1.96·std/√n instead of std")
    parser.add_argument(
        "--metric",
        choices=("accuracy", "macro"),
        default="accuracy",
        help="accuracy over all test images (default) or the mean of the per-class accuracies",
    )
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from promptclip.cli import CLIError

    options = TableOptions(
        metric="macro_accuracy" if args.metric == "macro" else "accuracy",
        spread="ci95" if args.ci95 else "std",
    )
    try:
        report = generate_report(args.runs_dir, args.out, parse_formats(args.format), not args.no_plots, options)
    except ReportError as err:
        raise CLIError(str(err)) from None
    for problem in report.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if report.plot_error:
        print(f"warning: {report.plot_error}", file=sys.stderr)
    print(report.markdown)
    if report.files:
        count = len(report.files)
        print(f"wrote {count} file{'' if count == 1 else 's'} to {report.out_dir}", file=sys.stderr)
    return 0
