"""What a run reads: the device, the datasets (each read once), the training draw, the backbone, the loaders,
and the check of every image before any work starts."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from promptclip.clip.model import CLIP
from promptclip.config import RunConfig
from promptclip.data.datasets import DatasetSplits, build_dataset
from promptclip.data.datasets.base import SplitName
from promptclip.data.datasets.check import screen_images
from promptclip.data.fewshot import fewshot_splits, subsample_classes
from promptclip.data.loader import build_loader
from promptclip.protocols.spec import EvalTarget, RunSpec, dataset_options
from promptclip.runs.errors import RunError

IN_MEMORY_MAX_IMAGES = 2000  # decode small (few-shot) training sets once instead of every epoch
RANDOM_BACKBONE_SEED = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} was asked for but CUDA is not available; use --opts device cpu")
    return device


# -- datasets --------------------------------------------------------------------------------------------------
class DatasetCache:
    """Each dataset of a run is read once (a cross-dataset run evaluates up to eleven)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._built: dict[str, DatasetSplits] = {}

    def get(self, name: str) -> DatasetSplits:
        if name not in self._built:
            self._built[name] = build_dataset(name, self.cfg.data.root, **dataset_options(self.cfg, name))
        return self._built[name]

    def screen(self, name: str, split: SplitName, skipped: dict[str, list[str]]) -> None:
        """Check the images of `split` of dataset `name` before the run starts (see `screen_images`); with
        `data.on_bad_image skip` the unusable ones leave the cached split and are listed in `skipped`."""
        key = f"{name}/{split}"
        if key in skipped:
            return
        splits = self.get(name)
        kept, bad = screen_images(splits, splits.split(split), f"{split} images of {name}", self.cfg.data.on_bad_image)
        skipped[key] = bad
        if bad:
            self._built[name] = splits.replace(**{split: kept})


def image_data_key(cfg: RunConfig, target: EvalTarget) -> tuple[str, ...]:
    """What names the images of `target` beyond their paths: the dataset, its root, options and split."""
    options = json.dumps(dataset_options(cfg, target.dataset), sort_keys=True, default=str)
    return (target.dataset, str(cfg.data.root), options, target.split)


def training_splits(source: DatasetSplits, spec: RunSpec, fewshot_cache_dir: Any = None) -> DatasetSplits:
    """The spec's training data: the K-shot draw of its seed (K < 1: every image), then its class subset.

    The draw comes first, over all classes, then the cut: the field's order, so base and new runs share it.
    """
    splits = fewshot_splits(source, spec.shots, spec.seed, cache_dir=fewshot_cache_dir) if spec.shots >= 1 else source
    return subsample_classes(splits, spec.train_subsample)


def screen_run_images(
    spec: RunSpec, cfg: RunConfig, datasets: DatasetCache, splits: DatasetSplits, log: Callable[[str], None]
) -> tuple[DatasetSplits, dict[str, list[str]]]:
    """Check every image the run will read, before it starts: the drawn training images and each evaluation
    split. With `data.on_bad_image error` a problem stops the run with the list of files; with `skip` those
    images are left out. Returns the training splits and {"<dataset>/<split>": ["path: problem", ...]} of
    the images left out (empty when none)."""
    what = f"training images of {spec.dataset}"
    kept, bad = screen_images(splits, splits.train, what, cfg.data.on_bad_image)
    skipped: dict[str, list[str]] = {f"{spec.dataset}/training": bad}
    if bad:
        splits = splits.replace(train=kept)
    for target in spec.targets:
        datasets.screen(target.dataset, target.split, skipped)
    skipped = {key: lines for key, lines in skipped.items() if lines}
    for key, lines in skipped.items():
        shown = "; ".join(lines[:5]) + (f"; ... ({len(lines) - 5} more)" if len(lines) > 5 else "")
        log(f"left out {len(lines)} unusable images of {key} (data.on_bad_image skip): {shown}")
    return splits, skipped


def with_masks(splits: DatasetSplits, mask_config: Any, log: Callable[[str], None]) -> DatasetSplits:
    """Training splits carrying foreground masks (`RunNeeds.masks`): mask files on disk are found and checked
    with the learner's mask settings (a missing or unusable mask stops here, listed); synthetic data bring
    their own."""
    if splits.has_masks:
        return splits
    from promptclip.data.masks import attach_masks, check_mask_files

    splits = attach_masks(splits, mask_config)
    check_mask_files(splits)
    log(f"masks: {splits.info.get('masks', 'attached')}")
    return splits


# -- the backbone and the loaders ---------------------------------------------------------------------------------
def load_backbone(cfg: RunConfig, device: torch.device) -> CLIP:
    """The frozen CLIP of `cfg.model`. Random weights (tests, smoke runs) are drawn from a fixed seed, apart
    from the global generators, so every run seed sees the same backbone."""
    from promptclip.clip.weights import RANDOM_WEIGHTS, load_clip

    if cfg.model.weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            return load_clip(cfg.model.arch, cfg.model.weights, device=device)
    return load_clip(cfg.model.arch, cfg.model.weights, device=device)


def train_loader(
    splits: DatasetSplits, cfg: RunConfig, clip: CLIP, seed: int, device: torch.device, masks: bool
) -> Any:
    return build_loader(
        splits,
        "train",
        batch_size=cfg.data.batch_size,
        image_size=clip.image_size,
        seed=seed,
        num_workers=cfg.data.num_workers,
        with_masks=masks,
        in_memory=len(splits.train) <= IN_MEMORY_MAX_IMAGES,
        pin_memory=device.type == "cuda",
    )


def eval_loader(splits: DatasetSplits, split: str, cfg: RunConfig, clip: CLIP, device: torch.device) -> Any:
    return build_loader(
        splits,
        split,  # type: ignore[arg-type]
        batch_size=cfg.data.eval_batch_size,
        train=False,
        image_size=clip.image_size,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
