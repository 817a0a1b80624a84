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
import dataclasses
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
    """One row of the comparison: a packaged recipe for the tiny backbone (`src/promptclip/configs/`)."""

    name: str
    """How the demo and its claims call it (`--methods`); the method string unless two rows share one."""
    recipe: str

    @property
    def method(self) -> str:
        return str(self.recipe_data()["method"])

    @property
    def parts(self) -> list[str]:
        return self.method.split("+")

    def recipe_data(self) -> dict[str, Any]:
        from promptclip.config import load_recipe
        from promptclip.recipes import resolve_recipe

        return load_recipe(resolve_recipe(self.recipe))


# The recipes hold the field's settings, cut for a CPU and for a 4-layer model (each file says how).
DEMO_METHODS: tuple[DemoMethod, ...] = (
    DemoMethod("zeroshot", "zeroshot/tiny_synthetic"),
    DemoMethod("coop", "coop/tiny_synthetic"),
    DemoMethod("kgcoop", "kgcoop/tiny_synthetic"),
    DemoMethod("cocoop", "cocoop/tiny_synthetic"),
    DemoMethod("maple", "maple/tiny_synthetic"),
    DemoMethod("promptsrc", "promptsrc/tiny_synthetic"),
    DemoMethod("coop+dapt", "coop_dapt/tiny_synthetic"),
    DemoMethod("maple+dapt", "maple_dapt/tiny_synthetic"),
    DemoMethod("maple+dapt-g", "maple_dapt/tiny_synthetic_dapt_g"),
    DemoMethod("coop+dpc", "coop_dpc/tiny_synthetic_demo"),
    DemoMethod("maple+dpc", "maple_dpc/tiny_synthetic_demo"),
    DemoMethod("coop+dept", "coop_dept/tiny_synthetic_demo"),
    DemoMethod("maple+dept", "maple_dept/tiny_synthetic_demo"),
)


@dataclass(frozen=True)
class Profile:
    """Which methods a demo runs on which task, and with which seeds."""

    runs: dict[str, tuple[str, ...]]
    """Task -> the names of the methods run on it."""
    seeds: tuple[int, ...]
    task_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Tasks run with other seeds than `seeds` (more where the seed spread is large)."""

    def seeds_for(self, task: str) -> tuple[int, ...]:
        return self.task_seeds.get(task, self.seeds)

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(self.runs)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for names in self.runs.values() for name in names))


_TRADE_OFF = (
    "zeroshot", "coop", "kgcoop", "cocoop", "maple", "promptsrc", "coop+dpc", "maple+dpc", "coop+dept", "maple+dept",
)  # fmt: skip
_BACKGROUNDS = ("zeroshot", "coop", "coop+dapt", "maple", "maple+dapt", "maple+dapt-g")

PROFILES: dict[str, Profile] = {
    # About two minutes on two cores: one style task and the misleading backgrounds, the core methods.
    "quick": Profile(
        {"synthetic_kinds_pixel": ("zeroshot", "coop", "kgcoop", "coop+dpc"),
         SPURIOUS_TASK: ("zeroshot", "maple", "maple+dapt")},
        (1, 2, 3),
    ),
    # Every claim: three style tasks (three random base/new splits) and the misleading backgrounds.
    # MaPLe's accuracy on flipped backgrounds varies by 5-15 points between seeds: five seeds there.
    "full": Profile(
        {**{task: _TRADE_OFF for task in STYLE_TASKS}, SPURIOUS_TASK: _BACKGROUNDS},
        (1, 2, 3),
        {SPURIOUS_TASK: (1, 2, 3, 4, 5)},
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
    Claim("DPC as a plug-in beats DePT on CoOp (HM)", "coop+dpc", "coop+dept", "hm", STYLE_TASKS),
    Claim("DPC as a plug-in beats DePT on MaPLe (HM)", "maple+dpc", "maple+dept", "hm", STYLE_TASKS),
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
    """The run config of one demo method: its recipe on `arch` (the base classes; the sweep picks the dataset
    and seed). Deep prompts are cut to the `layers` of a shallower image tower than the recipe's model."""
    from promptclip.config import build_run_config

    data = item.recipe_data()
    if epochs is not None:
        data["optim"] = {**data.get("optim", {}), "epochs": epochs}
    method_cfg = dict(data.get("method_cfg") or {})
    for key in ("depth", "depth_text", "depth_vision"):
        if layers is not None and key in method_cfg:
            method_cfg[key] = min(method_cfg[key], layers)
    data["method_cfg"] = method_cfg
    data["model"] = {**data.get("model", {}), "arch": arch, "weights": weights}
    data["data"] = {**data.get("data", {}), "subsample": "base"}
    data["device"] = device
    return build_run_config(data, source=f"demo ({item.name}: {item.recipe})")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the papers' claims on the synthetic world with the bundled tiny CLIP (offline, minutes)",
        description="Train zero-shot CLIP, CoOp and the other installed methods on the base classes of "
        "synthetic tasks with the bundled tiny-synthetic CLIP, test on base and new classes over several "
        "seeds, print the base/new/HM table and one line per claim of the papers, and write a plot. No "
        "download; the quick profile takes about two minutes of two cores, --full about twenty minutes.",
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at a time, each in its own process with one thread (default: the CPU cores, at most 4; 1 on a GPU)",
    )
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

    from promptclip.commands.run import user_errors
    from promptclip.errors import CLIError
    from promptclip.protocols.spec import Sweep, expand
    from promptclip.reports.claims import evaluate_claims, format_claim

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
        jobs: list[Job] = []
        for item in methods:
            cfg = demo_config(item, args.device, args.epochs, args.arch, args.weights, clip.config.vision.layers)
            for dataset in datasets:
                if args.datasets or args.methods or item.name in profile.runs.get(dataset, ()):
                    task_seeds = seeds if args.seeds else profile.seeds_for(dataset)
                    sweep = Sweep(datasets=[dataset], seeds=task_seeds, runs_dir=args.out, recipe=RECIPE)
                    jobs += [(item, spec, cfg) for spec in expand("base2new", cfg, sweep)]
        folders: dict[str, list[Path]] = {}
        for item, spec, folder, accuracy in run_jobs(jobs, args.jobs):
            folders.setdefault(spec.dataset, []).append(folder)
            if accuracy is not None:
                scores[(item.name, spec.dataset, spec.seed)] = accuracy
        shots = jobs[0][2].data.shots
        tables: list[Any] = []
        for group in task_groups(profile, list(folders)):
            title = f"Base-to-novel on {', '.join(group)}, {args.arch} CLIP, {shots} shots (accuracy %)"
            group_folders = [folder for dataset in group for folder in folders[dataset]]
            table = demo_table(args.out, group_folders, [m.method for m in methods], title)
            tables.append(dataclasses.replace(table, name=f"{table.name}_{len(tables) + 1}"))
    from promptclip.reports.tables import table_lines

    sections = []
    for table in tables:
        lines, legend = table_lines(table)
        notes = "\n".join(f"- {note}" for note in legend)
        sections.append(f"## {table.title}\n\n" + "\n".join(lines) + f"\n\n{notes}\n")
    claims = "\n".join(f"- {format_claim(result)}" for result in evaluate_claims(scores, DEMO_CLAIMS))
    if claims:
        sections.append(f"## The papers' claims on this world\n\n{claims}\n")
    body = "\n".join(sections)
    print(f"\n{body}")
    atomic_write_text(args.out / "demo.md", f"# promptclip demo\n\n{body}")
    from promptclip.reports.plots import PlotsUnavailable, write_plots

    try:
        for path in write_plots(tables, args.out):
            print(f"plot: {path}")
    except PlotsUnavailable as err:  # matplotlib is an optional dependency
        print(f"no plot: {err}", file=sys.stderr)
    print(f"table: {args.out / 'demo.md'} ({time.perf_counter() - started:.0f} s)")
    return 0


Job = tuple[DemoMethod, Any, Any]  # (method, run spec, run config)
JobResult = tuple[DemoMethod, Any, Path, dict[str, float] | None]


def _run_one(job: Job) -> JobResult:
    from promptclip.runs import RunOptions, execute

    item, spec, cfg = job
    options = RunOptions(progress=False, echo=False, allow_torchscript=True)  # --arch/--weights
    outcome = execute(spec, cfg, options)  # a finished run of the same identity is reused
    folder = outcome.run_dir.path if outcome.run_dir is not None else spec.run_dir
    if outcome.results is None:
        return item, spec, folder, None
    return item, spec, folder, {key: entry.accuracy for key, entry in outcome.results.evaluations.items()}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _default_jobs(device: str) -> int:
    import os

    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def run_jobs(jobs: Sequence[Job], processes: int | None) -> list[JobResult]:
    """Run every job, `processes` at a time (one thread each). Jobs with a stage 1 (DPC) run after the others,
    so they find their stage-1 run finished instead of training it a second time."""
    from tqdm import tqdm

    from promptclip.factory import run_needs

    later = [job for job in jobs if run_needs(job[2]).stage1 is not None]
    first = [job for job in jobs if job not in later]
    count = processes if processes is not None else _default_jobs(jobs[0][2].device if jobs else "cpu")
    results: list[JobResult] = []
    with tqdm(total=len(jobs), desc="demo", unit="run", dynamic_ncols=True) as bar:
        for wave in (first, later):
            if count <= 1 or len(wave) <= 1:
                for job in wave:
                    bar.set_postfix_str(f"{job[0].name} on {job[1].dataset}, seed {job[1].seed}")
                    results.append(_run_one(job))
                    bar.update(1)
                continue
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=count, mp_context=context, initializer=_one_thread) as pool:
                for result in pool.map(_run_one, wave):
                    results.append(result)
                    bar.update(1)
    return results


def claim_results(scores: dict[tuple[str, str, int], dict[str, float]]) -> list[ClaimResult]:
    """The demo's claims evaluated on `scores` ((method name, dataset, seed) -> base/new accuracy)."""
    from promptclip.reports.claims import evaluate_claims

    return evaluate_claims(scores, DEMO_CLAIMS)


def task_groups(profile: Profile, datasets: Sequence[str]) -> list[list[str]]:
    """The tasks that share one table: those the profile runs with the same methods (one table for tasks
    outside the profile)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for dataset in datasets:
        groups.setdefault(profile.runs.get(dataset, ()), []).append(dataset)
    return list(groups.values())


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
