"""`promptclip demo`: the papers' claims on the synthetic world, offline, in minutes on a CPU.

It uses the bundled `tiny-synthetic` CLIP (pretrained on the synthetic world by `promptclip pretrain`) and
runs the ordinary base-to-novel protocol through the same runner as `promptclip run`: every method is trained
on the base half of each task's classes (16 shots) and tested on the base and the new half, for several seeds.
The tasks are kinds the model knows by name, rendered in a style it rarely saw (a domain gap), and a task
whose training backgrounds mislead. Besides the base/new/HM table (the report's long table, mean and seed
spread) and a bar plot, it prints one line per claim of the papers (`promptclip.reports.claims`): the effect,
its seed standard deviation, and whether it is shown. The runs land in `--out` (default `demo_runs/`, apart
from the `runs/` folder that `promptclip run` fills); finished runs are skipped on a second call.
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
from promptclip.reports.claims import Claim, ClaimResult

DEFAULT_OUT = Path("demo_runs")
BACKBONE = "tiny-synthetic"
RECIPE = "demo"

STYLE_TASKS = ("synthetic_kinds_pixel", "synthetic_kinds_noise", "synthetic_kinds_faded")
SPURIOUS_TASK = "synthetic_kinds_spurious"


@dataclass(frozen=True)
class DemoMethod:
    """One row of the comparison: a method (with plug-ins) and its settings on the tiny backbone."""

    name: str
    """How the demo and its claims call it (`--methods`); the method string unless two rows share one."""
    method: str
    method_cfg: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)

    @property
    def parts(self) -> list[str]:
        return self.method.split("+")


# The synthetic world's scenes are the backgrounds DAPT aligns the background view with (the paper's 25
# outdoor and 7 table-top names are words the tiny model never learned).
_DAPT_WORLD = {"background_classes": ["grass", "sky", "brick wall", "water", "sand", "snow", "forest",
                                      "night sky", "road", "tiled floor"],
               "background_template": "a photo of {}."}  # fmt: skip
_COOP = {"n_ctx": 4, "ctx_init": "a photo of a"}
_MAPLE = {"n_ctx": 2, "ctx_init": "a photo of a", "depth": 3}
_MAPLE_OPTIM = {"lr": 0.0035, "epochs": 5}

# The field's base-to-novel settings, shortened for a CPU: 4 context tokens from "a photo of a", SGD at the
# field's learning rates, 10 epochs (CoOp's recipes run 50-200) and MaPLe's 5; deep prompts within the tiny
# model's 4 layers. DAPT trains its three terms together ("joint"): the official schedule trains the
# pull-push term alone for the first 7 epochs, most of this short run. DPC reuses the CoOp run as stage 1.
DEMO_METHODS: tuple[DemoMethod, ...] = (
    DemoMethod("zeroshot", "zeroshot"),
    DemoMethod("coop", "coop", _COOP),
    DemoMethod("kgcoop", "kgcoop", {**_COOP, "weight": 8.0}),
    DemoMethod("cocoop", "cocoop", _COOP),
    DemoMethod("maple", "maple", _MAPLE, optim=_MAPLE_OPTIM),
    DemoMethod("promptsrc", "promptsrc", {}),
    DemoMethod("coop+dapt", "coop+dapt", _COOP, {"dapt": {"schedule": "joint", **_DAPT_WORLD}}),
    DemoMethod("maple+dapt", "maple+dapt", _MAPLE, {"dapt": {"schedule": "joint", **_DAPT_WORLD}}, _MAPLE_OPTIM),
    DemoMethod(
        "maple+dapt-g",
        "maple+dapt",
        _MAPLE,
        {"dapt": {"schedule": "joint", "mask_source": "gradcam", **_DAPT_WORLD}},
        _MAPLE_OPTIM,
    ),
    DemoMethod("coop+dpc", "coop+dpc", _COOP, {"dpc": {}}),
    DemoMethod("maple+dpc", "maple+dpc", _MAPLE, {"dpc": {}}, _MAPLE_OPTIM),
)

DEMO_OPTIM: dict[str, Any] = {"name": "sgd", "lr": 0.002, "epochs": 10, "warmup_epochs": 1, "warmup_lr": 1e-5}
DEMO_DATA: dict[str, Any] = {
    "shots": 16,
    "batch_size": 32,
    "eval_batch_size": 128,
    "num_workers": 0,
    "augment": "random_resized_crop",
    "crop_scale": [0.5, 1.0],
    "flip": False,
    "options": {"train_per_class": 16, "val_per_class": 2, "test_per_class": 32},
}


@dataclass(frozen=True)
class Profile:
    """Which tasks, methods and seeds a demo runs."""

    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        ("synthetic_kinds_pixel", SPURIOUS_TASK), ("zeroshot", "coop", "kgcoop", "maple", "maple+dapt", "coop+dpc"),
        (1, 2, 3),
    ),
    "full": Profile(
        (*STYLE_TASKS, SPURIOUS_TASK), tuple(m.name for m in DEMO_METHODS), (1, 2, 3),
    ),
}  # fmt: skip

#: What the papers claim, as comparisons between the demo's methods (`promptclip.reports.claims`).
DEMO_CLAIMS: tuple[Claim, ...] = (
    Claim("CoOp raises base accuracy over zero-shot CLIP", "coop", "zeroshot", "base", STYLE_TASKS),
    Claim("CoOp lowers new-class accuracy below zero-shot CLIP", "zeroshot", "coop", "new", STYLE_TASKS),
    Claim("KgCoOp recovers part of CoOp's new-class loss (HM above CoOp's)", "kgcoop", "coop", "hm", STYLE_TASKS),
    Claim("CoCoOp recovers part of CoOp's new-class loss (HM above CoOp's)", "cocoop", "coop", "hm", STYLE_TASKS),
    Claim("MaPLe recovers part of CoOp's new-class loss (HM above CoOp's)", "maple", "coop", "hm", STYLE_TASKS),
    Claim("PromptSRC recovers part of CoOp's new-class loss (HM above CoOp's)", "promptsrc", "coop", "hm", STYLE_TASKS),
    Claim(
        "DAPT raises MaPLe's accuracy when training backgrounds mislead",
        "maple+dapt",
        "maple",
        "base",
        (SPURIOUS_TASK,),
    ),
    Claim(
        "DAPT raises CoOp's accuracy when training backgrounds mislead", "coop+dapt", "coop", "base", (SPURIOUS_TASK,)
    ),
    Claim(
        "DAPT-S (exact masks) is at least as good as DAPT-G (Grad-CAM masks)",
        "maple+dapt",
        "maple+dapt-g",
        "base",
        (SPURIOUS_TASK,),
        at_least=True,
    ),
    Claim("CoOp + DPC raises base accuracy over its stage-1 CoOp", "coop+dpc", "coop", "base", STYLE_TASKS),
    Claim("CoOp + DPC keeps stage 1's new-class accuracy", "coop+dpc", "coop", "equal_new", STYLE_TASKS),
    Claim("MaPLe + DPC raises base accuracy over its stage-1 MaPLe", "maple+dpc", "maple", "base", STYLE_TASKS),
    Claim("MaPLe + DPC keeps stage 1's new-class accuracy", "maple+dpc", "maple", "equal_new", STYLE_TASKS),
)


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
            missing.append(item.name)
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
        help="the papers' claims on the synthetic world with the bundled tiny CLIP (offline, minutes)",
        description="Train zero-shot CLIP, CoOp and the other installed methods on the base classes of "
        "synthetic tasks with the bundled tiny-synthetic CLIP, test on base and new classes over several "
        "seeds, print the base/new/HM table and one line per claim of the papers, and write a plot. No "
        "download; the quick profile takes about two minutes on a laptop CPU, --full about half an hour.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"the demo's own runs folder (default {DEFAULT_OUT}/, apart from runs/)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every method and claim on three style tasks and the misleading-background task (slow)",
    )
    parser.add_argument("--datasets", default=None, help="comma-separated synthetic tasks (default: the profile's)")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of: " + ", ".join(m.name for m in DEMO_METHODS) + " (default: the profile's)",
    )
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 1,2,3)")
    parser.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--arch", default=BACKBONE, help=f"CLIP to use (default: the bundled {BACKBONE})")
    parser.add_argument("--weights", default=None, help="weights file for --arch ('random' for random weights)")
    parser.set_defaults(func=run_demo)


def choose_methods(names: str | None, profile: Profile | None = None) -> list[DemoMethod]:
    from promptclip.errors import CLIError

    by_name = {m.name: m for m in DEMO_METHODS}
    if names is None:
        return [by_name[n] for n in (profile or PROFILES["full"]).methods]
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown or not wanted:
        raise CLIError(f"--methods {names!r}: choose from {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def _seeds(text: str | None, profile: Profile) -> tuple[int, ...]:
    from promptclip.errors import CLIError

    if text is None:
        return profile.seeds
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise CLIError(f"--seeds {text!r}: give comma-separated non-negative integers, e.g. --seeds 1,2,3") from None
    if not seeds or min(seeds) < 0:
        raise CLIError(f"--seeds {text!r}: give comma-separated non-negative integers, e.g. --seeds 1,2,3")
    return seeds


def run_demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from promptclip.commands.run import user_errors
    from promptclip.errors import CLIError
    from promptclip.protocols.spec import Sweep, expand
    from promptclip.reports.claims import evaluate_claims, format_claim
    from promptclip.runs import RunOptions, execute

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES["full" if args.full else "quick"]
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else list(profile.datasets)
    methods, missing = available_methods(choose_methods(args.methods, profile))
    seeds = _seeds(args.seeds, profile)
    if not methods:
        raise CLIError(f"none of the requested methods is installed ({', '.join(missing)})")
    if missing:
        print(f"not installed, left out: {', '.join(missing)}", file=sys.stderr)
    started = time.perf_counter()
    scores: dict[tuple[str, str, int], dict[str, float]] = {}
    with user_errors():
        clip = _check_backbone(args.arch, args.weights)
        sweep = Sweep(datasets=datasets, seeds=seeds, runs_dir=args.out, recipe=RECIPE)
        jobs = []
        for item in methods:
            cfg = demo_config(item, args.device, args.epochs, args.arch, args.weights, clip.config.vision.layers)
            jobs += [(item, spec, cfg) for spec in expand("base2new", cfg, sweep)]
        options = RunOptions(progress=False, echo=False, allow_torchscript=True)  # --arch/--weights
        folders = []
        with tqdm(jobs, desc="demo", unit="run", dynamic_ncols=True) as bar:
            for item, spec, cfg in bar:
                bar.set_postfix_str(f"{item.name} on {spec.dataset}, seed {spec.seed}")
                outcome = execute(spec, cfg, options)  # a finished run of the same identity is reused
                folders.append(outcome.run_dir.path if outcome.run_dir is not None else spec.run_dir)
                if outcome.results is not None:
                    accuracy = {key: entry.accuracy for key, entry in outcome.results.evaluations.items()}
                    scores[(item.name, spec.dataset, spec.seed)] = accuracy
        shots = DEMO_DATA["shots"]
        title = (
            f"Base-to-novel on the synthetic world, {args.arch} CLIP, {shots} shots, "
            f"seeds {','.join(map(str, seeds))} (accuracy %)"
        )
        table = demo_table(args.out, folders, [m.method for m in methods], title)
    from promptclip.reports.tables import table_lines

    lines, legend = table_lines(table)
    text = "\n".join(lines)
    notes = "\n".join(f"- {note}" for note in legend)
    claims = "\n".join(f"- {format_claim(result)}" for result in evaluate_claims(scores, DEMO_CLAIMS))
    print(f"\n{title}:\n{text}\n\n{notes}")
    if claims:
        print(f"\nThe papers' claims on this world:\n{claims}")
    body = f"# {title}\n\n{text}\n\n{notes}\n" + (f"\n## The papers' claims\n\n{claims}\n" if claims else "")
    atomic_write_text(args.out / "demo.md", body)
    from promptclip.reports.plots import PlotsUnavailable, write_plots

    try:
        for path in write_plots([table], args.out):
            print(f"plot: {path}")
    except PlotsUnavailable as err:  # matplotlib is an optional dependency
        print(f"no plot: {err}", file=sys.stderr)
    print(f"table: {args.out / 'demo.md'} ({time.perf_counter() - started:.0f} s)")
    return 0


def claim_results(scores: dict[tuple[str, str, int], dict[str, float]]) -> list[ClaimResult]:
    """The demo's claims evaluated on `scores` ((method name, dataset, seed) -> base/new accuracy)."""
    from promptclip.reports.claims import evaluate_claims

    return evaluate_claims(scores, DEMO_CLAIMS)


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
