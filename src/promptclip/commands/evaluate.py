"""`promptclip eval --prompt DIR --dataset NAME`: evaluate a saved prompt on any dataset or class subset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import yaml

from promptclip.commands.run import user_errors
from promptclip.errors import CLIError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from promptclip.data.commands import add_dataset_arguments

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a saved prompt on a dataset or class subset",
        description="Load a prompt saved by a run (its prompt/ folder) onto its CLIP and report per-class "
        "counts and accuracy on a dataset split, with that dataset's (subset's) class names.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a saved prompt folder (a run's prompt/)")
    source.add_argument(
        "--official",
        help="a prompt file of the original CoOp/CoCoOp/KgCoOp code (prompt_learner/model.pth.tar-N) or its "
        "run folder; read with weights_only loading",
    )
    parser.add_argument("--epoch", type=int, help="with --official and a run folder: the epoch to load (default last)")
    parser.add_argument(
        "--class-token-position",
        choices=["end", "middle", "front"],
        default="end",
        help="with --official: where the class name sat in the original prompts (default end)",
    )
    add_dataset_arguments(parser)
    parser.add_argument("--subsample", choices=["all", "base", "new"], default="all", help="class subset (default all)")
    parser.add_argument("--split", choices=["train", "val", "test"], default="test", help="split (default test)")
    add_backbone_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=100, help="images per batch (default 100)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers (default 0)")
    parser.add_argument("--output", help="also write the counts as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_eval)


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", help="CLIP architecture or weights path (default: the prompt's run config)")
    parser.add_argument(
        "--weights", help="CLIP weights file (default: the prompt's run config, else the weights folder)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast on CUDA")


def backbone_source(prompt_dir: Path | None, arch: str | None, weights: str | None) -> tuple[str, str | None]:
    """(arch, weights) for a prompt: the flags, else the run's config.yaml beside prompt/, else the
    architecture the prompt records (weights found in the weights folder)."""
    from promptclip.methods.base import read_prompt_config

    if arch is None and prompt_dir is not None:
        from promptclip.runs.rundir import RunDir

        run_config = RunDir(prompt_dir.parent).config
        if run_config.is_file():
            model = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model") or {}
            arch = model.get("arch")
            weights = weights if weights is not None else model.get("weights")
        if arch is None:
            arch = read_prompt_config(prompt_dir).get("backbone", {}).get("arch")
    if arch is None:
        arch = "ViT-B-16"
    if weights == "random":
        from promptclip.errors import CLIError

        raise CLIError(
            f"{prompt_dir}: the prompt was trained on randomly initialised CLIP weights, which were not saved; "
            "pass --arch and --weights with the weights file to evaluate it on"
        )
    return arch, weights


def run_eval(args: argparse.Namespace) -> int:
    from promptclip.clip.weights import load_clip
    from promptclip.config import DataConfig, ModelConfig, RunConfig
    from promptclip.data.commands import dataset_options_from_args
    from promptclip.data.fewshot import subsample_classes
    from promptclip.protocols.spec import EvalTarget
    from promptclip.runs.evaluation import evaluate_target
    from promptclip.runs.inputs import DatasetCache, resolve_device

    prompt_dir = Path(args.prompt) if args.prompt else None
    if prompt_dir is not None and not prompt_dir.is_dir():
        raise CLIError(f"--prompt {prompt_dir}: no such folder; give a saved prompt folder (a run's prompt/)")
    with user_errors():
        device = resolve_device(args.device)
        arch, weights = backbone_source(prompt_dir, args.arch, args.weights)
        clip = load_clip(arch, weights, device=device)
        # The same evaluation pipeline as a run's (`promptclip.runs.evaluation`), on the flags' data.
        data = DataConfig(
            dataset=args.dataset,
            root=args.root,
            eval_batch_size=args.batch_size,
            num_workers=args.num_workers,
            options={args.dataset: dataset_options_from_args(args)},
        )
        cfg = RunConfig(model=ModelConfig(precision=args.precision), data=data)
        datasets = DatasetCache(cfg)
        splits = subsample_classes(datasets.get(args.dataset), args.subsample)
        if prompt_dir is not None:
            learner = _load_prompt(clip, prompt_dir, splits.classnames)
        else:
            learner = _load_official(args, clip, splits.classnames, splits.template)
        learner = learner.to(device)
        # Plug-ins that weight prompts per class subset (DPC) are told which subset this is, explicitly.
        subset: Literal["base", "new"] = "new" if args.subsample == "new" else "base"
        target = EvalTarget(args.subsample, args.dataset, args.subsample, args.split)
        progress = False if args.no_progress else None
        counts = evaluate_target(learner, target, subset, datasets, cfg, clip, device, progress)
    entry: dict[str, Any] = {
        "prompt": str(prompt_dir if prompt_dir is not None else args.official),
        "dataset": args.dataset,
        "subsample": args.subsample,
        "split": args.split,
        "backbone": {"arch": clip.config.name, "weights_sha256": clip.weights_sha256},
        **counts.to_dict(),
    }
    print(
        f"{args.dataset} [{args.subsample}, {args.split}]: accuracy {counts.accuracy:.2f}% "
        f"({counts.num_correct}/{counts.num_samples}), macro {counts.macro_accuracy:.2f}%, "
        f"{len(counts.classnames)} classes"
    )
    if args.output:
        from promptclip.io import atomic_write_json

        atomic_write_json(args.output, entry)
        print(f"counts: {args.output}")
    return 0


def _load_prompt(clip: Any, prompt_dir: Path, classnames: list[str]) -> Any:
    from promptclip.errors import CLIError
    from promptclip.factory import from_pretrained

    try:
        return from_pretrained(clip, prompt_dir, classnames=classnames)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None


def _load_official(args: argparse.Namespace, clip: Any, classnames: list[str], template: str) -> Any:
    from promptclip.errors import CLIError
    from promptclip.methods.official import OfficialCheckpointError, load_official_prompt

    try:
        return load_official_prompt(
            args.official,
            clip,
            classnames,
            template=template,
            class_token_position=args.class_token_position,
            epoch=args.epoch,
        )
    except (OfficialCheckpointError, FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
