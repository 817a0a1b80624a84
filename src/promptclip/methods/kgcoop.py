"""KgCoOp (Yao et al., CVPR 2023): CoOp kept close to hand-written CLIP knowledge.

The learned class features t_i are pulled towards the frozen CLIP features t_i^clip of a hand-written template
(the dataset's, or `target_template`) by an extra loss

    weight x (1 - mean_i cos(t_i, t_i^clip))

(the paper's squared L2 distance between unit vectors, halved). The targets are encoded once per class set and
kept, not recomputed every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptclip.clip.model import CLIP
from promptclip.methods.base import Batch, LearnerOutput
from promptclip.methods.coop import CoOp, CoOpConfig
from promptclip.methods.prompting import encode_templates
from promptclip.registry import METHODS


@dataclass
class KgCoOpConfig(CoOpConfig):
    ctx_init: str = "a photo of a"
    """Initialise the context from these words (the field fixes this text); empty: N(0, 0.02)."""
    weight: float = 8.0
    """Weight W of the knowledge-guidance term W x (1 - mean cos(t_i, t_i^clip))."""
    target_template: str = ""
    """Template of the frozen targets t_i^clip; empty: the dataset's template. (The field's KgCoOp uses
    "a photo of a {}, a type of texture." on DTD, where zero-shot CLIP uses "{} texture.")"""


@METHODS.register("kgcoop")
class KgCoOp(CoOp):
    """KgCoOp: CoOp plus a loss keeping the class features close to zero-shot CLIP's (weight 8)."""

    name = "kgcoop"
    Config = KgCoOpConfig

    def __init__(
        self, clip: CLIP, classnames: Sequence[str], cfg: KgCoOpConfig, template: str = "a photo of a {}."
    ) -> None:
        super().__init__(clip, classnames, cfg, template)
        self._targets: torch.Tensor | None = None
        self._targets_key: tuple[object, ...] = ()

    @property
    def target_template(self) -> str:
        return self.cfg.target_template or self.template

    def clip_text_features(self) -> torch.Tensor:
        """Frozen CLIP features [C, D] of the target template for the current classes (normalised); encoded
        once per class set, template and device."""
        key = (tuple(self.classnames), self.target_template, self.clip.token_embedding.weight.device)
        if self._targets is None or key != self._targets_key:
            self._targets = encode_templates(self.clip, self.classnames, self.target_template)
            self._targets_key = key
        return self._targets

    def knowledge_loss(self, text_features: torch.Tensor) -> torch.Tensor:
        """W x (1 - mean cosine) between the learned and the frozen template features of the classes."""
        targets = self.clip_text_features()
        cosine = F.cosine_similarity(text_features.float(), targets, dim=-1)
        return self.cfg.weight * (1.0 - cosine.mean())

    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        losses = super().loss(batch, output)
        losses["kg"] = self.knowledge_loss(output.text_features)
        return losses
