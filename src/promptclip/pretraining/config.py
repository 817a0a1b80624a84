"""The settings of a pretraining run and the architecture of the bundled `tiny-synthetic` model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from promptclip.clip.model import ArchConfig

__all__ = ["TINY_SYNTHETIC_ARCH", "PretrainConfig", "PretrainError"]

#: The architecture of the bundled model: a 64 px ViT with 8 px patches (64 patch tokens), 4 layers of width
#: 128 in each tower, a 128-d joint space, and CLIP's 49408-id vocabulary so that the real tokenizer's ids
#: (and every prompt method built on them) work unchanged.
TINY_SYNTHETIC_ARCH: dict[str, Any] = {
    "name": "tiny-synthetic",
    "embed_dim": 128,
    "vision": {"image_size": 64, "width": 128, "layers": 4, "heads": 2, "patch_size": 8},
    "text": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}


WORLDS: tuple[str, ...] = ("kinds", "shapes")


class PretrainError(ValueError):
    """A pretraining setting or checkpoint that cannot be used; the message says which and what to do."""


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run (and therefore its weights)."""

    arch: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(TINY_SYNTHETIC_ARCH))
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    partial_caption_prob: float = 0.0
    """Fraction of captions that name only some of the attributes (0: only the world's own captions)."""
    twin_fraction: float = 0.5
    """Fraction of each batch made of shape twins: copies of another image of the batch with only the shape
    changed (same colour, scene, size, position and texture), so the shape must be seen to tell them apart."""
    world: str = "kinds"
    """"kinds": every shape, kind, colour and scene (the plain one included); "shapes": only the ten plain
    shapes and ten scenes, the world of the first phase of the shipped model."""
    init: str | None = None
    """Weights file to start from (a model of the same architecture) instead of a random initialisation; the
    optimizer starts afresh."""
    crop_fraction: float = 0.25
    """Fraction of images shown as a zoomed-in crop that keeps the whole object (captioned without size or
    position), so the crops of few-shot tuning are in distribution."""
    style_fraction: float = 0.05
    """Fraction of images shown in one of the world's styles (pixelated, noisy, faded) at a random strength:
    rarely enough that a task rendered entirely in a style is a domain gap."""
    shard_size: int = 8192
    """Specs drawn per call of `sample_pretraining_specs` (one shard = seed-keyed, prefix-stable list)."""
    eval_every: int = 200
    eval_per_class: int = 8
    """Validation images per class of each downstream task for the periodic zero-shot check."""
    checkpoint_every: int = 50
    precision: str = "fp32"
    """"fp32", or "bf16" autocast (CPU with AVX512-BF16 or a GPU)."""

    def check(self) -> None:
        positive = ("steps", "batch_size", "shard_size", "eval_every", "checkpoint_every", "eval_per_class")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise PretrainError(f"pretrain config: {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise PretrainError("pretrain config: batch_size must be >= 2 (a contrastive loss needs negatives)")
        if not 0.0 <= self.twin_fraction <= 0.5:
            raise PretrainError(f"pretrain config: twin_fraction must be in [0, 0.5], got {self.twin_fraction}")
        for name in ("crop_fraction", "style_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PretrainError(f"pretrain config: {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.partial_caption_prob <= 1.0:
            raise PretrainError(
                f"pretrain config: partial_caption_prob must be in [0, 1], got {self.partial_caption_prob}"
            )
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise PretrainError(
                f"pretrain config: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise PretrainError(f"pretrain config: warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.world not in WORLDS:
            raise PretrainError(f"pretrain config: world must be one of {', '.join(WORLDS)}, got {self.world!r}")
        if self.precision not in ("fp32", "bf16"):
            raise PretrainError(f"pretrain config: precision must be 'fp32' or 'bf16', got {self.precision!r}")
        try:
            ArchConfig.from_dict(self.arch)
        except (KeyError, TypeError, ValueError) as err:
            raise PretrainError(f"pretrain config: arch is not a valid architecture ({err})") from None

    def arch_config(self) -> ArchConfig:
        return ArchConfig.from_dict(self.arch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PretrainError(f"{where}: unknown pretrain settings {unknown}; known: {sorted(known)}")
        return cls(**dict(data))
