"""CoOp vs CoOp+DPC and MaPLe vs MaPLe+DPC, base-to-novel on the synthetic world, over seeds.

One `promptclip run base2new` per DPC recipe trains both stages (the stage-1 run is an ordinary CoOp or MaPLe
run in its own folder, reused when it exists), so two commands give all four columns. The table holds the
mean and population standard deviation over seeds of the base and new accuracies (micro accuracy from the
integer counts of each run), and the harmonic mean of the means.

    python benchmarks/dpc_compare.py                      # the bundled tiny CLIP (tiny-synthetic), seeds 1,2,3
    python benchmarks/dpc_compare.py --write-docs         # ... and refresh the table in docs/dpc.md
    python benchmarks/dpc_compare.py --arch tiny-vit --weights random --seeds 1 --opts optim.epochs 1

`--opts` is passed to both runs (stage 2; stage 1 takes `plugins.dpc.stage1_opts.<key>`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from promptclip.io import atomic_write_text
from promptclip.reports.collect import harmonic_mean, summarize

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_PAGE = REPO_ROOT / "docs" / "dpc.md"
BEGIN, END = "<!-- dpc_compare:begin -->", "<!-- dpc_compare:end -->"
RECIPES = {"coop": "coop_dpc/tiny_synthetic", "maple": "maple_dpc/tiny_synthetic"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny-synthetic", help="CLIP architecture or weights file")
    parser.add_argument("--weights", help="weights file, or 'random' for random weights (tests of the script)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--backbones", default="coop,maple", help="which of coop, maple to compare")
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "dpc_compare"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="overrides for both recipes")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the results table in {DOCS_PAGE}")
    return parser.parse_args(argv)


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    """The `promptclip run base2new` argument lists, one per DPC recipe."""
    model = ["model.arch", args.arch] + (["model.weights", args.weights] if args.weights else [])
    commands = []
    for backbone in args.backbones.split(","):
        recipe = RECIPES[backbone.strip()]
        command = ["run", "base2new", "--recipe", recipe, "--seeds", args.seeds, "--runs-dir", args.runs_dir]
        commands.append([*command, "--quiet", "--opts", *model, "device", args.device, *args.opts])
    return commands


def accuracies(results: dict) -> tuple[float, float]:
    def micro(entry: dict) -> float:
        return 100.0 * sum(entry["correct"]) / sum(entry["total"])

    return micro(results["evaluations"]["base"]), micro(results["evaluations"]["new"])


def comparison_rows(runs_dir: Path, backbones: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for backbone in backbones:
        recipe = Path(RECIPES[backbone]).name
        for method in (backbone, f"{backbone}+dpc"):
            base, new = [], []
            for folder in sorted((runs_dir / "base2new").glob(f"*/{method}/{recipe}/*/seed*")):
                if int(folder.name.removeprefix("seed")) in seeds and (folder / "results.json").is_file():
                    b, n = accuracies(json.loads((folder / "results.json").read_text()))
                    base.append(b)
                    new.append(n)
            if not base:
                rows.append((method, "missing", "missing", "missing", "0"))
                continue
            b_stat, n_stat = summarize(base), summarize(new)
            hm = harmonic_mean(b_stat.mean, n_stat.mean)
            rows.append(
                (
                    method,
                    f"{b_stat.mean:.2f} ± {b_stat.std:.2f}",
                    f"{n_stat.mean:.2f} ± {n_stat.std:.2f}",
                    f"{hm:.2f}",
                    str(len(base)),
                )
            )
    return rows


def markdown_table(rows: Sequence[tuple[str, ...]]) -> str:
    lines = ["| Method | Base | New | HM | Seeds |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_docs_section(table: str, command: str, seconds: float) -> None:
    page = DOCS_PAGE.read_text(encoding="utf-8")
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{DOCS_PAGE}: no {BEGIN} ... {END} section to replace")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = f"{BEGIN}\n\nMade by `{command}` ({seconds / 60:.0f} min on the machine it ran on).\n\n{table}\n\n{END}"
    atomic_write_text(DOCS_PAGE, head + body + tail)


def main(argv: Sequence[str] | None = None) -> int:
    from promptclip.cli import main as promptclip

    args = parse_args(argv)
    started = time.perf_counter()
    for command in run_commands(args):
        print("promptclip " + shlex.join(command), flush=True)
        if promptclip(command) != 0:
            return 1
    seconds = time.perf_counter() - started
    seeds = [int(s) for s in args.seeds.split(",")]
    backbones = [b.strip() for b in args.backbones.split(",")]
    table = markdown_table(comparison_rows(Path(args.runs_dir), backbones, seeds))
    print(table)
    if args.write_docs:
        shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write-docs"]
        write_docs_section(table, shlex.join(["python", "benchmarks/dpc_compare.py", *shown]), seconds)
        print(f"updated {DOCS_PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
