"""Zero-shot CLIP: hand-written templates, no training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from promptclip.clip.model import CLIP
from promptclip.methods.base import PromptModel
from promptclip.methods.prompting import encode_templates
from promptclip.methods.templates import IMAGENET_TEMPLATES_SELECT
from promptclip.registry import METHODS


@dataclass
class ZeroShotConfig:
    ensemble: bool = False
    """Average the 7 ImageNet templates instead of using the dataset template alone."""
    add_dataset_template: bool = True
    """With `ensemble`, also average the dataset's own template (the field does, except on ImageNet, whose
    recipes set this to false)."""


@METHODS.register("zeroshot")
class ZeroShotCLIP(PromptModel):
    """Zero-shot CLIP with the dataset's template (or the 7-template ensemble)."""

    name = "zeroshot"
    Config = ZeroShotConfig

    def __init__(
        self, clip: CLIP, classnames: Sequence[str], cfg: ZeroShotConfig, template: str = "a photo of a {}."
    ) -> None:
        super().__init__(clip, classnames, cfg, template)

    def templates(self) -> list[str]:
        if not self.cfg.ensemble:
            return [self.template]
        extra = [self.template] if self.cfg.add_dataset_template else []
        return [*IMAGENET_TEMPLATES_SELECT, *extra]

    def encode_classnames(self, names: Sequence[str]) -> torch.Tensor:
        return encode_templates(self.clip, names, self.templates())
