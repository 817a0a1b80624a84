"""Deep prompts placed independently in both towers: IVLP, VPT-deep (vision only), deep language prompting.

Layer-0 prompts enter with the input tokens: the text context replaces the first words of
`<ctx_init> <class name>.` right after the start token, and the vision tokens are appended after the patch
tokens. The deep prompt of layer j (1 <= j < depth) replaces the prompt slots entering layer j; later layers
carry the slots on. The backbone's prompt hooks do the replacing, so no block is subclassed.

Every prompt tensor is a named `nn.Parameter` (`text.ctx`, `text.deep.<layer>`, `vision.ctx`,
`vision.deep.<layer>`), so plug-ins can clone them or substitute them with `torch.func.functional_call`.

`DeepPromptModel` holds the shared machinery; MaPLe and PromptSRC build on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from promptclip.clip.model import CLIP, DeepPrompts
from promptclip.clip.tokenizer import get_tokenizer, tokenize
from promptclip.methods.base import PromptModel
from promptclip.methods.prompting import (
    PLACEHOLDER,
    PromptParts,
    TextEncodingConfig,
    assemble_prompts,
    context_init_from_text,
    encode_prompt_embeddings,
    encode_templates,
    end_of_text,
)
from promptclip.registry import METHODS

PROMPT_INIT_STD = 0.02


@dataclass(frozen=True)
class PromptLayout:
    """How many prompt tokens each tower gets and how deep they go (0 and 0: the tower is not prompted)."""

    n_ctx_text: int
    depth_text: int
    n_ctx_vision: int
    depth_vision: int
    ctx_init: str = ""


@dataclass
class IVLPConfig(TextEncodingConfig):
    n_ctx_text: int = 2
    """Text prompt tokens per layer; the first `n_ctx_text` words of `ctx_init` become the layer-0 tokens."""
    n_ctx_vision: int = 2
    """Vision prompt tokens per layer, appended after the patch tokens."""
    depth_text: int = 12
    """Text layers that receive fresh prompts (1: layer 0 only; at most the text tower's depth)."""
    depth_vision: int = 12
    """Vision layers that receive fresh prompts (1: layer 0 only; at most the image tower's depth)."""
    ctx_init: str = "a photo of a"
    """Text prompt `<ctx_init> <class>.`; its first n_ctx_text tokens are learned, the rest stay fixed words.
    Empty: N(0, 0.02) tokens."""

    def layout(self) -> PromptLayout:
        return PromptLayout(self.n_ctx_text, self.depth_text, self.n_ctx_vision, self.depth_vision, self.ctx_init)


@dataclass
class VPTConfig:
    n_ctx: int = 8
    """Vision prompt tokens per layer."""
    depth: int = 12
    """Vision layers that receive fresh prompts (1: shallow VPT)."""
    text_template: str = "a photo of a {}."
    """Frozen text side; empty: the dataset's own template."""

    def layout(self) -> PromptLayout:
        return PromptLayout(0, 0, self.n_ctx, self.depth)


@dataclass
class DeepLanguageConfig(TextEncodingConfig):
    n_ctx: int = 4
    """Text prompt tokens per layer."""
    depth: int = 12
    """Text layers that receive fresh prompts (1: CoOp-like shallow prompting)."""
    ctx_init: str = "a photo of a"
    """Layer-0 tokens from these words (their first n_ctx tokens); empty: N(0, 0.02)."""

    def layout(self) -> PromptLayout:
        return PromptLayout(self.n_ctx, self.depth, 0, 0, self.ctx_init)


# --------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------


class TowerPrompts(nn.Module):
    """Prompt tokens of one tower: `ctx` enters layer 0; `deep[str(j)]` replaces the slots entering layer j."""

    def __init__(self, initial: torch.Tensor, depth: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"prompt depth must be at least 1, got {depth}")
        self.ctx = nn.Parameter(initial.detach().clone().float())
        self.deep = nn.ParameterDict(
            {str(layer): nn.Parameter(random_prompt(initial.shape, initial.device)) for layer in range(1, depth)}
        )

    @property
    def depth(self) -> int:
        return 1 + len(self.deep)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    def deep_prompts(self) -> list[torch.Tensor | None]:
        """Per-layer replacements for the backbone hook: None for layer 0 (`ctx` is already in the input)."""
        # Indexing (not cached references) so substituted parameters (functional_call) are always used.
        return [None, *(self.deep[str(layer)] for layer in range(1, self.depth))]


def random_prompt(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    return torch.empty(tuple(shape), device=device).normal_(std=PROMPT_INIT_STD)


def check_layout(layout: PromptLayout, clip: CLIP, method: str) -> None:
    """Refuse layouts the backbone cannot hold, naming the field and the fix."""
    if layout.n_ctx_vision and not clip.config.vision.is_vit:
        raise ValueError(f"{method}: vision prompts need a ViT image tower; {clip.config.name} is a ResNet")
    towers = (
        ("text", layout.n_ctx_text, layout.depth_text, clip.config.text.layers),
        ("vision", layout.n_ctx_vision, layout.depth_vision, clip.config.vision.layers),
    )
    for tower, n_ctx, depth, layers in towers:
        if n_ctx < 0 or depth < 0:
            raise ValueError(f"{method}: {tower} prompt length and depth must be >= 0 (got {n_ctx} and {depth})")
        if (n_ctx == 0) != (depth == 0):
            raise ValueError(
                f"{method}: {tower} prompts with {n_ctx} tokens and depth {depth}; a prompted tower needs both "
                "above 0, an unprompted one both 0"
            )
        if depth > layers:
            raise ValueError(
                f"{method}: {tower} prompt depth {depth} exceeds the {layers} layers of {clip.config.name}'s "
                f"{tower} tower; set the depth to at most {layers}"
            )
    if layout.ctx_init and layout.n_ctx_text:
        available = len(get_tokenizer().encode(layout.ctx_init))
        if available < layout.n_ctx_text:
            raise ValueError(
                f"{method}: ctx_init {layout.ctx_init!r} has {available} tokens, fewer than the "
                f"{layout.n_ctx_text} text prompt tokens; use longer words or ctx_init '' (random init)"
            )


def initial_text_context(clip: CLIP, n_ctx: int, ctx_init: str) -> torch.Tensor:
    """Layer-0 text context [n_ctx, W]: the first n_ctx token embeddings of `ctx_init`, or N(0, 0.02)."""
    if ctx_init:
        return context_init_from_text(clip, ctx_init)[:n_ctx]
    weight = clip.token_embedding.weight
    return random_prompt((n_ctx, weight.shape[1]), weight.device)


def context_prompt_parts(clip: CLIP, names: Sequence[str], n_ctx: int, ctx_init: str) -> PromptParts:
    """Frozen pieces of `<ctx_init> <name>.` around its first n_ctx tokens (which the context replaces).

    Words of `ctx_init` past the first n_ctx tokens stay as fixed words (MaPLe's 2 tokens of "a photo of a"
    leave "of a" in place)."""
    lead = ctx_init if ctx_init else " ".join([PLACEHOLDER] * n_ctx)
    tokens = tokenize([f"{lead} {name}." for name in names], context_length=clip.context_length, names=names)
    eot_index, length = end_of_text(tokens)
    tokens = tokens.to(clip.token_embedding.weight.device)
    with torch.no_grad():
        embeddings = clip.token_embedding(tokens).float()
    tokenizer = get_tokenizer()
    return PromptParts(
        prefix=embeddings[:, :1].clone(),
        suffix=embeddings[:, 1 + n_ctx :].clone(),
        eot_index=eot_index.to(tokens.device),
        name_lens=[len(tokenizer.encode(name)) for name in names],
        n_ctx=n_ctx,
        length=length,
    )


# --------------------------------------------------------------------------------------------------------
# Shared learner
# --------------------------------------------------------------------------------------------------------


class DeepPromptModel(PromptModel):
    """Deep text prompts (`text`, may be None) and a vision-prompt hook; subclasses decide the vision side."""

    has_visual_prompts = True
    encodes_sentences = True

    def __init__(
        self,
        clip: CLIP,
        classnames: Sequence[str],
        cfg: Any,
        template: str = "a photo of a {}.",
        layout: PromptLayout | None = None,
    ) -> None:
        super().__init__(clip, classnames, cfg, template)
        self.layout = layout if layout is not None else cfg.layout()
        check_layout(self.layout, clip, self.name)
        self.text: TowerPrompts | None = None
        if self.layout.n_ctx_text:
            initial = initial_text_context(clip, self.layout.n_ctx_text, self.layout.ctx_init)
            self.text = TowerPrompts(initial, self.layout.depth_text)
        self._parts: PromptParts | None = None
        self._frozen_text_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._sentence_cache: tuple[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] | None = None

    # -- text side ---------------------------------------------------------------------------------------
    def prompt_parts(self, names: Sequence[str]) -> PromptParts:
        assert self.text is not None
        n_ctx, ctx_init = self.layout.n_ctx_text, self.layout.ctx_init
        if list(names) != self.classnames:
            return context_prompt_parts(self.clip, names, n_ctx, ctx_init)
        if self._parts is None or self._parts.prefix.device != self.text.ctx.device:
            self._parts = context_prompt_parts(self.clip, self.classnames, n_ctx, ctx_init)
        return self._parts

    def frozen_text_template(self) -> str:
        """Template of the frozen text side when the text tower carries no prompts."""
        return self.template

    def encode_classnames(self, names: Sequence[str]) -> torch.Tensor:
        if self.text is None:
            return encode_templates(self.clip, names, self.frozen_text_template())
        parts = self.prompt_parts(names)
        embeddings = assemble_prompts(parts, self.text.ctx)
        return encode_prompt_embeddings(
            self.clip,
            embeddings,
            parts.eot_index,
            self.text.deep_prompts(),
            chunk_size=self._chunk_size(),
            checkpoint=self._checkpoint(),
            text_length=parts.length,
        )

    def encode_sentences(self, sentences: Sequence[str]) -> torch.Tensor:
        """Normalised features of hand-written sentences (e.g. background prompts) through the deep text
        prompts: layer 0 reads the sentence's own tokens, layers 1..depth-1 get the learned prompts in
        positions 1..n_ctx, as in every prompted sequence."""
        tokens, embeddings, eot_index, length = self._sentence_inputs(sentences)
        if self.text is None:
            with torch.no_grad():
                return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
        return encode_prompt_embeddings(
            self.clip,
            embeddings,
            eot_index,
            self.text.deep_prompts(),
            chunk_size=self._chunk_size(),
            checkpoint=self._checkpoint(),
            text_length=length,
        )

    def _sentence_inputs(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(token ids, their frozen token embeddings, end-of-text positions, text length) of `sentences` on the
        model's device, kept for the last sentence list: DAPT encodes the same background sentences at every
        step, and tokenising them and copying the ids to the device is host work the step would wait for."""
        weight = self.clip.token_embedding.weight
        key = (tuple(sentences), weight.device, weight._version)
        if self._sentence_cache is None or self._sentence_cache[0] != key:
            tokens = tokenize(list(sentences), context_length=self.clip.context_length)
            eot_index, length = end_of_text(tokens)
            tokens = tokens.to(weight.device)
            with torch.no_grad():
                embeddings = self.clip.token_embedding(tokens).float()
            self._sentence_cache = (key, (tokens, embeddings, eot_index.to(weight.device), length))
        return self._sentence_cache[1]

    def text_features(self) -> torch.Tensor:
        if self.text is not None:
            return super().text_features()
        # Frozen text side: encoded once per class set, in training as in evaluation.
        key = (tuple(self.classnames), self.frozen_text_template(), self.clip.token_embedding.weight.device)
        if self._frozen_text_cache is None or self._frozen_text_cache[0] != key:
            self._frozen_text_cache = (key, self.compute_text_features())
        return self._frozen_text_cache[1]

    def set_classnames(self, names: Sequence[str]) -> None:
        super().set_classnames(names)
        self._parts = None

    def _chunk_size(self) -> int | None:
        return self.cfg.text_chunk_size if isinstance(self.cfg, TextEncodingConfig) else None

    def _checkpoint(self) -> bool:
        return isinstance(self.cfg, TextEncodingConfig) and self.cfg.text_checkpoint

    # -- vision side -------------------------------------------------------------------------------------
    def vision_prompts(self) -> tuple[torch.Tensor, DeepPrompts] | None:
        """(layer-0 tokens, per-layer replacements) for the image tower, or None for a frozen tower."""
        return None

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        prompts = self.vision_prompts()
        if prompts is None:
            return super().image_features(images)
        shallow, deep = prompts
        return F.normalize(self.clip.encode_image(images, shallow, deep).float(), dim=-1)


@METHODS.register("ivlp")
class IVLP(DeepPromptModel):
    """Independent vision-language prompting: free deep prompts in both towers, cross-entropy."""

    name = "ivlp"
    Config: ClassVar[type] = IVLPConfig

    def __init__(self, clip: CLIP, classnames: Sequence[str], cfg: Any, template: str = "a photo of a {}.") -> None:
        super().__init__(clip, classnames, cfg, template)
        self.vision: TowerPrompts | None = None
        if self.layout.n_ctx_vision:
            width = clip.config.vision.width
            device = clip.token_embedding.weight.device
            initial = random_prompt((self.layout.n_ctx_vision, width), device)
            self.vision = TowerPrompts(initial, self.layout.depth_vision)

    def vision_prompts(self) -> tuple[torch.Tensor, DeepPrompts] | None:
        if self.vision is None:
            return None
        return self.vision.ctx, self.vision.deep_prompts()


@METHODS.register("vpt")
class VPTDeep(IVLP):
    """VPT-deep: prompts in the image tower only; the text side is frozen CLIP with a fixed template."""

    name = "vpt"
    Config = VPTConfig

    def frozen_text_template(self) -> str:
        return self.cfg.text_template or self.template


@METHODS.register("deep_lang")
class DeepLanguagePrompting(IVLP):
    """Deep language prompting: prompts in the text tower only; the image tower is frozen CLIP."""

    name = "deep_lang"
    Config = DeepLanguageConfig
    has_visual_prompts = False


# --------------------------------------------------------------------------------------------------------
# Checkpoints of the original code (IVLP, VPT and PromptSRC trainers, PromptKD's PromptSRC teachers)
# --------------------------------------------------------------------------------------------------------

_OFFICIAL_DEEP = re.compile(r"^(text_encoder|image_encoder)\.transformer\.resblocks\.(\d+)\.VPT_shallow$")


def convert_official_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our prompt tensors (fp32) from the state dict saved by the original IVLP / VPT / PromptSRC trainers.

    They save the whole model: `prompt_learner.ctx` (text layer 0), `image_encoder.VPT` (vision layer 0) and
    `{text_encoder,image_encoder}.transformer.resblocks.<j>.VPT_shallow` (deep prompts). Everything else (the
    frozen CLIP, PromptSRC's second image encoder, class-name buffers) is left out. Load the result with
    `learner.load_trainable_state`, which checks it against the learner's layout."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "prompt_learner.ctx":
            converted["text.ctx"] = tensor
        elif key == "image_encoder.VPT":
            converted["vision.ctx"] = tensor
        elif match := _OFFICIAL_DEEP.match(key):
            tower = "text" if match.group(1) == "text_encoder" else "vision"
            converted[f"{tower}.deep.{int(match.group(2))}"] = tensor
    if not converted:
        raise ValueError("no IVLP/VPT/PromptSRC prompt tensors in this state dict (prompt_learner.ctx, *.VPT*)")
    return {key: tensor.detach().float().clone() for key, tensor in converted.items()}
