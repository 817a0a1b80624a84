"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompts with vision prompts coupled to the text prompts.

The text tower gets deep prompts as in deep language prompting: layer-0 context tokens from the first n_ctx
tokens of `ctx_init` (with the default 2 tokens of "a photo of a" the prompt reads
`[SOS] c1 c2 of a <class> . [EOS]`), and a fresh N(0, 0.02) prompt for each layer 1..depth-1. The vision
prompts are not free: at every depth j the vision prompt is `couplings[j](text prompt_j)`, a linear map from
the text width to the vision width, appended after the patch tokens at layer 0 and replacing the slots
entering layer j after that.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from promptclip.clip.model import CLIP, DeepPrompts
from promptclip.methods.ivlp import DeepPromptModel, PromptLayout
from promptclip.methods.prompting import TextEncodingConfig
from promptclip.registry import METHODS


@dataclass
class MaPLeConfig(TextEncodingConfig):
    n_ctx: int = 2
    """Prompt tokens per layer in both towers; the first n_ctx tokens of `ctx_init` initialise layer 0."""
    ctx_init: str = "a photo of a"
    """Text prompt `<ctx_init> <class>.`; words past the first n_ctx tokens stay fixed. Empty: N(0, 0.02)."""
    depth: int = 9
    """Layers (in both towers) that receive fresh prompts: 9 for base-to-novel, 3 for cross-dataset / DG."""

    def layout(self) -> PromptLayout:
        return PromptLayout(self.n_ctx, self.depth, 0, 0, self.ctx_init)


@METHODS.register("maple")
class MaPLe(DeepPromptModel):
    """MaPLe: deep text prompts and one text->vision linear coupling per depth; cross-entropy."""

    name = "maple"
    Config = MaPLeConfig

    def __init__(
        self, clip: CLIP, classnames: Sequence[str], cfg: MaPLeConfig, template: str = "a photo of a {}."
    ) -> None:
        if cfg.n_ctx < 1 or cfg.depth < 1:
            raise ValueError(f"maple: n_ctx and depth must be at least 1 (got {cfg.n_ctx} and {cfg.depth})")
        if not clip.config.vision.is_vit:
            raise ValueError(f"maple: vision prompts need a ViT image tower; {clip.config.name} is a ResNet")
        if cfg.depth > clip.config.vision.layers:
            raise ValueError(
                f"maple: depth {cfg.depth} exceeds the {clip.config.vision.layers} layers of the image tower; "
                f"set depth to at most {clip.config.vision.layers}"
            )
        super().__init__(clip, classnames, cfg, template)
        self.couplings = build_couplings(clip.config.text.width, clip.config.vision.width, cfg.depth)
        self.couplings.to(clip.token_embedding.weight.device)

    def vision_prompts(self) -> tuple[torch.Tensor, DeepPrompts]:
        assert self.text is not None
        shallow = self.couplings[0](self.text.ctx)
        deep: list[torch.Tensor | None] = [None]
        for layer in range(1, self.text.depth):
            deep.append(self.couplings[layer](self.text.deep[str(layer)]))
        return shallow, deep


def build_couplings(text_width: int, vision_width: int, depth: int) -> nn.ModuleList:
    """One Linear(text width -> vision width) per depth. As in the reference, the deep couplings start as
    copies of one randomly initialised layer; the layer-0 coupling has its own initialisation."""
    first = nn.Linear(text_width, vision_width)
    deep = nn.Linear(text_width, vision_width)
    return nn.ModuleList([first, *(copy.deepcopy(deep) for _ in range(1, depth))])


_OFFICIAL_TEXT_DEEP = re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$")
_OFFICIAL_COUPLING = re.compile(r"^prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)$")


def convert_official_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors (fp32) from the state dict saved by the original MaPLe trainer: `prompt_learner.ctx`,
    `prompt_learner.compound_prompts_text.<i>` (text layer i+1), `prompt_learner.proj` (coupling 0) and
    `prompt_learner.compound_prompt_projections.<i>` (coupling i+1). The frozen CLIP and the class-name
    buffers are left out; load the result with `learner.load_trainable_state`."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "prompt_learner.ctx":
            converted["text.ctx"] = tensor
        elif key in ("prompt_learner.proj.weight", "prompt_learner.proj.bias"):
            converted[f"couplings.0.{key.rsplit('.', 1)[1]}"] = tensor
        elif match := _OFFICIAL_TEXT_DEEP.match(key):
            converted[f"text.deep.{int(match.group(1)) + 1}"] = tensor
        elif match := _OFFICIAL_COUPLING.match(key):
            converted[f"couplings.{int(match.group(1)) + 1}.{match.group(2)}"] = tensor
    if "text.ctx" not in converted:
        raise ValueError("no MaPLe prompt tensors in this state dict (prompt_learner.ctx missing)")
    return {key: tensor.detach().float().clone() for key, tensor in converted.items()}
