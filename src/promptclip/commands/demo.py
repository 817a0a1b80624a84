"""`promptclip demo`: a small base-to-novel comparison on the synthetic world, offline, in minutes on a CPU.

It uses the bundled `tiny-synthetic` CLIP (pretrained on the synthetic world by `promptclip pretrain`) and
runs the ordinary base-to-novel protocol through the same runner as `promptclip run`: every method is trained
on the base half of each task's classes (16 shots) and tested on the base and the new half. The runs land in
`--out` (default `demo_runs/`, apart from the `runs/` folder that `promptclip run` fills, so a report of
`runs/` never mixes demo runs in; finished runs are skipped on a second call); the base/new/HM table (the
report's long table) is printed and written to `--out/demo.md`, with a bar plot beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptclip.io import atomic_write_text

DEFAULT_OUT = Path("demo_runs")
DEFAULT_DATASETS = ("synthetic_objects", "synthetic_shapes", "synthetic_scenes")
BACKBONE = "tiny-synthetic"
RECIPE = "demo"


@dataclass(frozen=True)
class DemoMethod:
    """One row of the comparison: a method (with plug-ins) and its settings on the tiny backbone."""

    method: str
    method_cfg: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)

    @property
    def parts(self) -> list[str]:
        return self.method.split("+")


# The field's base-to-novel settings, shortened for a CPU: 4 context tokens from "a photo of a", SGD at the
# field's learning rates, 10 epochs (CoOp's recipes run 50-200) and MaPLe's 5; MaPLe's prompt depth is cut
# to 3 of the 4 layers. DAPT trains its three terms together ("joint"): the official schedule trains the
# pull-push term alone for the first 7 epochs, most of this short run. DPC reuses the CoOp run as stage 1.
DEMO_METHODS: tuple[DemoMethod, ...] = (
    DemoMethod("zeroshot"),
    DemoMethod("coop", {"n_ctx": 4, "ctx_init": "a photo of a"}),
    DemoMethod("kgcoop", {"n_ctx": 4, "ctx_init": "a photo of a", "weight": 8.0}),
    DemoMethod("maple", {"n_ctx": 2, "ctx_init": "a photo of a", "depth": 3}, optim={"lr": 0.0035, "epochs": 5}),
    DemoMethod("coop+dapt", {"n_ctx": 4, "ctx_init": "a photo of a"}, {"dapt": {"schedule": "joint"}}),
    DemoMethod("coop+dpc", {"n_ctx": 4, "ctx_init": "a photo of a"}, {"dpc": {}}),
)

DEMO_OPTIM: dict[str, Any] = {"name": "sgd", "lr": 0.002, "epochs": 10, "warmup_epochs": 1, "warmup_lr": 1e-5}
DEMO_DATA: dict[str, Any] = {
    "shots": 16,
    "batch_size": 32,
    "eval_batch_size": 128,
    "num_workers": 0,
    "options": {"train_per_class": 16, "val_per_class": 2, "test_per_class": 32},
}


def available_methods(methods: Sequence[DemoMethod]) -> tuple[list[DemoMethod], list[str]]:
    """The demo methods whose method and plug-ins are installed, and the names of those left out."""
    from promptclip.methods import load_all as load_methods
    from promptclip.plugins import load_all as load_plugins
    from promptclip.registry import METHODS, PLUGINS

    load_methods()
    load_plugins()
    kept, missing = [], []
    for item in methods:
        method, *plugins = item.parts
        if method in METHODS and all(p in PLUGINS for p in plugins):
            kept.append(item)
        else:
            missing.append(item.method)
    return kept, missing


def demo_config(
    item: DemoMethod,
    device: str,
    epochs: int | None = None,
    arch: str = BACKBONE,
    weights: str | None = None,
    layers: int | None = None,
) -> Any:
    """The run config of one demo method (the data and optimiser settings above, on `arch`); deep prompts
    are cut to the `layers` of a shallower image tower."""
    from promptclip.config import build_run_config

    optim = {**DEMO_OPTIM, **item.optim}
    if epochs is not None:
        optim["epochs"] = epochs
    method_cfg = dict(item.method_cfg)
    if layers is not None and "depth" in method_cfg:
        method_cfg["depth"] = min(method_cfg["depth"], layers)
    data = {
        "method": item.method,
        "method_cfg": method_cfg,
        "plugins": {name: dict(cfg) for name, cfg in item.plugins.items()},
        "model": {"arch": arch, "weights": weights, "precision": "fp32"},
        "data": {**DEMO_DATA, "subsample": "base"},
        "optim": optim,
        "device": device,
    }
    return build_run_config(data, source=f"demo ({item.method})")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="base-to-novel comparison on the synthetic world with the bundled tiny CLIP (offline, minutes)",
        description="Train zero-shot CLIP, CoOp and the other installed methods on the base classes of the "
        "synthetic tasks with the bundled tiny-synthetic CLIP, test on base and new classes, print the "
        "base/new/HM table and write a plot. No download, a few minutes on a laptop CPU.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"the demo's own runs folder (default {DEFAULT_OUT}/, apart from runs/)",
    )
    parser.add_argument(
        "--datasets", default=",".join(DEFAULT_DATASETS), help="comma-separated synthetic tasks (default: all three)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of: " + ", ".join(m.method for m in DEMO_METHODS) + " (default: all installed)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--arch", default=BACKBONE, help=f"CLIP to use (default: the bundled {BACKBONE})")
    parser.add_argument("--weights", default=None, help="weights file for --arch ('random' for random weights)")
    parser.set_defaults(func=run_demo)


def choose_methods(names: str | None) -> list[DemoMethod]:
    from promptclip.errors import CLIError

    if names is None:
        return list(DEMO_METHODS)
    by_name = {m.method: m for m in DEMO_METHODS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown or not wanted:
        raise CLIError(f"--methods {names!r}: choose from {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def run_demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from promptclip.commands.run import user_errors
    from promptclip.errors import CLIError
    from promptclip.protocols.spec import Sweep, expand
    from promptclip.runs import RunOptions, execute

    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    methods, missing = available_methods(choose_methods(args.methods))
    if not methods:
        raise CLIError(f"none of the requested methods is installed ({', '.join(missing)})")
    if missing:
        print(f"not installed, left out: {', '.join(missing)}", file=sys.stderr)
    started = time.perf_counter()
    with user_errors():
        clip = _check_backbone(args.arch, args.weights)
        sweep = Sweep(datasets=datasets, seeds=(args.seed,), runs_dir=args.out, recipe=RECIPE)
        jobs = []
        for item in methods:
            cfg = demo_config(item, args.device, args.epochs, args.arch, args.weights, clip.config.vision.layers)
            jobs += [(spec, cfg) for spec in expand("base2new", cfg, sweep)]
        options = RunOptions(progress=False, echo=False, allow_torchscript=True)  # --arch/--weights
        folders = []
        with tqdm(jobs, desc="demo", unit="run", dynamic_ncols=True) as bar:
            for spec, cfg in bar:
                bar.set_postfix_str(f"{spec.method} on {spec.dataset}")
                outcome = execute(spec, cfg, options)  # a finished run of the same identity is reused
                folders.append(outcome.run_dir.path if outcome.run_dir is not None else spec.run_dir)
        shots = DEMO_DATA["shots"]
        title = f"Base-to-novel on the synthetic world, {args.arch} CLIP, {shots} shots, seed {args.seed} (accuracy %)"
        table = demo_table(args.out, folders, [m.method for m in methods], title)
    from promptclip.reports.tables import table_lines

    lines, legend = table_lines(table)
    text = "\n".join(lines)
    notes = "\n".join(f"- {note}" for note in legend)
    print(f"\n{title}:\n{text}\n\n{notes}")
    atomic_write_text(args.out / "demo.md", f"# {title}\n\n{text}\n\n{notes}\n")
    from promptclip.reports.plots import PlotsUnavailable, write_plots

    try:
        for path in write_plots([table], args.out):
            print(f"plot: {path}")
    except PlotsUnavailable as err:  # matplotlib is an optional dependency
        print(f"no plot: {err}", file=sys.stderr)
    print(f"table: {args.out / 'demo.md'} ({time.perf_counter() - started:.0f} s)")
    return 0


def demo_table(runs_dir: Path, folders: Sequence[Path], order: Sequence[str] = (), title: str | None = None) -> Any:
    """The report's long base-to-novel table (one row per method and dataset, the average first when there
    are several datasets) of exactly the runs in `folders` (other runs in `runs_dir` are left out)."""
    from promptclip.reports.collect import collect_runs
    from promptclip.reports.index import ResultIndex
    from promptclip.reports.tables import TableOptions, base2new_long_table

    wanted = {Path(folder).resolve() for folder in folders}
    index = ResultIndex(run for run in collect_runs(runs_dir).runs if run.path.parent.resolve() in wanted)
    settings = index.settings("base2new")
    if not settings:
        raise RuntimeError(f"no finished base-to-novel run of this demo under {runs_dir}")
    return base2new_long_table(index, settings[0], TableOptions(), order, title)


def _check_backbone(arch: str, weights: str | None) -> Any:
    """The CLIP, loaded once up front, so a missing file stops the demo before any run starts."""
    from promptclip.clip.weights import WeightsError, load_clip

    try:
        return load_clip(arch, weights, allow_torchscript=True)  # named by --arch / --weights
    except WeightsError as err:
        if arch != BACKBONE or weights is not None:
            raise
        raise WeightsError(
            f"the bundled {BACKBONE} CLIP cannot be loaded ({err}); reinstall promptclip, or recreate the weights "
            "with `promptclip pretrain` (docs/tiny-clip.md)"
        ) from None
