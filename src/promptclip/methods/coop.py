"""CoOp (Zhou et al., IJCV 2022): learnable context vectors in front of (or around) the class name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from promptclip.classnames import prompt_names
from promptclip.clip.model import CLIP
from promptclip.methods.base import PromptModel
from promptclip.methods.prompting import (
    PromptParts,
    TextEncodingConfig,
    assemble_prompts,
    build_prompt_parts,
    context_init_from_text,
    encode_prompt_embeddings,
)
from promptclip.registry import METHODS


@dataclass
class CoOpConfig(TextEncodingConfig):
    n_ctx: int | None = None
    """Context length; defaults to 16 with random init, or to the token count of `ctx_init`."""
    ctx_init: str = ""
    """Initialise the context from these words (e.g. "a photo of a"); empty: N(0, 0.02)."""
    class_token_position: Literal["end", "middle", "front"] = "end"
    csc: bool = False
    """Class-specific context: one context per class (cannot transfer to other classes)."""


def init_context(clip: CLIP, n_ctx: int | None, ctx_init: str, copies: int | None = None) -> torch.Tensor:
    """Initial context [n, W] (or [copies, n, W]) from words or N(0, 0.02); checks `n_ctx` against the
    words so a mismatch is never silently ignored."""
    width = clip.token_embedding.weight.shape[1]
    if ctx_init:
        ctx = context_init_from_text(clip, ctx_init)
        if n_ctx is not None and n_ctx != ctx.shape[0]:
            raise ValueError(
                f"n_ctx={n_ctx} but ctx_init {ctx_init!r} has {ctx.shape[0]} tokens; set n_ctx to "
                f"{ctx.shape[0]} or leave it unset"
            )
    else:
        ctx = torch.empty(16 if n_ctx is None else n_ctx, width).normal_(std=0.02)
    ctx = ctx.to(clip.token_embedding.weight.device)
    return ctx if copies is None else ctx.unsqueeze(0).repeat(copies, 1, 1)


@METHODS.register("coop")
class CoOp(PromptModel):
    """CoOp: n learnable context tokens shared by all classes (or class-specific), cross-entropy."""

    name = "coop"
    Config = CoOpConfig

    def __init__(
        self, clip: CLIP, classnames: Sequence[str], cfg: CoOpConfig, template: str = "a photo of a {}."
    ) -> None:
        super().__init__(clip, classnames, cfg, template)
        copies = len(self.classnames) if self.class_specific else None
        self.ctx = nn.Parameter(init_context(clip, cfg.n_ctx, cfg.ctx_init, copies))
        self.learned_classnames = list(self.classnames)
        self._parts: PromptParts | None = None

    @property
    def class_specific(self) -> bool:
        """One context per class (`csc`); configs without the field (CoCoOp) share one context."""
        return bool(getattr(self.cfg, "csc", False))

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    def prompt_parts(self, names: Sequence[str]) -> PromptParts:
        if list(names) == self.classnames:
            if self._parts is None or self._parts.prefix.device != self.ctx.device:
                self._parts = build_prompt_parts(self.clip, self.classnames, self.n_ctx)
            return self._parts
        return build_prompt_parts(self.clip, names, self.n_ctx)

    def _check_class_specific(self, names: Sequence[str]) -> None:
        """Class-specific context belongs to the classes it was learned for: any other names are refused,
        even when their count happens to match (equal base and new halves)."""
        if self.class_specific and prompt_names(names) != self.learned_classnames:
            raise ValueError(
                f"class-specific context was learned for {len(self.learned_classnames)} particular classes and "
                f"cannot be used for other names ({len(names)} given); train with csc=false to transfer to new classes"
            )

    def set_classnames(self, names: Sequence[str]) -> None:
        self._check_class_specific(names)
        super().set_classnames(names)
        self._parts = None

    def encode_classnames(self, names: Sequence[str]) -> torch.Tensor:
        self._check_class_specific(names)
        parts = self.prompt_parts(names)
        embeddings = assemble_prompts(parts, self.ctx, self.cfg.class_token_position)
        return encode_prompt_embeddings(
            self.clip,
            embeddings,
            parts.eot_index,
            chunk_size=self.cfg.text_chunk_size,
            checkpoint=self.cfg.text_checkpoint,
            text_length=parts.length,
        )
