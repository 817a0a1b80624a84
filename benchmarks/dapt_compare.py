"""MaPLe against MaPLe + DAPT (DAPT-S with the exact masks, DAPT-G with Grad-CAM masks) on the synthetic world
with a spurious background correlation.

Usage:
    python benchmarks/dapt_compare.py [--arch tiny-synthetic] [--seeds 1,2,3] [--spurious 0.9] [--write-doc]

Training images of `synthetic_objects` (24 colour+shape classes) sit on the background scene tied to their
class with probability `--spurious`; validation and test scenes are uniform, so a model that learned the
shortcut loses accuracy at test time. Every variant trains through `promptclip run few_shot` with the
official DAPT few-shot recipe (maple_dapt/vit_b16_t: batch 4, SGD lr 0.0035, 10 epochs, the
official loss schedule), adapted to the small backbone (prompt depth = min(9, its layers), images rendered at
its input size). Reported per variant, mean +- std over seeds: test accuracy, and test accuracy on images whose
scene is the one tied to their class (aligned) and on the others (conflicting): the gap between the two
measures how much the prediction leans on the background. Also the mean IoU of each tuned model's Grad-CAM
mask of the true class (threshold 0.5) with the object's exact mask, and the time of one training step.

`--write-doc` puts the table, with the command that made it, into the `dapt-compare` section of
docs/dapt.md. Runs are kept in `--runs-dir` and skipped when finished, so an interrupted sweep resumes.

`--views` measures instead the time of one MaPLe + DAPT-S training step (forward, loss, backward) with
ViT-B/16's widths, patch size and context on random weights (`--view-layers` layers per tower, `--view-classes`
classes, batch 4), on both phases of the official schedule and on the joint one, for promptclip's path and
the naive ones of benchmarks/speed_paths.py: the stop-gradient views encoded with their graph, all views in one
pass with the graph, and three passes with their graphs (the official code's). With `--write-doc` the table
goes into the `dapt-views` section of docs/dapt.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import interleaved_medians, machine_description, write_section  # noqa: E402

DATASET = "synthetic_objects"
DOC = REPO / "docs" / "dapt.md"
SECTION = "dapt-compare"
VIEWS_SECTION = "dapt-views"


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    plugins: dict[str, Any]


VARIANTS = {
    "maple": Variant("MaPLe", "maple", {}),
    "dapt-s": Variant("MaPLe + DAPT-S (exact masks)", "maple+dapt", {"dapt": {"mask_source": "data"}}),
    "dapt-g": Variant("MaPLe + DAPT-G (Grad-CAM masks)", "maple+dapt", {"dapt": {"mask_source": "gradcam"}}),
    "dapt-s-joint": Variant(
        "MaPLe + DAPT-S, joint schedule", "maple+dapt", {"dapt": {"mask_source": "data", "schedule": "joint"}}
    ),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny-synthetic", help="CLIP (default: the bundled tiny-synthetic)")
    parser.add_argument("--weights", help="weights file, or 'random' (only to try the script)")
    parser.add_argument("--variants", default="maple,dapt-s,dapt-g", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--spurious", type=float, default=0.9, help="train-split class/scene correlation")
    parser.add_argument("--train-per-class", type=int, default=32)
    parser.add_argument("--test-per-class", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "dapt_compare"))
    parser.add_argument("--write-doc", action="store_true", help=f"put the table into {DOC.relative_to(REPO)}")
    parser.add_argument("--views", action="store_true", help="time the step's view passes instead (see above)")
    parser.add_argument("--view-layers", type=int, default=2, help="layers per tower of the --views backbone")
    parser.add_argument("--view-classes", type=int, default=50)
    parser.add_argument("--view-repeats", type=int, default=5, help="timed steps per path and phase")
    return parser.parse_args(argv)


def recipe_for(variant: Variant, args: argparse.Namespace, depth: int, image_size: int) -> dict[str, Any]:
    """The official few-shot recipe with the variant's plug-ins, on the small backbone and the synthetic data."""
    from promptclip.recipes import resolve_recipe

    recipe = yaml.safe_load(resolve_recipe("maple_dapt/vit_b16_t").read_text())
    recipe["method"] = variant.method
    recipe["method_cfg"]["depth"] = depth
    dapt = {k: v for k, v in recipe["plugins"]["dapt"].items() if k != "mask"}
    recipe["plugins"] = {name: {**dapt, **cfg} for name, cfg in variant.plugins.items()}
    recipe["model"] = {"arch": args.arch, "weights": args.weights, "precision": "fp32"}
    recipe["data"].update(
        dataset=DATASET,
        num_workers=0,
        options={
            "spurious": args.spurious,
            "image_size": image_size,
            "train_per_class": args.train_per_class,
            "val_per_class": 1,
            "test_per_class": args.test_per_class,
        },
    )
    recipe["optim"]["epochs"] = args.epochs
    recipe["device"] = args.device
    return recipe


def run_variant(name: str, args: argparse.Namespace, depth: int, image_size: int) -> None:
    from promptclip.cli import main as cli

    runs = Path(args.runs_dir)
    recipe_path = runs / "recipes" / f"{name}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe_for(VARIANTS[name], args, depth, image_size), sort_keys=False))
    argv = ["run", "few_shot", "--recipe", str(recipe_path), "--datasets", DATASET, "--seeds", args.seeds]
    argv += ["--shots", str(args.shots), "--runs-dir", str(runs), "--quiet"]
    if cli(argv) != 0:
        raise SystemExit(f"the {name} runs failed; see the log.txt files below {runs}")


def run_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    method = VARIANTS[name].method
    return Path(args.runs_dir) / "few_shot" / DATASET / method / name / f"shots{args.shots}" / f"seed{seed}"


@dataclass(frozen=True)
class Diagnostics:
    aligned: float
    """Test accuracy (%) on images whose scene is the one tied to their class in training."""
    conflicting: float
    """Test accuracy (%) on the other test images."""
    cam_iou: float
    """Mean IoU (%) of the tuned model's Grad-CAM mask of the true class with the object's exact mask."""
    accuracy: float
    """Test accuracy (%) over all test images."""


def diagnose(folder: Path, args: argparse.Namespace) -> Diagnostics:
    """Background reliance and Grad-CAM localisation of one finished run, on its test split."""
    from promptclip.config import build_run_config
    from promptclip.methods.base import PromptModel
    from promptclip.runs.inputs import load_backbone, resolve_device

    config = build_run_config(yaml.safe_load((folder / "config.yaml").read_text()), source=str(folder))
    device = resolve_device(args.device)
    clip = load_backbone(config, device)  # the run's backbone (random weights of a trial run included)
    splits = synthetic_splits(config.data.options)
    learner = PromptModel.from_pretrained(clip, folder / "prompt", classnames=splits.classnames).to(device)
    return diagnose_learner(learner, config.data.options, device)


def synthetic_splits(options: dict[str, Any]) -> Any:
    from promptclip.data.datasets import build_dataset

    return build_dataset(DATASET, None, **options)


def diagnose_learner(learner: Any, options: dict[str, Any], device: torch.device) -> Diagnostics:
    """Accuracy on aligned / conflicting test scenes and Grad-CAM IoU of `learner` (evaluation mode)."""
    from promptclip.data import synthetic
    from promptclip.data.loader import build_loader
    from promptclip.plugins.gradcam import gradcam_masks

    splits = synthetic_splits(options)
    learner.eval()
    task = synthetic.build_task(DATASET, **options)
    aligned = torch.tensor([s.spec.scene == task.scene_of_class[s.label] for s in task.test])
    size = learner.clip.image_size
    predictions, ious = [], []
    for batch in build_loader(splits, "test", batch_size=256, train=False, image_size=size, with_masks=True):
        images, labels = batch["image"].to(device), batch["label"].to(device)
        with torch.no_grad():
            predictions.append(learner({"image": images}).logits.argmax(dim=-1).cpu())
        cam = gradcam_masks(learner, images, labels).cpu().bool()
        exact = batch["mask"].bool()
        ious.append((cam & exact).sum(dim=(1, 2, 3)) / (cam | exact).sum(dim=(1, 2, 3)).clamp(min=1))
    labels = torch.tensor([d.label for d in splits.test])
    hits = (torch.cat(predictions) == labels).float()
    return Diagnostics(
        aligned=100 * float(hits[aligned].mean()),
        conflicting=100 * float(hits[~aligned].mean()),
        cam_iou=100 * float(torch.cat(ious).float().mean()),
        accuracy=100 * float(hits.mean()),
    )


def zero_shot_row(args: argparse.Namespace) -> str:
    """The same diagnostics for zero-shot CLIP with the dataset's template (nothing trained)."""
    from promptclip.clip.weights import load_clip
    from promptclip.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig
    from promptclip.runs.inputs import resolve_device

    device = resolve_device(args.device)
    clip = load_clip(args.arch, args.weights, device=device)
    options = {
        "spurious": args.spurious,
        "image_size": clip.image_size,
        "train_per_class": args.train_per_class,
        "val_per_class": 1,
        "test_per_class": args.test_per_class,
    }
    splits = synthetic_splits(options)
    learner = ZeroShotCLIP(clip, splits.classnames, ZeroShotConfig(), template=splits.template).to(device)
    found = diagnose_learner(learner, options, device)
    cells = [f"{found.accuracy:.2f}", f"{found.aligned:.2f}", f"{found.conflicting:.2f}"]
    cells += [f"{found.aligned - found.conflicting:.2f}", f"{found.cam_iou:.2f}", "—"]
    return "| zero-shot CLIP (no training) | " + " | ".join(cells) + " |"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def step_milliseconds(args: argparse.Namespace, names: list[str], depth: int, image_size: int) -> dict[str, str]:
    """Median milliseconds of one training step (forward, loss, backward; batch of the recipe) per variant,
    timed in turns so that load changes weigh on all alike; "a / b" for the official schedule's two phases
    (pull-push epochs / alignment epochs)."""
    from promptclip.clip.weights import load_clip
    from promptclip.data.loader import build_loader
    from promptclip.methods.base import get_prompt_model
    from promptclip.plugins.base import wrap_with_plugins
    from promptclip.runs.inputs import resolve_device

    device = resolve_device(args.device)
    clip = load_clip(args.arch, args.weights, device=device)
    recipes = {name: recipe_for(VARIANTS[name], args, depth, image_size) for name in names}
    splits = synthetic_splits(recipes[names[0]]["data"]["options"])
    batch_size = recipes[names[0]]["data"]["batch_size"]
    loader = build_loader(splits, "train", batch_size=batch_size, image_size=image_size, seed=0, with_masks=True)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(iter(loader)).items()}
    # The official schedule has two phases with different terms; anything else costs the same every epoch.
    official = {n for n in names if recipes[n]["plugins"].get("dapt", {}).get("schedule") == "official"}
    phases = {n: (0, args.epochs - 1) if n in official and args.epochs > 1 else (0,) for n in names}
    steps = {}
    for name in names:
        recipe = recipes[name]
        learner = get_prompt_model(clip, {"method": "maple", **recipe["method_cfg"]}, splits.classnames)
        learner = wrap_with_plugins(learner, recipe["plugins"]).to(device)
        learner.train()
        for epoch in phases[name]:

            def step(learner: Any = learner, epoch: int = epoch) -> None:
                learner.on_epoch_start(epoch, args.epochs)
                sum(learner.loss(batch, learner(batch)).values()).backward()

            steps[(name, epoch)] = step
    medians = interleaved_medians({f"{n}/{e}": f for (n, e), f in steps.items()}, repeats=20, warmup=2)
    return {name: " / ".join(f"{1000 * medians[f'{name}/{e}']:.0f}" for e in phases[name]) for name in names}


def table(args: argparse.Namespace, names: list[str], seeds: list[int], depth: int, image_size: int) -> str:
    milliseconds = step_milliseconds(args, names, depth, image_size)
    rows = [
        "| variant | test accuracy | aligned scene | conflicting scene | gap | Grad-CAM IoU | ms/step |",
        "|---|---|---|---|---|---|---|",
        zero_shot_row(args),
    ]
    for name in names:
        accuracy, found = [], []
        for seed in seeds:
            folder = run_dir(args, name, seed)
            results = json.loads((folder / "results.json").read_text())
            accuracy.append(results["evaluations"]["all"]["accuracy"])
            found.append(diagnose(folder, args))
        aligned, conflicting = [d.aligned for d in found], [d.conflicting for d in found]
        gaps = [a - c for a, c in zip(aligned, conflicting, strict=True)]
        cells = [mean_std(accuracy), mean_std(aligned), mean_std(conflicting), mean_std(gaps)]
        cells += [mean_std([d.cam_iou for d in found]), milliseconds[name]]
        rows.append(f"| {VARIANTS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# (DAPT settings, epoch) of each schedule phase, and the paths of one step.
VIEW_PHASES = {
    "official, pull-push epochs": ({}, 0),
    "official, alignment epochs": ({}, 7),
    "joint": ({"schedule": "joint"}, 0),
}
VIEW_PATHS = ("promptclip", "targets with a graph", "one pass with a graph", "three passes")


def view_step(learner: Any, batch: dict[str, Any], path: str) -> None:
    """One training step (forward, loss, backward) of `learner` through `path`."""
    from speed_paths import dapt_one_graph_pass, dapt_targets_with_graph, dapt_three_passes

    contexts = {"targets with a graph": dapt_targets_with_graph, "one pass with a graph": dapt_one_graph_pass}
    with contexts[path](learner) if path in contexts else contextlib.nullcontext():
        output = dapt_three_passes(learner, batch) if path == "three passes" else learner(batch)
        loss = torch.stack([term.float() for term in learner.loss(batch, output).values()]).sum()
    loss.backward()
    learner.zero_grad(set_to_none=True)


def view_table(args: argparse.Namespace) -> str:
    """CPU milliseconds per step of each path and phase (timed in turns; CPU time, so that other processes on
    a loaded machine do not count) and their ratios to promptclip's path."""
    from methods import CASES, build_clip, build_learner, class_names, make_batch

    from promptclip.runs.inputs import resolve_device

    device = resolve_device(args.device)
    clip = build_clip("ViT-B-16", args.view_layers, device)
    case = next(c for c in CASES if c.name == "maple+dapt")
    batch = make_batch(case, 4, args.view_classes, clip.image_size, device)
    steps = {}
    for phase, (settings, epoch) in VIEW_PHASES.items():
        for path in VIEW_PATHS:
            phase_case = dataclasses.replace(case, plugins={"dapt": settings})
            learner = build_learner(phase_case, clip, class_names(args.view_classes), {}).train()
            learner.on_epoch_start(epoch, 10)
            steps[f"{phase}/{path}"] = functools.partial(view_step, learner, batch, path)
    medians = interleaved_medians(steps, repeats=args.view_repeats, warmup=1, clock=time.process_time)
    rows = ["| schedule phase | " + " | ".join(f"{path} (CPU ms)" for path in VIEW_PATHS) + " |", "|---" * 5 + "|"]
    for phase in VIEW_PHASES:
        ours = medians[f"{phase}/promptclip"]
        cells = [f"{1000 * ours:.0f}"]
        for path in VIEW_PATHS[1:]:
            theirs = medians[f"{phase}/{path}"]
            cells.append(f"{1000 * theirs:.0f} (**{theirs / ours:.2f}x**)")
        rows.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def views_main(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    body = view_table(args)
    command = "python benchmarks/dapt_compare.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    section = (
        f"Measured with `{command.strip()}` on {machine_description()}.\n"
        f"MaPLe (depth {args.view_layers}) + DAPT-S, ViT-B/16 widths with {args.view_layers} layers per tower, random "
        f"weights, {args.view_classes} classes, batch 4, 224 px; median CPU time of {args.view_repeats} steps "
        "per cell, timed in turns; in brackets the time over promptclip's.\n\n"
        f"{body}\n"
    )
    print(section)
    if args.write_doc:
        write_section(VIEWS_SECTION, section, path=DOC)
        print(f"written to the {VIEWS_SECTION} section of {DOC}")


def main(argv: Sequence[str] | None = None) -> None:
    from promptclip.clip.weights import load_clip

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.views:
        views_main(args, argv)
        return
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    arch = load_clip(args.arch, args.weights).config  # a name, a bundled model or a weights file
    depth, image_size = min(9, arch.vision.layers, arch.text.layers), arch.vision.image_size
    for name in names:
        run_variant(name, args, depth, image_size)
    body = table(args, names, seeds, depth, image_size)
    command = "python benchmarks/dapt_compare.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    section = (
        f"Measured with `{command.strip()}` on {machine_description()}.\n"
        f"{DATASET}, {args.shots} shots, spurious {args.spurious}, {args.epochs} epochs, backbone {args.arch} "
        f"(prompt depth {depth}, {image_size} px), seeds {args.seeds}; accuracies in %, mean ± std over seeds.\n\n"
        f"{body}\n"
    )
    print(section)
    if args.write_doc:
        write_section(SECTION, section, path=DOC)
        print(f"written to the {SECTION} section of {DOC}")


if __name__ == "__main__":
    main()
