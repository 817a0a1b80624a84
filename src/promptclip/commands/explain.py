"""`promptclip explain IMAGE --prompt DIR`: Grad-CAM of a tuned prompt beside zero-shot CLIP's, as one PNG.

The image is preprocessed as for evaluation (short side resized, centre crop) and that crop is what both
models see and what the panels show: the crop, the tuned model's heat map and zero-shot CLIP's heat map of the
same class (`--class`, else the tuned model's prediction), each captioned with the class and its probability.
Zero-shot CLIP uses the same class names and the same hand-written template as the tuned prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promptclip.classnames import prompt_name
from promptclip.commands.run import user_errors

if TYPE_CHECKING:  # imported when the command runs, so that building the command line imports no torch
    import numpy as np
    import torch


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from promptclip.commands.evaluate import add_backbone_arguments

    parser = subparsers.add_parser(
        "explain",
        help="Grad-CAM heat map of a tuned prompt beside zero-shot CLIP's",
        description="Render the input crop, the tuned model's Grad-CAM heat map and zero-shot CLIP's heat map "
        "of one class side by side in one PNG.",
    )
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("--prompt", required=True, help="a saved prompt folder (a run's prompt/)")
    parser.add_argument("--classes", help="comma-separated class names (default: the prompt's own)")
    parser.add_argument("--dataset", help="use this dataset's class names and template")
    parser.add_argument("--root", help="data root of --dataset (not needed for synthetic datasets)")
    parser.add_argument("--template", help="hand-written template (default: the dataset's or the prompt's)")
    parser.add_argument("--class", dest="target", help="class to explain (default: the tuned model's top class)")
    parser.add_argument("--out", help="PNG to write (default: <image name>_gradcam.png in this folder)")
    parser.add_argument("--size", type=int, default=224, help="panel size in pixels (default 224)")
    add_backbone_arguments(parser)
    parser.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from promptclip.commands.evaluate import backbone_source, prompt_folder
    from promptclip.commands.predict import build_predictor, class_list, load_images
    from promptclip.errors import CLIError
    from promptclip.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig
    from promptclip.runs.inputs import resolve_device

    if args.size < 32:
        raise CLIError("--size must be at least 32 pixels")
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}_gradcam.png")
    prompt_dir = prompt_folder(args.prompt)
    with user_errors():
        names, template = class_list(args)
        device = resolve_device(args.device)
        clip = backbone_source(prompt_dir, args.arch, args.weights).load(device)
        tuned = build_predictor(clip, prompt_dir, names, args.template or template, ensemble=False).to(device)
        zero_shot = ZeroShotCLIP(
            clip, tuned.classnames, ZeroShotConfig(), template=args.template or template or tuned.template
        ).to(device)
        pixels = load_images([args.image], clip.image_size).to(device)
    target = _target_class(args.target, tuned, pixels)
    panels = explain_panels(tuned, zero_shot, pixels, target, args.size)
    from promptclip.commands.masks import save_png
    from promptclip.reports.tiles import grid_image

    save_png(grid_image([panels]), out)
    print(f"{args.image}: Grad-CAM of {tuned.classnames[target]!r} written to {out}")
    return 0


def _target_class(name: str | None, learner: Any, pixels: torch.Tensor) -> int:
    import torch

    from promptclip.errors import CLIError

    if name is None:
        with torch.no_grad():
            learner.eval()
            return int(learner({"image": pixels}).logits.argmax(dim=-1)[0])
    wanted = prompt_name(name)
    if wanted not in learner.classnames:
        shown = ", ".join(learner.classnames[:10]) + (" ..." if len(learner.classnames) > 10 else "")
        raise CLIError(f"--class {name!r} is not one of the classes ({shown})")
    return learner.classnames.index(wanted)


def probabilities(learner: Any, pixels: torch.Tensor) -> torch.Tensor:
    import torch

    learner.eval()
    with torch.no_grad():
        return learner({"image": pixels}).logits.float().softmax(dim=-1)[0].cpu()


def explain_panels(tuned: Any, zero_shot: Any, pixels: torch.Tensor, target: int, size: int = 224) -> list[np.ndarray]:
    """[input crop, tuned heat overlay, zero-shot heat overlay] as captioned uint8 tiles."""
    import torch

    from promptclip.clip.transforms import CLIP_MEAN, CLIP_STD
    from promptclip.plugins.gradcam import gradcam
    from promptclip.reports.tiles import captioned, heat_overlay

    label = torch.tensor([target], device=pixels.device)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(3, 1, 1)
    crop = ((pixels[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    crop = _resize(crop, size)
    name = tuned.classnames[target]
    tiles = [captioned(crop, "input")]
    for title, learner in (("tuned", tuned), ("zero-shot", zero_shot)):
        heat = gradcam(learner, pixels, label)[0, 0].cpu().numpy()
        probability = float(probabilities(learner, pixels)[target])
        tiles.append(captioned(heat_overlay(crop, _resize_heat(heat, size)), f"{title}: {name} {probability:.0%}"))
    return tiles


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def _resize_heat(heat: np.ndarray, size: int) -> np.ndarray:
    import torch

    tensor = torch.from_numpy(heat)[None, None].float()
    resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()
