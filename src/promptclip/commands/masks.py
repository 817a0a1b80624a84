"""`promptclip masks {gradcam,show}`: foreground masks for DAPT.

    promptclip masks gradcam --dataset NAME --root DIR --out MASK_DIR [--prompt DIR] [--split train|val|test|all]
                             [--shots K --seed S] [--threshold 0.5] [--overwrite]
    promptclip masks show    --dataset NAME --root DIR [--mask-dir DIR ...] [--split train] [--count 8]
                             --out FILE.png

`gradcam` writes one binary PNG (0 background, 255 foreground) per image, at the image's own size, in the mask
store's `mirror` layout below MASK_DIR (the image's path below the dataset's image folder, extension `.png`),
so a DAPT-S run reads them with `--opts plugins.dapt.mask.mask_dir MASK_DIR`. The model is a saved prompt
(`--prompt`) or zero-shot CLIP; the class scored is the image's ground truth. Each image is squashed to the
model's input size (no crop, so the mask covers the whole image), its patch-grid CAM upsampled bilinearly to
the original size, normalised by its maximum and thresholded. Existing masks are kept unless `--overwrite`.

`show` renders image / mask-overlay pairs of a split as one PNG, from the dataset's own masks (synthetic data),
or from mask files found with the `--mask-*` options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promptclip.commands.run import user_errors

if TYPE_CHECKING:  # imported when a command runs, so that building the command line imports no torch
    import numpy as np
    import torch
    from PIL import Image

MANIFEST = "gradcam_masks.json"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from promptclip.commands.evaluate import add_backbone_arguments
    from promptclip.data.commands import add_dataset_arguments, add_mask_arguments

    masks = subparsers.add_parser("masks", help="compute Grad-CAM foreground masks (DAPT-G), render mask overlays")
    actions = masks.add_subparsers(dest="masks_command", metavar="ACTION")
    masks.set_defaults(func=lambda args: _print_help(masks))

    gradcam = actions.add_parser(
        "gradcam",
        help="compute and store Grad-CAM masks of a dataset in the mask store's layout",
        description="Grad-CAM masks of the ground-truth class (last block's pre-attention LayerNorm, patch "
        "tokens, per-image max normalisation, threshold) from a saved prompt or zero-shot CLIP, written as "
        "binary PNGs mirroring the image paths below --out.",
    )
    add_dataset_arguments(gradcam)
    gradcam.add_argument("--out", required=True, help="mask folder to write (the mask store's mirror layout)")
    gradcam.add_argument("--prompt", help="a saved prompt folder; without it, zero-shot CLIP")
    gradcam.add_argument(
        "--split", choices=["train", "val", "test", "all"], default="train", help="images (default train)"
    )
    gradcam.add_argument("--shots", type=int, default=0, help="only the K-shot training draw of --seed (0: all)")
    gradcam.add_argument("--seed", type=int, default=1, help="seed of the K-shot draw (default 1)")
    gradcam.add_argument("--threshold", type=float, default=0.5, help="foreground where heat >= this (default 0.5)")
    gradcam.add_argument("--batch-size", type=int, default=32, help="images per Grad-CAM pass (default 32)")
    gradcam.add_argument("--overwrite", action="store_true", help="recompute masks that exist already")
    gradcam.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backbone_arguments(gradcam)
    gradcam.set_defaults(func=run_gradcam)

    show = actions.add_parser("show", help="render images beside their mask overlays as one PNG")
    add_dataset_arguments(show)
    add_mask_arguments(show, with_fallback=False)
    show.add_argument("--split", choices=["train", "val", "test"], default="train", help="split (default train)")
    show.add_argument("--count", type=int, default=8, help="images to show, spread over the split (default 8)")
    show.add_argument("--out", required=True, help="PNG file to write")
    show.set_defaults(func=run_show)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


# ---------------------------------------------------------------------------------------------------------
# masks gradcam
# ---------------------------------------------------------------------------------------------------------


def run_gradcam(args: argparse.Namespace) -> int:
    from promptclip.commands.evaluate import backbone_source, prompt_folder
    from promptclip.errors import CLIError
    from promptclip.runs.inputs import resolve_device

    if not 0.0 <= args.threshold <= 1.0:
        raise CLIError(f"--threshold {args.threshold}: give a value in [0, 1]")
    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    prompt_dir = prompt_folder(args.prompt)
    with user_errors():
        splits = _dataset(args)
        data = _images_of(splits, args.split, args.shots, args.seed)
        device = resolve_device(args.device)
        clip = backbone_source(prompt_dir, args.arch, args.weights).load(device)
        learner = _scoring_learner(clip, prompt_dir, splits)
    out = Path(args.out).expanduser()
    written, kept = write_gradcam_masks(
        learner, splits, data, out, args.threshold, args.batch_size, args.overwrite, progress=not args.no_progress
    )
    summary = gradcam_mask_summary(splits, data, out)
    from promptclip.io import atomic_write_json

    atomic_write_json(
        out / MANIFEST,
        {
            "dataset": splits.name,
            "split": args.split,
            "shots": args.shots,
            "seed": args.seed,
            "model": str(prompt_dir) if prompt_dir else f"zero-shot {clip.config.name}",
            "backbone": {"arch": clip.config.name, "weights_sha256": clip.weights_sha256},
            "threshold": args.threshold,
            "images": len(data),
            "layout": "mirror",
            "empty": len(summary.empty),
            "full": len(summary.full),
            "mean_foreground": round(summary.mean_foreground, 4),
        },
    )
    print(f"{splits.name}: {written} masks written, {kept} kept, in {out}")
    print(f"masks: {summary.describe()}")
    _warn_empty_or_full(summary)
    print(f"train DAPT-S on them with: --opts plugins.dapt.mask.rule mirror plugins.dapt.mask.mask_dir {out.resolve()}")
    return 0


def _dataset(args: argparse.Namespace) -> Any:
    from promptclip.data.commands import dataset_options_from_args
    from promptclip.data.datasets import build_dataset

    return build_dataset(args.dataset, args.root, **dataset_options_from_args(args))


def _images_of(splits: Any, split: str, shots: int, seed: int) -> list[Any]:
    from promptclip.data.fewshot import fewshot_splits

    if shots >= 1:
        splits = fewshot_splits(splits, shots, seed)
    names = ("train", "val", "test") if split == "all" else (split,)
    data = [datum for name in names for datum in splits.split(name)]
    if not data:
        from promptclip.data.datasets import DatasetError

        raise DatasetError(f"dataset {splits.name!r} has no images in split {split!r}")
    return data


def _scoring_learner(clip: Any, prompt_dir: Path | None, splits: Any) -> Any:
    """The saved prompt on the dataset's classes, or zero-shot CLIP with the dataset's template."""
    from promptclip.methods.base import PromptModel
    from promptclip.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig

    device = clip.token_embedding.weight.device
    if prompt_dir is None:
        return ZeroShotCLIP(clip, splits.classnames, ZeroShotConfig(), template=splits.template).to(device)
    learner = PromptModel.from_pretrained(clip, prompt_dir, classnames=splits.classnames).to(device)
    learner.set_template(splits.template)
    return learner


def mask_store_path(out: Path, splits: Any, datum: Any) -> Path:
    """Where the mask of `datum` goes: the mask store's mirror layout below `out`, as PNG."""
    from promptclip.data.masks import FileMaskStore, MaskConfig

    store = FileMaskStore(splits.root or Path("."), splits.image_dir, MaskConfig(mask_dir=str(out.resolve())))
    return (out / store.relative_mask_path(datum)).with_suffix(".png")


def gradcam_mask_summary(splits: Any, data: Sequence[Any], out: Path) -> Any:
    """The `MaskSummary` of the masks below `out` (empty, full, mean foreground), read as a DAPT-S run reads
    them (mirror layout, binary encoding)."""
    from promptclip.data.masks import FileMaskStore, MaskConfig, mask_summary

    config = MaskConfig(rule="mirror", mask_dir=str(out.resolve()), encoding="binary")
    store = FileMaskStore(splits.root or Path("."), splits.image_dir, config)
    return mask_summary(splits.replace(masks=store), data)


def _warn_empty_or_full(summary: Any) -> None:
    from promptclip.data.masks import DEFAULT_MAX_EMPTY_OR_FULL

    if summary.too_many(DEFAULT_MAX_EMPTY_OR_FULL):
        print(
            f"warning: {summary.empty_or_full} of {summary.total} masks are empty or full, more than a DAPT-S run "
            f"accepts by default (max_empty_or_full {DEFAULT_MAX_EMPTY_OR_FULL:g}); look at them with `promptclip "
            "masks show`, try another --threshold or --prompt, or choose plugins.dapt.mask.fallback full|skip:\n  "
            f"{summary.listed(5)}",
            file=sys.stderr,
        )


def squashed_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """[3, size, size] CLIP-normalised pixels of the whole image, resized without a crop (bicubic)."""
    from PIL import Image

    from promptclip.clip.transforms import normalize, pil_to_tensor

    return normalize(pil_to_tensor(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)))


def write_gradcam_masks(
    learner: Any,
    splits: Any,
    data: Sequence[Any],
    out: Path,
    threshold: float = 0.5,
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = False,
) -> tuple[int, int]:
    """Compute and write the Grad-CAM mask of every datum; returns (written, kept as they were)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from promptclip.plugins.gradcam import gradcam_grid, heat_to_mask, upsample_cam
    from promptclip.reports.tiles import write_png

    size = learner.clip.image_size
    device = learner.clip.token_embedding.weight.device
    todo = [d for d in data if overwrite or not mask_store_path(out, splits, d).is_file()]
    written = 0
    for start in tqdm(range(0, len(todo), batch_size), disable=not progress, desc="grad-cam", leave=False):
        chunk = todo[start : start + batch_size]
        images = [splits.load_image(datum) for datum in chunk]
        pixels = torch.stack([squashed_pixels(image, size) for image in images]).to(device)
        labels = torch.tensor([datum.label for datum in chunk], device=device)
        cams, _ = gradcam_grid(learner, pixels, labels)
        for datum, image, cam in zip(chunk, images, cams, strict=True):
            heat = upsample_cam(cam[None], (image.height, image.width))
            mask = heat_to_mask(heat, threshold)[0, 0].cpu().numpy()
            write_png(mask_store_path(out, splits, datum), np.where(mask > 0, 255, 0).astype(np.uint8))
            written += 1
    return written, len(data) - len(todo)


# ---------------------------------------------------------------------------------------------------------
# masks show
# ---------------------------------------------------------------------------------------------------------


def run_show(args: argparse.Namespace) -> int:
    from promptclip.data.commands import mask_config_from_args
    from promptclip.data.masks import FileMaskStore, MaskConfig
    from promptclip.errors import CLIError
    from promptclip.reports.tiles import mask_sheet

    if args.count < 1:
        raise CLIError("--count must be at least 1")
    with user_errors():
        splits = _dataset(args)
        config = mask_config_from_args(args)
        if config is not None or splits.root is not None:
            if splits.root is None and (config is None or config.mask_dir is None):
                raise CLIError(f"dataset {splits.name!r} has no folder: give --mask-dir to show mask files")
            store = FileMaskStore(
                splits.root or Path("."), splits.image_dir, config or MaskConfig(), splits.official_mask_layout
            )
            splits = splits.replace(masks=store, info={**splits.info, "masks": store.description})
        elif not splits.has_masks:
            raise CLIError(f"dataset {splits.name!r} has no masks to show")
        data = splits.split(args.split)
        if not data:
            raise CLIError(f"the {args.split} split of {splits.name!r} is empty")
        chosen = spread(len(data), args.count)
        pairs = []
        for index in chosen:
            datum = data[index]
            image = splits.load_image(datum)
            mask = splits.load_mask(datum)
            if mask is None:
                raise CLIError(f"no mask for {datum.path} ({splits.info.get('masks', 'mask store')})")
            pairs.append((image, mask, datum.classname))
    sheet = mask_sheet(pairs)
    save_png(sheet, Path(args.out))
    print(f"{len(pairs)} images with their masks written to {args.out}")
    return 0


def spread(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over `range(total)` (all of them when count >= total)."""
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a picture to the `--out` PNG a user named."""
    from promptclip.reports.tiles import write_png

    path = path.expanduser()
    if path.suffix.lower() != ".png":
        from promptclip.errors import CLIError

        raise CLIError(f"--out {path}: give a .png file name")
    write_png(path, array)
