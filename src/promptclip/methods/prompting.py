"""Text prompts with learnable context: `[SOS] ctx_1..ctx_n <class name tokens> . [EOS]`.

The class-dependent pieces (token embeddings around the context, end-of-text positions, name lengths) are
computed once per class set without gradient; learners then assemble embeddings from their context tensors
and run them through `CLIP.encode_text_embeddings`. Shared by every CoOp-style method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from promptclip.clip.model import CLIP, DeepPrompts
from promptclip.clip.tokenizer import get_tokenizer, tokenize

ClassTokenPosition = Literal["end", "middle", "front"]
PLACEHOLDER = "X"


@dataclass
class TextEncodingConfig:
    """How a learner runs its prompts through the text tower: the options every learner with learned text
    prompts shares (CoOp, CoCoOp, KgCoOp, IVLP, PromptSRC, deep language prompting, MaPLe). Method configs
    inherit these fields, so recipes and saved prompt configs keep them as flat `method_cfg` keys."""

    text_chunk_size: int | None = None
    """Encode class prompts in chunks of this many rows (bounds memory for large class counts)."""
    text_checkpoint: bool = False
    """Recompute each chunk's text activations in the backward pass instead of keeping them: training memory
    grows with `text_chunk_size` instead of the class count (same gradients, about one more text pass)."""


@dataclass
class PromptParts:
    """Frozen pieces of the class prompts for one class set."""

    prefix: torch.Tensor  # [C, 1, W]   start-of-text embedding
    suffix: torch.Tensor  # [C, L-1-n, W]  class tokens, ".", end-of-text, padding
    eot_index: torch.Tensor  # [C]
    name_lens: list[int]
    n_ctx: int
    length: int
    """The last end-of-text position + 1, known on the host: the text tower is cut there without reading
    `eot_index` back from the device."""

    def to(self, device: torch.device | str) -> PromptParts:
        return PromptParts(
            self.prefix.to(device),
            self.suffix.to(device),
            self.eot_index.to(device),
            self.name_lens,
            self.n_ctx,
            self.length,
        )


def end_of_text(tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """End-of-text positions [N] of token ids [N, L] (the end-of-text id is the vocabulary's largest) and the
    last of them + 1, read while the ids are still on the host."""
    eot_index = tokens.argmax(dim=-1)
    return eot_index, int(eot_index.max()) + 1 if len(eot_index) else 0


def context_init_from_text(clip: CLIP, text: str) -> torch.Tensor:
    """Token embeddings [n, W] of `text` (e.g. "a photo of a"), used to initialise the context."""
    ids = get_tokenizer().encode(text)
    if not ids:
        raise ValueError(f"context init {text!r} has no tokens")
    with torch.no_grad():
        weight = clip.token_embedding.weight
        return weight[torch.tensor(ids, device=weight.device)].detach().clone().float()


def build_prompt_parts(clip: CLIP, classnames: Sequence[str], n_ctx: int, suffix: str = "{}.") -> PromptParts:
    """Tokenise `X X .. X <suffix with the class name>` and split the embeddings around the n context slots."""
    tokenizer = get_tokenizer()
    placeholder = " ".join([PLACEHOLDER] * n_ctx)
    texts = [f"{placeholder} {suffix.format(name)}".strip() for name in classnames]
    tokens = tokenize(texts, context_length=clip.context_length, names=classnames)
    eot_index, length = end_of_text(tokens)
    tokens = tokens.to(clip.token_embedding.weight.device)
    with torch.no_grad():
        embeddings = clip.token_embedding(tokens).float()
    name_lens = [len(tokenizer.encode(name)) for name in classnames]
    return PromptParts(
        prefix=embeddings[:, :1].clone(),
        suffix=embeddings[:, 1 + n_ctx :].clone(),
        eot_index=eot_index.to(tokens.device),
        name_lens=name_lens,
        n_ctx=n_ctx,
        length=length,
    )


def assemble_prompts(parts: PromptParts, ctx: torch.Tensor, position: ClassTokenPosition = "end") -> torch.Tensor:
    """Prompt embeddings [C, L, W]. `ctx` is [n, W] (shared by all classes) or [C, n, W] (class-specific)."""
    count = parts.prefix.shape[0]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(count, -1, -1)
    if ctx.shape[0] != count:
        raise ValueError(f"class-specific context has {ctx.shape[0]} rows for {count} classes")
    ctx = ctx.to(parts.prefix.dtype)
    if position == "end":
        return torch.cat([parts.prefix, ctx, parts.suffix], dim=1)
    rows = []
    half = parts.n_ctx // 2
    for i, name_len in enumerate(parts.name_lens):
        name = parts.suffix[i : i + 1, :name_len]
        rest = parts.suffix[i : i + 1, name_len:]
        prefix, row_ctx = parts.prefix[i : i + 1], ctx[i : i + 1]
        if position == "middle":
            pieces = [prefix, row_ctx[:, :half], name, row_ctx[:, half:], rest]
        elif position == "front":
            pieces = [prefix, name, row_ctx, rest]
        else:
            raise ValueError(f"class token position {position!r}; choose end, middle or front")
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0)


def encode_prompt_embeddings(
    clip: CLIP,
    embeddings: torch.Tensor,
    eot_index: torch.Tensor,
    deep_prompts: DeepPrompts | None = None,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    text_length: int | None = None,
) -> torch.Tensor:
    """Normalised text features of prompt embeddings [N, L, W], optionally in chunks of rows.

    Chunks bound the activations of a pass without autograd. In training, autograd keeps every chunk's
    activations for the backward pass, so `checkpoint` also recomputes each chunk there instead of keeping
    it: memory then grows with the chunk size instead of the class count, for about one more text forward
    pass; the gradients are the same. `text_length` (`PromptParts.length`) cuts every chunk after the last
    end-of-text position of all rows, without reading `eot_index` back from the device."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"text_chunk_size must be at least 1 (or null), got {chunk_size}")
    if chunk_size is None or embeddings.shape[0] <= chunk_size:
        features = _encode_rows(clip, embeddings, eot_index, deep_prompts, checkpoint, text_length)
        return F.normalize(features.float(), dim=-1)
    chunks = [
        _encode_rows(
            clip,
            embeddings[i : i + chunk_size],
            eot_index[i : i + chunk_size],
            deep_prompts,
            checkpoint,
            text_length,
        )
        for i in range(0, embeddings.shape[0], chunk_size)
    ]
    return F.normalize(torch.cat(chunks).float(), dim=-1)


def _encode_rows(
    clip: CLIP,
    embeddings: torch.Tensor,
    eot_index: torch.Tensor,
    deep_prompts: DeepPrompts | None,
    checkpoint: bool,
    text_length: int | None,
) -> torch.Tensor:
    """One text pass; with `checkpoint` (and a gradient to compute), its activations are recomputed in the
    backward pass instead of kept."""
    inputs = [embeddings, *(p for p in deep_prompts or () if p is not None)]
    if checkpoint and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return torch.utils.checkpoint.checkpoint(
            clip.encode_text_embeddings,
            embeddings,
            eot_index,
            deep_prompts,
            text_length=text_length,
            use_reentrant=False,
        )
    return clip.encode_text_embeddings(embeddings, eot_index, deep_prompts, text_length=text_length)


def encode_templates(
    clip: CLIP, classnames: Sequence[str], templates: Sequence[str] | str, chunk_size: int = 256
) -> torch.Tensor:
    """Frozen CLIP text features [C, D] of hand-written templates: each template's features are
    normalised, averaged over templates, and normalised again (the field's ensembling)."""
    if isinstance(templates, str):
        templates = [templates]
    device = clip.token_embedding.weight.device
    total: torch.Tensor | None = None
    with torch.no_grad():
        for template in templates:
            texts = [_fill(template, n) for n in classnames]
            tokens = tokenize(texts, context_length=clip.context_length, names=classnames)
            feats = torch.cat(
                [
                    F.normalize(clip.encode_text(tokens[i : i + chunk_size].to(device)).float(), dim=-1)
                    for i in range(0, len(tokens), chunk_size)
                ]
            )
            total = feats if total is None else total + feats
    assert total is not None
    return F.normalize(total, dim=-1)


def _fill(template: str | Callable[[str], str], name: str) -> str:
    return template(name) if callable(template) else template.format(name)
