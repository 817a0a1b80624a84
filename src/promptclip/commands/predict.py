"""`promptclip predict IMAGE...`: top-k classes with probabilities, from a saved prompt or zero-shot CLIP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from promptclip.commands.evaluate import (
    add_backbone_arguments,
    backbone_source,
    prompt_folder,
    warn_unknown_class_words,
)
from promptclip.commands.run import user_errors

BATCH = 32


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify images with a saved prompt or zero-shot CLIP",
        description="Print the top-k classes of each image with their probabilities. Classes come from "
        "--classes, a dataset's class list (--dataset), or the saved prompt's own classes.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--classes", help="comma-separated class names, e.g. cat,dog,bird")
    parser.add_argument("--dataset", help="use this dataset's class names and template")
    parser.add_argument("--root", help="data root of --dataset (not needed for synthetic datasets)")
    parser.add_argument("--prompt", help="a saved prompt folder; without it, zero-shot CLIP")
    parser.add_argument("--template", help="zero-shot prompt template (default: the dataset's, or 'a photo of a {}.')")
    parser.add_argument("--ensemble", action="store_true", help="zero-shot: average the 7-template ensemble")
    parser.add_argument("--topk", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_backbone_arguments(parser)
    parser.set_defaults(func=run_predict)


def check_template(template: str | None) -> None:
    """A --template must hold the class name's place once, as `{}` (it is filled with str.format)."""
    import string

    from promptclip.errors import CLIError

    if template is None:
        return
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:  # a lone { or }
        fields = [f"({err})"]
    if fields not in ([""], ["0"]):
        raise CLIError(
            f"--template {template!r}: the template must hold the class name's place exactly once, as {{}} (write "
            "a literal brace as {{ or }}), e.g. --template 'a photo of a {}.'"
        )


def class_list(args: argparse.Namespace) -> tuple[list[str] | None, str | None]:
    """(class names, template) from --classes or --dataset; (None, None) to use the prompt's own."""
    from promptclip.errors import CLIError

    check_template(args.template)
    if args.classes and args.dataset:
        raise CLIError("give either --classes or --dataset, not both")
    if args.classes:
        names = [name.strip() for name in args.classes.split(",") if name.strip()]
        if len(names) < 2:
            raise CLIError("--classes needs at least two class names, e.g. --classes cat,dog")
        return names, None
    if args.dataset:
        from promptclip.data.datasets import build_dataset

        splits = build_dataset(args.dataset, args.root)
        return list(splits.classnames), splits.template
    if not args.prompt:
        raise CLIError("give the classes: --classes a,b,c or --dataset NAME (or a --prompt that has its own)")
    return None, None


def run_predict(args: argparse.Namespace) -> int:
    from promptclip.engine.evaluate import predict_probabilities
    from promptclip.errors import CLIError
    from promptclip.runs.inputs import resolve_device

    if args.topk < 1:
        raise CLIError("--topk must be at least 1")
    prompt_dir = prompt_folder(args.prompt)
    with user_errors():
        names, template = class_list(args)
        device = resolve_device(args.device)
        clip = backbone_source(prompt_dir, args.arch, args.weights).load(device)
        learner = build_predictor(clip, prompt_dir, names, args.template or template, args.ensemble).to(device)
        warn_unknown_class_words(clip, learner.classnames, args.dataset or "the classes to predict")
        pixels = load_images(args.images, clip.image_size)
        probabilities = [
            predict_probabilities(learner, pixels[i : i + BATCH], device=device, precision=args.precision)
            for i in range(0, len(pixels), BATCH)
        ]
    import torch

    probs = torch.cat(probabilities)
    k = min(args.topk, probs.shape[1])
    top = probs.topk(k, dim=-1)
    results = [
        {
            "image": image,
            "top": [
                {"class": learner.classnames[int(c)], "probability": round(float(p), 6)}
                for p, c in zip(values, indices, strict=True)
            ],
        }
        for image, values, indices in zip(args.images, top.values, top.indices, strict=True)
    ]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(result["image"])
        for row in result["top"]:
            print(f"  {100 * row['probability']:6.2f}%  {row['class']}")
    return 0


def build_predictor(
    clip: Any, prompt_dir: Path | None, names: list[str] | None, template: str | None, ensemble: bool
) -> Any:
    from promptclip.errors import CLIError
    from promptclip.methods.base import PromptModel
    from promptclip.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig

    if prompt_dir is None:
        assert names is not None
        return ZeroShotCLIP(clip, names, ZeroShotConfig(ensemble=ensemble), template=template or "a photo of a {}.")
    try:
        learner = PromptModel.from_pretrained(clip, prompt_dir, classnames=names)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    if template:
        learner.set_template(template)
    return learner


def load_images(paths: list[str], image_size: int) -> Any:
    import torch

    from promptclip.clip.transforms import EvalTransform
    from promptclip.data.datasets.base import open_rgb
    from promptclip.errors import CLIError

    transform = EvalTransform(image_size)
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(open_rgb(Path(path))))
        except (OSError, ValueError) as err:
            raise CLIError(f"{path}: cannot read the image ({err})") from None
    return torch.stack(tensors)
