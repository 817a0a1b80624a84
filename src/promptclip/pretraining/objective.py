"""The pretraining objective and its optimisation: multi-positive symmetric InfoNCE, warm-up + cosine
learning rate, AdamW without weight decay on gains, biases, embeddings and the temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from promptclip.clip.model import CLIP
from promptclip.pretraining.config import PretrainConfig

__all__ = ["MAX_LOGIT_SCALE", "build_optimizer", "clip_loss", "learning_rate"]

MAX_LOGIT_SCALE = 100.0


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, matches: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch; `matches[i, j]` marks caption j as a true description of image i.

    The target of image i is uniform over its matching captions and the target of caption j uniform over
    its matching images; with the identity as `matches` this is CLIP's loss exactly.
    """
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * image @ text.t()
    weights = matches.to(logits.device, torch.float32)
    image_targets = weights / weights.sum(dim=1, keepdim=True)
    text_targets = weights.t() / weights.t().sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, image_targets) + F.cross_entropy(logits.t(), text_targets))


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay from `lr` to `min_lr` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Gains, biases, embeddings (token, position, class) and the temperature are not shrunk.
    return param.dim() < 2 or "embedding" in name or name == "logit_scale"


def build_optimizer(model: CLIP, cfg: PretrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if not _no_decay(n, p)]
    keep = [p for n, p in model.named_parameters() if _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
