"""`promptclip convert-weights IN OUT`: any accepted CLIP weights file (an OpenAI TorchScript archive included)
rewritten as plain-tensor safetensors, so later runs never open the archive again."""

from __future__ import annotations

import argparse
from pathlib import Path

from promptclip.commands.run import user_errors


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-weights",
        help="rewrite a CLIP weights file (e.g. OpenAI's TorchScript ViT-B-16.pt) as safetensors",
        description="Read a CLIP weights file you trust (a TorchScript archive, a state dict, a Hugging Face "
        "folder) and write its tensors and architecture as one .safetensors file (plus <stem>.json beside it), "
        "which loads without running any code: use it as --weights / model.weights from then on.",
    )
    parser.add_argument("source", metavar="IN", help="the weights file or Hugging Face folder to read")
    parser.add_argument("target", metavar="OUT", help="the .safetensors file to write")
    parser.add_argument("--arch", help="architecture to check the file against (default: inferred)")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from promptclip.clip.weights import load_clip, save_clip
    from promptclip.errors import CLIError

    source, target = Path(args.source).expanduser(), Path(args.target).expanduser()
    if target.suffix != ".safetensors":
        raise CLIError(f"OUT {target}: name the file to write '*.safetensors'")
    if target.exists() and target.resolve() == source.resolve():
        raise CLIError(f"OUT {target} is the file being read; name another file")
    with user_errors():
        # The user names IN on this command line: the one place meant for opening an archive once.
        if args.arch:
            clip = load_clip(args.arch, source, allow_torchscript=True)
        else:
            clip = load_clip(source, allow_torchscript=True)
        save_clip(clip, target)
    print(f"{source} -> {target} ({clip.config.name})")
    print(f"use it with: --weights {target} (or --opts model.weights {target})")
    return 0
