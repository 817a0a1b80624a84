"""DePT, decoupled prompt tuning (CVPR 2024), as a plug-in over any learner of the contract.

Beside the learner's own head (the scaled cosine of image and class features, "ITM"), DePT trains a
channel-adjusted transfer (CAT) head for the training ("base") classes: every channel of the image and of the
class features is scaled and shifted (a learned scale, starting at 1, and shift, starting at 0, per channel and
per modality), then a linear layer with one output per training class classifies them. The head is trained
together with the learner's prompts, on the images and on the class features of the batch's labels:

    loss = ce_weight * CE(ITM logits, y)  +  weight * CE(CAT([t_y; x]), [y; y])  +  the learner's other terms

(`ce_weight` defaults to 1 - weight: the released CoOp, CoCoOp, KgCoOp and MaPLe trainers; KgCoOp's and
PromptSRC's regularisers keep their own weights). On the training classes the prediction fuses the two heads'
logits, (1 - weight) * ITM + weight * CAT; on any other class set the head is off and the prediction is the
learner's own, bitwise: the base-specific knowledge lives in the head, the prompts keep what transfers.

Which evaluation is which is explicit, as for DPC: `set_eval_subset("new")` turns the head off; in "base"
(the default, and always in training) it serves exactly the classes it has rows for, the training classes in
their order, and any other class set falls back to the learner alone (the head has no row for it).

The head trains at `head_lr_scale` (6.5) times the recipe's learning rate through the contract's
`learning_rate_scales`. It reads the learner's L2-normalised features (times `feature_scale`); the released
code reads them before the normalisation, which the contract does not expose. docs/dept.md lists this and the
other differences from the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from promptclip.config import ConfigError
from promptclip.methods.base import Batch, EvalSubset, LearnerOutput, PluginContext, PromptModel
from promptclip.plugins.base import PluginModel
from promptclip.registry import PLUGINS

BACKBONE_CE = "ce"
"""The name under which learners return the cross-entropy of their own logits (the contract's default loss)."""


@dataclass
class DePTConfig:
    weight: float = 0.7
    """lambda: the CAT head's weight in the loss and in the fused base-class logits (LINEAR_PROBE.WEIGHT)."""
    ce_weight: float | None = None
    """Weight of the wrapped learner's cross-entropy term; null: 1 - weight (the released CoOp, CoCoOp, KgCoOp
    and MaPLe trainers; the PromptSRC variant uses 0.6). The learner's other loss terms keep their weights."""
    head_lr_scale: float = 6.5
    """The head trains at this multiple of the recipe's learning rate (OPTIM.LR_EXP; the warm-up is not
    scaled)."""
    fusion: bool = True
    """Base classes: fuse the two heads' logits; false: the CAT head's logits alone (TEST_TIME_FUSION)."""
    channel_transform: bool = True
    """Scale and shift each channel of the image and class features before the linear layer (the paper's
    channel-wise transform, FILM.LINEAR_PROBE); false: the linear layer alone."""
    feature_scale: float = 1.0
    """The head reads the learner's normalised features times this (the released code reads the features
    before normalisation, whose length the contract does not expose)."""
    labels: Literal["auto", "ground_truth", "predicted"] = "auto"
    """Classes the head is trained on: the labels, or the wrapped learner's own prediction (no label used);
    `auto`: predicted for transductive learners (PromptKD), which train on unlabelled images of every class."""

    def __post_init__(self) -> None:
        check_dept_config(self)


def check_dept_config(cfg: DePTConfig) -> None:
    """Refuse values no run can use, naming the key and what it must be."""
    if not (math.isfinite(cfg.weight) and 0.0 < cfg.weight <= 1.0):
        raise ConfigError(
            f"plugins.dept.weight: {cfg.weight} is outside (0, 1]; the official value is 0.7 "
            "(e.g. --opts plugins.dept.weight 0.7)"
        )
    if cfg.ce_weight is not None and not (math.isfinite(cfg.ce_weight) and cfg.ce_weight >= 0.0):
        raise ConfigError(
            f"plugins.dept.ce_weight: {cfg.ce_weight} must be a number, 0 or more, or null for 1 - weight"
        )
    if not (math.isfinite(cfg.head_lr_scale) and cfg.head_lr_scale > 0.0):
        raise ConfigError(
            f"plugins.dept.head_lr_scale: {cfg.head_lr_scale} must be a number greater than 0 (official: 6.5)"
        )
    if not (math.isfinite(cfg.feature_scale) and cfg.feature_scale > 0.0):
        raise ConfigError(f"plugins.dept.feature_scale: {cfg.feature_scale} must be a number greater than 0")


@dataclass
class DePTOutput(LearnerOutput):
    """The learner's output with the fused logits; `backbone_logits` are the wrapped learner's own."""

    backbone_logits: torch.Tensor | None = None


class ChannelTransform(nn.Module):
    """x * scale + shift, per channel (the identity at the start)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.shift = nn.Parameter(torch.zeros(width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.scale + self.shift


class CATHead(nn.Module):
    """The channel-adjusted transfer head: a channel transform per modality, one linear layer for both."""

    def __init__(self, width: int, classes: int, channel_transform: bool = True) -> None:
        super().__init__()
        self.image_transform: nn.Module = ChannelTransform(width) if channel_transform else nn.Identity()
        self.text_transform: nn.Module = ChannelTransform(width) if channel_transform else nn.Identity()
        self.classifier = nn.Linear(width, classes)  # PyTorch's default initialisation, as the released code

    def image_logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.image_transform(image))

    def text_logits(self, text: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.text_transform(text))


@PLUGINS.register("dept")
class DePT(PluginModel):
    """Decoupled prompt tuning: a head for the training classes, fused with the learner's logits on those only.

    The channel-adjusted transfer head is trained with the prompts and is off for every other class set."""

    name = "dept"
    Config = DePTConfig

    def __init__(self, inner: PromptModel, cfg: DePTConfig, context: PluginContext | None = None) -> None:
        check_dept_config(cfg)
        super().__init__(inner, cfg, context)
        self.head_classnames: list[str] = list(self.classnames)
        """The classes the head has a row for, in its order: the classes the learner was built for."""
        probe = feature_probe(inner)
        self.head = CATHead(probe.shape[-1], len(self.head_classnames), cfg.channel_transform).to(probe.device)
        self.eval_subset: EvalSubset = "base"

    # -- which head serves -----------------------------------------------------------------------------------
    @property
    def ce_weight(self) -> float:
        return 1.0 - self.cfg.weight if self.cfg.ce_weight is None else self.cfg.ce_weight

    def set_eval_subset(self, which: EvalSubset) -> None:
        """`base`: the head serves its own classes; `new`: the head is off. Training always uses the head."""
        if which not in ("base", "new"):
            raise ValueError(f"dept: eval subset {which!r}; choose 'base' (tuned classes) or 'new' (other classes)")
        super().set_eval_subset(which)
        self.eval_subset = which

    def head_serves(self) -> bool:
        """Whether the current prediction uses the head: its own classes, in training or as `base`."""
        return self.classnames == self.head_classnames and (self.training or self.eval_subset == "base")

    # -- the contract ----------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> LearnerOutput:
        output = self.inner(batch)
        if not self.head_serves():
            return output
        with fp32(output.logits):
            head = self.head.image_logits(self.head_input(output.image_features))
            weight = self.cfg.weight
            logits = (1.0 - weight) * output.logits.float() + weight * head if self.cfg.fusion else head
        return DePTOutput(logits, output.image_features, output.text_features, backbone_logits=output.logits)

    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        if self.classnames != self.head_classnames:
            raise ValueError(
                f"dept: training on {len(self.classnames)} classes that are not the head's "
                f"{len(self.head_classnames)} training classes; train on the classes the learner was built for"
            )
        backbone = output
        if isinstance(output, DePTOutput) and output.backbone_logits is not None:
            backbone = LearnerOutput(output.backbone_logits, output.image_features, output.text_features)
        terms = dict(self.inner.loss(batch, backbone))
        if BACKBONE_CE in terms:
            terms[BACKBONE_CE] = self.ce_weight * terms[BACKBONE_CE]
        terms["cat"] = self.cfg.weight * self.head_loss(output, self.head_labels(batch, backbone))
        return terms

    def head_labels(self, batch: Batch, backbone: LearnerOutput) -> torch.Tensor:
        """The batch's labels, or the wrapped learner's prediction where labels may not be used."""
        predicted = self.cfg.labels == "predicted" or (self.cfg.labels == "auto" and self.inner.transductive)
        return backbone.logits.detach().argmax(dim=-1) if predicted else batch["label"]

    def head_loss(self, output: LearnerOutput, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the head over the class features of the batch's labels and the images, one batch
        of 2B rows as the released code (class rows first)."""
        text = output.text_features
        rows = text[torch.arange(len(labels), device=text.device), labels] if text.dim() == 3 else text[labels]
        with fp32(rows):
            logits = torch.cat(
                [
                    self.head.text_logits(self.head_input(rows)),
                    self.head.image_logits(self.head_input(output.image_features)),
                ]
            )
            return F.cross_entropy(logits, torch.cat([labels, labels]))

    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() * self.cfg.feature_scale

    def learning_rate_scales(self) -> dict[str, float]:
        own = {f"head.{name}": self.cfg.head_lr_scale for name, _ in self.head.named_parameters()}
        return {**super().learning_rate_scales(), **own}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Saved with the head's classes (one row each), whatever class set is active, so it loads back."""
        active = list(self.classnames)
        if active == self.head_classnames:
            return super().save_pretrained(directory)
        self.set_classnames(self.head_classnames)
        try:
            return super().save_pretrained(directory)
        finally:
            self.set_classnames(active)


def feature_probe(inner: PromptModel) -> torch.Tensor:
    """The class features of one class (or of all, for class-specific prompts), for the head's width and device."""
    with torch.no_grad():
        try:
            return inner.encode_classnames(inner.classnames[:1])
        except ValueError:  # class-specific context encodes only its own class set
            return inner.compute_text_features()


def fp32(like: torch.Tensor) -> torch.autocast:
    """The head in fp32 even under autocast: its logits are fused with the fp32 cosine logits."""
    return torch.autocast(device_type=like.device.type, enabled=False)
