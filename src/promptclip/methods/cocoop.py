"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted per image by a small meta-network.

A meta-net maps the normalised image feature to a token-wide vector pi that is added to every context token,
so each image gets its own prompts for every class. The class features therefore depend on the image:
`forward` returns per-image text features [B, C, D] and logits [B, C].

`text_features()` / `encode_classnames(names)` have no image to condition on: they return the prompts with
the shared context alone (pi = 0), the image-independent part of the learned prompt. Use
`conditional_text_features(image_features, names)` for the per-image features of any class names, and
`learner(batch).logits` to classify (evaluation does).

The per-image prompts of a batch are assembled and encoded together, in chunks of at most `text_chunk_size`
rows, instead of one text pass per image: batch sizes above 1 cost no more than their rows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from promptclip.clip.model import CLIP, ArchConfig
from promptclip.methods.base import Batch, LearnerOutput, scaled_cosine_logits
from promptclip.methods.coop import CoOp
from promptclip.methods.prompting import PromptParts, TextEncodingConfig, assemble_prompts, encode_prompt_embeddings
from promptclip.registry import METHODS


@dataclass
class CoCoOpConfig(TextEncodingConfig):
    n_ctx: int | None = None
    """Context length; defaults to the token count of `ctx_init` (or 16 with random init)."""
    ctx_init: str = "a photo of a"
    """Initialise the context from these words; empty: N(0, 0.02)."""
    class_token_position: Literal["end", "middle", "front"] = "end"
    meta_hidden: int | None = None
    """Hidden width of the meta-net; defaults to the image feature width // 16 (32 for ViT-B/16)."""
    text_chunk_size: int | None = 4096
    """Encode the batch's B x C per-image prompts in chunks of at most this many rows (bounds activation memory
    at evaluation); null encodes them in one pass."""


def meta_net_widths(arch: ArchConfig, hidden: int | None = None) -> tuple[int, int, int]:
    """(input, hidden, output) widths of the meta-net: normalised image feature -> pi, one context token wide."""
    image_width = arch.embed_dim
    hidden = image_width // 16 if hidden is None else hidden
    if hidden < 1:
        raise ValueError(f"meta_hidden must be at least 1 (got {hidden} for image features of width {image_width})")
    return image_width, hidden, arch.text.width


def build_meta_net(in_width: int, hidden: int, out_width: int) -> nn.Sequential:
    # Module names follow the field's checkpoints (meta_net.linear1 / meta_net.linear2) so published prompts load.
    return nn.Sequential(
        OrderedDict(
            [
                ("linear1", nn.Linear(in_width, hidden)),
                ("relu", nn.ReLU()),
                ("linear2", nn.Linear(hidden, out_width)),
            ]
        )
    )


def trim_parts(parts: PromptParts) -> PromptParts:
    """Drop the padding after the class set's last end-of-text token: the causal text tower never reads it,
    and per-image prompts would otherwise copy it B x C times."""
    keep = max(0, parts.length - 1 - parts.n_ctx)
    return PromptParts(
        parts.prefix, parts.suffix[:, :keep], parts.eot_index, parts.name_lens, parts.n_ctx, parts.length
    )


def tile_parts(parts: PromptParts, times: int) -> PromptParts:
    """The class prompts of `parts` repeated for `times` images, image-major: row i*C + c is image i, class c."""
    return PromptParts(
        parts.prefix.repeat(times, 1, 1),
        parts.suffix.repeat(times, 1, 1),
        parts.eot_index.repeat(times),
        parts.name_lens * times,
        parts.n_ctx,
        parts.length,
    )


@METHODS.register("cocoop")
class CoCoOp(CoOp):
    """CoCoOp: a shared context plus a per-image shift from a meta-net on the image feature; cross-entropy."""

    name = "cocoop"
    Config = CoCoOpConfig  # type: ignore[assignment]  # CoOp's fields without class-specific context
    image_conditioned_text = True

    def __init__(
        self, clip: CLIP, classnames: Sequence[str], cfg: CoCoOpConfig, template: str = "a photo of a {}."
    ) -> None:
        super().__init__(clip, classnames, cfg, template)  # type: ignore[arg-type]
        self.meta_net = build_meta_net(*meta_net_widths(clip.config, cfg.meta_hidden)).to(self.ctx.device)

    def context_shift(self, image_features: torch.Tensor) -> torch.Tensor:
        """pi [B, W] for normalised image features [B, D]."""
        return self.meta_net(image_features.to(self.ctx.dtype))

    def conditional_text_features(
        self, image_features: torch.Tensor, names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Normalised text features [B, C, D] of `names` (default: the current classes) for each image."""
        names = self.classnames if names is None else list(names)
        parts = self.prompt_parts(names)
        if self.clip.truncate_text:
            parts = trim_parts(parts)
        contexts = self.ctx.unsqueeze(0) + self.context_shift(image_features).unsqueeze(1)  # [B, n, W]
        count = len(names)
        chunk = self.cfg.text_chunk_size
        images_per_chunk = len(contexts) if chunk is None else max(1, chunk // count)
        features = []
        for start in range(0, len(contexts), images_per_chunk):
            group = contexts[start : start + images_per_chunk]
            rows = tile_parts(parts, len(group))
            row_ctx = group.unsqueeze(1).expand(-1, count, -1, -1).reshape(-1, *group.shape[1:])
            embeddings = assemble_prompts(rows, row_ctx, self.cfg.class_token_position)
            features.append(
                encode_prompt_embeddings(
                    self.clip,
                    embeddings,
                    rows.eot_index,
                    chunk_size=chunk,
                    checkpoint=self.cfg.text_checkpoint,
                    text_length=rows.length,
                )
            )
        return torch.cat(features).view(len(contexts), count, -1)

    def forward(self, batch: Batch) -> LearnerOutput:
        image = self.image_features(batch["image"])
        text = self.conditional_text_features(image)
        return LearnerOutput(scaled_cosine_logits(self.logit_scale, image, text), image, text)
