"""Building DPC learners over a fixed "stage-1" learner, for the common checker and the DPC tests.

A DPC learner always starts from one given stage-1 learner, so the builder draws the stage-1 tensors from a
fixed seed (the same P whatever the caller's seed), moves them away from their initial values (a tuned
stage 1), and gives DPC a small picture library of seeded random images of the same classes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from promptclip.classnames import prompt_names
from promptclip.clip.model import CLIP
from promptclip.data.datasets.base import DatasetSplits, Datum
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.plugins.base import PluginContext
from promptclip.plugins.dpc import DPC, DPCConfig

STAGE1_SEED = 4321
PICTURES_PER_CLASS = 2


class NoiseReader:
    """A reproducible random RGB picture per path (counts how often pictures are decoded)."""

    def __init__(self, size: int = 40) -> None:
        self.size = size
        self.reads = 0

    def load_image(self, datum: Datum) -> Image.Image:
        self.reads += 1
        seed = int.from_bytes(hashlib.sha256(datum.path.encode()).digest()[:4], "little")
        pixels = np.random.default_rng(seed).integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        return Image.fromarray(pixels, mode="RGB")


def picture_splits(classnames: Sequence[str], per_class: int = PICTURES_PER_CLASS) -> DatasetSplits:
    train = [Datum(f"train/{c}_{i}", c, n) for c, n in enumerate(classnames) for i in range(per_class)]
    return DatasetSplits(
        name="noise",
        root=None,
        classnames=prompt_names(classnames),
        template="a photo of a {}.",
        train=train,
        val=[],
        test=[],
        reader=NoiseReader(),
    )


def stage1_learner(
    clip: CLIP, classnames: Sequence[str], template: str, method: str, method_cfg: dict[str, Any]
) -> PromptModel:
    """A stand-in for a tuned stage-1 learner: fixed random init, every tuned tensor shifted."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(STAGE1_SEED)
        learner = get_prompt_model(clip, {"method": method, **method_cfg}, classnames, template=template)
        with torch.no_grad():
            for tensor in learner.trainable_parameters().values():
                tensor.add_(0.01 * torch.randn_like(tensor))
    return learner


def dpc_builder(
    method: str, method_cfg: dict[str, Any], **dpc_cfg: Any
) -> Callable[[CLIP, Sequence[str], str], PromptModel]:
    """A `Case.build` function: DPC over `method`'s fixed stage-1 learner."""

    def build(clip: CLIP, classnames: Sequence[str], template: str) -> PromptModel:
        inner = stage1_learner(clip, classnames, template, method, method_cfg)
        context = PluginContext(splits=picture_splits(classnames), seed=1)
        return DPC(inner, DPCConfig(**{"top_k": 3, **dpc_cfg}), context)

    return build
