"""`promptclip import --method M PATH --out DIR`: a prompt trained with the field's original code, as a prompt
folder that `promptclip eval --prompt DIR` and `from_pretrained` load (see `promptclip.official_import`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from promptclip.commands.run import user_errors
from promptclip.errors import CLIError

# The methods whose original files are read (`official_import.IMPORTABLE_METHODS`, kept here as text so that
# building the command line imports no torch).
METHODS = (
    "coop",
    "cocoop",
    "kgcoop",
    "maple",
    "maple+dapt",
    "ivlp",
    "vpt",
    "deep_lang",
    "promptsrc",
    "promptkd",
    "coop+dpc",
    "promptkd+dpc",
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="turn a prompt saved by the original code (model.pth.tar-N) into a prompt folder",
        description="Read a prompt checkpoint written by the method's original trainer (Dassl's "
        "model.pth.tar-N or model-best.pth.tar, or its run folder) without running any code from it, and "
        "write it as a promptclip prompt folder for `promptclip eval --prompt`. The prompt's lengths and depths "
        "come from the file; the class names, the backbone and CTX_INIT are given here.",
    )
    parser.add_argument("path", metavar="PATH", help="the original trainer's file, or its run folder (last epoch)")
    parser.add_argument("--method", required=True, metavar="M", help=f"the method that saved it: {', '.join(METHODS)}")
    parser.add_argument("--out", required=True, help="the prompt folder to write")
    classes = parser.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", help="comma-separated class names, e.g. cat,dog,bird")
    classes.add_argument("--dataset", help="use this dataset's class names and template")
    parser.add_argument("--root", help="data root of --dataset (not needed for synthetic datasets)")
    parser.add_argument(
        "--subsample", choices=["all", "base", "new"], default="all", help="--dataset's class subset (default all)"
    )
    parser.add_argument("--epoch", type=int, help="with a run folder: the epoch to read (default the last)")
    parser.add_argument(
        "--ctx-init",
        default="a photo of a",
        help="the trainer's CTX_INIT, the text prompt around the learned tokens (default 'a photo of a', the "
        "published MaPLe, IVLP, PromptSRC and PromptKD configs)",
    )
    parser.add_argument(
        "--class-token-position",
        choices=["end", "middle", "front"],
        default="end",
        help="CoOp's CLASS_TOKEN_POSITION (default end)",
    )
    parser.add_argument("--stage1", help="DPC: the stage-1 file or run folder (the trainer's SPLE.BACK_CKPT_PATH)")
    parser.add_argument(
        "--teacher", help="PromptKD: the teacher's file (PromptSRC's, as PromptKD publishes it) or prompt folder"
    )
    parser.add_argument("--teacher-arch", default="ViT-L-14", help="PromptKD: the teacher's CLIP (default ViT-L-14)")
    parser.add_argument("--teacher-weights", help="PromptKD: the teacher's weights file (default: the weights folder)")
    parser.add_argument("--arch", default="ViT-B-16", help="CLIP architecture or weights path (default ViT-B-16)")
    parser.add_argument("--weights", help="CLIP weights file (default: the weights folder)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu)")
    parser.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from promptclip.commands.evaluate import BackboneSource
    from promptclip.methods.official import OfficialCheckpointError
    from promptclip.official_import import ImportSource, import_official
    from promptclip.runs.inputs import resolve_device

    if args.method not in METHODS:
        raise CLIError(f"--method {args.method!r}: the original files this reads are those of {', '.join(METHODS)}")
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"--out {out}: exists and is not an empty folder; name a new folder")
    with user_errors():
        names, template = class_names(args)
        device = resolve_device(args.device)
        clip = BackboneSource(args.arch, args.weights).load(device)
        source = ImportSource(
            path=Path(args.path).expanduser(),
            clip=clip,
            classnames=names,
            template=template,
            epoch=args.epoch,
            ctx_init=args.ctx_init,
            class_token_position=args.class_token_position,
            stage1=Path(args.stage1).expanduser() if args.stage1 else None,
            teacher=Path(args.teacher).expanduser() if args.teacher else None,
            teacher_arch=args.teacher_arch,
            teacher_weights=args.teacher_weights,
            out=out,
        )
        try:
            learner = import_official(args.method, source)
        except (OfficialCheckpointError, FileNotFoundError) as err:
            raise CLIError(str(err)) from None
        learner.save_pretrained(out)
    for note in source.notes:
        print(note)
    print(f"{args.path} -> {out} ({args.method} on {clip.config.name}, {len(names)} classes)")
    weights = f" --weights {args.weights}" if args.weights else ""
    print(f"evaluate it with: promptclip eval --prompt {out} --arch {args.arch}{weights} --dataset NAME")
    return 0


def class_names(args: argparse.Namespace) -> tuple[list[str], str]:
    """(class names, template) from --classes or --dataset (its --subsample)."""
    if args.classes:
        names = [name.strip() for name in args.classes.split(",") if name.strip()]
        if len(names) < 2:
            raise CLIError("--classes needs at least two class names, e.g. --classes cat,dog")
        return names, "a photo of a {}."
    from promptclip.data.datasets import build_dataset
    from promptclip.data.fewshot import subsample_classes

    splits: Any = subsample_classes(build_dataset(args.dataset, args.root), args.subsample)
    return list(splits.classnames), str(splits.template)
