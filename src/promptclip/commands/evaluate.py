"""`promptclip eval --prompt DIR --dataset NAME`: evaluate a saved prompt on any dataset or class subset."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BackboneSource:
    """The CLIP a command loads, and the file that named its weights path when no flag did."""

    arch: str
    weights: str | None
    named_in: str | None = None
    """`<file> (<field>)` when the path to open was read from a file (a run's config.yaml, a prompt's
    prompt_config.json); None when the command line named it, or a name finds it in the weights folder."""

    def load(self, device: Any) -> Any:
        """The frozen CLIP. A TorchScript archive opens only when the command line named it: one named by a
        file is refused, and the message says which file named it."""
        from promptclip.clip.weights import TorchScriptRefusedError, load_clip

        try:
            return load_clip(self.arch, self.weights, device=device, allow_torchscript=self.named_in is None)
        except TorchScriptRefusedError as err:
            if self.named_in is None:
                raise
            raise TorchScriptRefusedError(f"{self.named_in} names {err}", err.path) from None


def prompt_folder(text: str | None, flag: str = "--prompt") -> Path | None:
    """The saved prompt folder a flag names, checked: it exists and holds a saved prompt."""
    from promptclip.methods.base import CONFIG_FILE, WEIGHTS_FILE

    if text is None:
        return None
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise CLIError(f"{flag} {folder}: no such folder; give a saved prompt folder (a run's prompt/)")
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return folder
    if (folder / "prompt" / CONFIG_FILE).is_file():
        raise CLIError(f"{flag} {folder}: a run folder, not its prompt; give {flag} {folder / 'prompt'}")
    raise CLIError(
        f"{flag} {folder}: not a saved prompt (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); give a run's prompt/ "
        "folder, or a folder written by learner.save_pretrained(dir)"
    )


def backbone_source(prompt_dir: Path | None, arch: str | None, weights: str | None) -> BackboneSource:
    """The backbone of a prompt: the flags, else the run's config.yaml beside prompt/, else the architecture
    the prompt records (weights found in the weights folder). A path taken from a file is marked as such
    (`named_in`), so that `BackboneSource.load` never opens a TorchScript archive a file names."""
    from promptclip.methods.base import CONFIG_FILE, read_prompt_config

    named_in: str | None = None
    if arch is None and prompt_dir is not None:
        from promptclip.runs.rundir import RunDir

        run_config = RunDir(prompt_dir.parent).config
        if run_config.is_file():
            model = _run_config_model(run_config)
            arch = model.get("arch")
            if weights is None and model.get("weights") is not None:
                weights, named_in = model["weights"], f"{run_config} (model.weights)"
            elif weights is None and arch is not None:
                named_in = f"{run_config} (model.arch)"
        if arch is None:
            backbone = read_prompt_config(prompt_dir).get("backbone") or {}
            arch = backbone.get("arch") if isinstance(backbone, dict) else None
            if arch is not None and not isinstance(arch, str):
                from promptclip.methods.base import PromptFileError

                raise PromptFileError(
                    f"{prompt_dir / CONFIG_FILE}: backbone.arch must be an architecture name or path, not "
                    f"{arch!r}; save the prompt again, or pass --arch and --weights"
                )
            if weights is None and arch is not None:
                named_in = f"{prompt_dir / CONFIG_FILE} (backbone.arch)"
    if arch is None:
        arch = "ViT-B-16"
    if weights == "random" and prompt_dir is not None:
        raise CLIError(
            f"{prompt_dir}: the prompt was trained on randomly initialised CLIP weights, which were not saved; "
            "pass --arch and --weights with the weights file to evaluate it on"
        )
    return BackboneSource(arch, weights, named_in)


def _run_config_model(path: Path) -> dict[str, Any]:
    """The `model` section of a run folder's config.yaml, read with `yaml.safe_load` and checked."""
    from promptclip.config import ConfigError

    fix = "restore the run's config.yaml (promptclip writes it), or name the backbone with --arch and --weights"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); {fix}") from None
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        raise ConfigError(f"{path}: not valid YAML ({problem}); {fix}") from None
    data = {} if data is None else data
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(model, dict | None):
        raise ConfigError(f"{path}: expected a run config (a mapping with a `model` section); {fix}")
    model = model or {}
    for key in ("arch", "weights"):
        value = model.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{path}: model.{key} must be a name or path, not {value!r}; {fix}")
    return model


def run_eval(args: argparse.Namespace) -> int:
    from promptclip.config import DataConfig, ModelConfig, RunConfig
    from promptclip.data.commands import dataset_options_from_args
    from promptclip.data.fewshot import subsample_classes
    from promptclip.protocols.spec import EvalTarget
    from promptclip.runs.evaluation import evaluate_target
    from promptclip.runs.inputs import DatasetCache, resolve_device

    if args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size}: give at least 1 image per batch")
    if args.num_workers < 0:
        raise CLIError(f"--num-workers {args.num_workers}: give 0 (load in this process) or more")
    prompt_dir = prompt_folder(args.prompt)
    with user_errors():
        device = resolve_device(args.device)
        clip = backbone_source(prompt_dir, args.arch, args.weights).load(device)
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
        warn_unknown_class_words(clip, splits.classnames, f"{splits.display_name} ({args.subsample})")
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


def warn_unknown_class_words(clip: Any, classnames: list[str], where: str) -> None:
    """Say, before any image is read, when the class names hold words the backbone never learned (and which
    names it cannot tell apart under any prompt): `promptclip: warning: ...` on stderr."""
    from promptclip.clip.vocabulary import name_vocabulary
    from promptclip.runs.inputs import class_vocabulary_message

    vocabulary = name_vocabulary(clip, classnames)
    if vocabulary:
        message = class_vocabulary_message(vocabulary, len(classnames), where, clip.config.name)
        print(f"promptclip: warning: {message}", file=sys.stderr)


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
