"""Learners fitted in one call on frozen image features (`PromptModel.fits_on_features`: the linear probe)
instead of by the engine's training loop. The training images, and the validation draw when the learner
needs it, are encoded without augmentation, the way evaluation encodes test images."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from promptclip.clip.model import CLIP
from promptclip.config import RunConfig
from promptclip.data.datasets import DatasetSplits
from promptclip.data.datasets.base import SplitName
from promptclip.engine.evaluate import autocast_context
from promptclip.methods.base import LabelledFeatures, PromptModel
from promptclip.runs.errors import RunError
from promptclip.runs.inputs import eval_loader


def check_validation_draw(splits: DatasetSplits, method: str) -> None:
    """A learner that chooses its hyper-parameters on the validation draw (`RunNeeds.validation`) has one."""
    if not splits.val:
        raise RunError(
            f"{method} chooses its hyper-parameters on the validation split, and {splits.display_name} has no "
            "validation images (ImageNet's split files have none; a folder dataset may have none). Fix them in "
            "the recipe instead (lp: --opts method_cfg.C 1.0), or use a dataset with a validation split"
        )


def encode_split(
    learner: PromptModel, splits: DatasetSplits, split: SplitName, cfg: RunConfig, clip: CLIP, device: torch.device
) -> LabelledFeatures:
    """The learner's image features of one split, without augmentation, and their labels."""
    loader = eval_loader(splits, split, cfg, clip, device)
    features, labels = [], []
    learner.eval()
    with torch.no_grad():
        for batch in loader:
            with autocast_context(device, cfg.model.precision):
                features.append(learner.image_features(batch["image"].to(device)).float())
            labels.append(batch["label"].to(device, torch.long))
    return LabelledFeatures(torch.cat(features), torch.cat(labels))


def fit_on_features(
    learner: PromptModel,
    splits: DatasetSplits,
    cfg: RunConfig,
    clip: CLIP,
    device: torch.device,
    validation: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Encode the training images (and the validation draw when `validation`), fit the learner on them, and
    return the run's `train` record."""
    started = time.perf_counter()
    train = encode_split(learner, splits, "train", cfg, clip, device)
    val = encode_split(learner, splits, "val", cfg, clip, device) if validation else None
    shown = f" and {val.labels.numel()} validation images" if val is not None else ""
    log(f"{learner.name}: fitting on the frozen features of {train.labels.numel()} training images{shown}")
    record = learner.fit_on_features(train, val, log)
    return {"epochs": 0, "steps": 0, "seconds": round(time.perf_counter() - started, 3), "final_loss": None, **record}
