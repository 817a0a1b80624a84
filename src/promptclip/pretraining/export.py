"""Shipping a pretrained model: untrained token rows zeroed, fp16 safetensors with the architecture."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from promptclip.clip.model import CLIP
from promptclip.clip.weights import save_clip
from promptclip.io import sha256_file

__all__ = ["export_weights", "zero_untrained_tokens"]


def zero_untrained_tokens(model: CLIP, trained: torch.Tensor) -> int:
    """Set the embedding rows of tokens never seen in training to zero (they hold only their random
    initialisation); zero rows keep the shipped file small once compressed. Returns how many were kept."""
    with torch.no_grad():
        model.token_embedding.weight[~trained.to(model.token_embedding.weight.device)] = 0.0
    return int(trained.sum())


def export_weights(model: CLIP, path: str | Path, dtype: torch.dtype = torch.float16) -> str:
    """Write the model as `path` (safetensors, `dtype` storage, architecture in the metadata) and its
    architecture JSON beside it; return the file's sha256. `load_clip(path)` reads it back as fp32."""
    stored = copy.deepcopy(model).to("cpu", dtype)
    save_clip(stored, Path(path))
    return sha256_file(path)
