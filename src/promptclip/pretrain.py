"""Contrastive image-caption pretraining of a tiny CLIP on the synthetic world.

The bundled `tiny-synthetic` model is trained by this module: a small ViT image tower and a causal text tower
(CLIP's real BPE ids) learn from an endless stream of rendered scenes and their captions, the way CLIP learnt
from web pairs. Every colour, shape and scene of the downstream synthetic tasks appears in the captions, so
the "new" classes of a base-to-novel split are known to the backbone, as they are to real CLIP.

Design choices:

* **Data as a pure function of the step.** Batch `s` is rendered from `sample_pretraining_specs` shards and a
  caption variant drawn from a generator seeded by `(seed, s)`, so a resumed run sees exactly the batches an
  uninterrupted one would, with no loader state in the checkpoint.
* **Shape twins.** Part of each batch repeats other images of the batch with only the shape changed, so the
  contrastive task cannot be solved from colour and texture alone (a ViT from scratch learns those first).
* **Captions.** The world's own captions (`synthetic.caption`: several sentence patterns and synonyms),
  none written to match the downstream prompts. Optionally (`partial_caption_prob`) a fraction name only
  some attributes ("a drawing of a star.", "a purple object on a snow background."); the shipped model
  does without them, because they make the hand-written class prompts so good that prompt tuning has
  nothing left to learn (docs/tiny-clip.md).
* **Loss.** Symmetric InfoNCE with a learnable temperature (logit scale clamped at 100). A caption that
  truly describes several images of the batch spreads its target uniformly over all of them (and each
  image over all captions that describe it); with only exact matches this is CLIP's loss.
* **Optimisation.** AdamW (CLIP's betas and eps, no weight decay on gains, biases, embeddings and the
  temperature), linear warm-up then cosine decay per step, gradient clipping.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from promptclip.clip.model import CLIP, ArchConfig
from promptclip.clip.tokenizer import tokenize
from promptclip.clip.transforms import CLIP_MEAN, CLIP_STD
from promptclip.data import synthetic
from promptclip.io import atomic_write_json, atomic_write_with

__all__ = [
    "TINY_SYNTHETIC_ARCH",
    "CaptionedBatch",
    "PretrainConfig",
    "PretrainError",
    "PretrainResult",
    "ZeroShotProbe",
    "attribute_caption",
    "build_probes",
    "caption_batch",
    "clip_loss",
    "export_weights",
    "format_zero_shot_table",
    "images_to_pixels",
    "learning_rate",
    "pretrain",
    "set_threads",
    "zero_shot_accuracy",
    "zero_untrained_tokens",
]

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_FORMAT = 1
MAX_LOGIT_SCALE = 100.0
RENDER_SIZE = 64  # the downstream synthetic tasks' default image size

#: The architecture of the bundled model: a 64 px ViT with 8 px patches (64 patch tokens), 4 layers of width
#: 128 in each tower, a 128-d joint space, and CLIP's 49408-id vocabulary so that the real tokenizer's ids
#: (and every prompt method built on them) work unchanged.
TINY_SYNTHETIC_ARCH: dict[str, Any] = {
    "name": "tiny-synthetic",
    "embed_dim": 128,
    "vision": {"image_size": 64, "width": 128, "layers": 4, "heads": 2, "patch_size": 8},
    "text": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}


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


# --------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------

# Attribute keys a caption may mention; full captions also pin size and position.
_SHAPE, _COLOUR, _SCENE, _SIZE, _POSITION = range(5)
_FULL = (_SHAPE, _COLOUR, _SCENE, _SIZE, _POSITION)

# Partial descriptions: (pattern, mentioned attributes). Their wording differs from the downstream prompt
# templates on purpose, so zero-shot prompts are close to, not copies of, what the text tower was taught.
_PARTIAL_PATTERNS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("a {shape}.", (_SHAPE,)),
    ("a drawing of a {shape}.", (_SHAPE,)),
    ("a {shape} shape.", (_SHAPE,)),
    ("something {colour}.", (_COLOUR,)),
    ("a {colour} thing.", (_COLOUR,)),
    ("a {colour} {shape}.", (_COLOUR, _SHAPE)),
    ("a picture of a {colour} {shape}.", (_COLOUR, _SHAPE)),
    ("a {scene} background.", (_SCENE,)),
    ("a picture with {scene} behind.", (_SCENE,)),
    ("a {shape} on a {scene} background.", (_SHAPE, _SCENE)),
    ("a {colour} object on a {scene} background.", (_COLOUR, _SCENE)),
    ("a {colour} {shape}, {scene} behind it.", (_COLOUR, _SHAPE, _SCENE)),
)


def _with_articles(text: str) -> str:
    """Articles that agree with the word after them: "a orange star" -> "an orange star"."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "A") and words[i + 1][:1] in "aeiou":
            words[i] += "n"
    return " ".join(words)


def attribute_caption(spec: synthetic.SceneSpec, variant: int) -> tuple[str, tuple[int, ...]]:
    """A caption naming only some of the spec's attributes, and which ones (for the multi-positive targets)."""
    pattern, mentioned = _PARTIAL_PATTERNS[variant % len(_PARTIAL_PATTERNS)]
    text = pattern.format(shape=spec.shape, colour=spec.colour, scene=spec.scene)
    return _with_articles(text), mentioned


def _attributes(spec: synthetic.SceneSpec) -> tuple[str, str, str, str, str]:
    return (
        spec.shape,
        spec.colour,
        spec.scene,
        synthetic.size_word(spec.size),
        synthetic.position_phrase(spec.cx, spec.cy),
    )


@dataclass
class CaptionedBatch:
    """One pretraining batch: rendered images (uint8 [B, H, W, 3]), caption token ids [B, 77] and the
    [B, B] match matrix `matches[i, j]` = caption j truly describes image i."""

    images: np.ndarray
    tokens: torch.Tensor
    matches: torch.Tensor
    captions: list[str]


@lru_cache(maxsize=65536)
def _token_ids(text: str, context_length: int) -> tuple[int, ...]:
    return tuple(tokenize(text, context_length=context_length, truncate=True)[0].tolist())


def _match_matrix(specs: Sequence[synthetic.SceneSpec], mentioned: Sequence[tuple[int, ...]]) -> torch.Tensor:
    attrs = np.array([_attributes(s) for s in specs], dtype=object)  # [B, 5]
    matches = np.ones((len(specs), len(specs)), dtype=bool)
    for j, keys in enumerate(mentioned):
        for key in keys:
            matches[:, j] &= attrs[:, key] == attrs[j, key]
    return torch.from_numpy(matches)


@lru_cache(maxsize=2)
def _spec_shard(seed: int, shard: int, shard_size: int) -> tuple[synthetic.SceneSpec, ...]:
    return tuple(synthetic.sample_pretraining_specs(shard_size, seed=seed * 1_000_003 + shard))


def _twin_count(cfg: PretrainConfig) -> int:
    return round(cfg.batch_size * cfg.twin_fraction)


def _fresh_specs(cfg: PretrainConfig, step: int) -> list[synthetic.SceneSpec]:
    """The new specs of batch `step`: consecutive slices of seed-keyed shards, so any step is reachable."""
    fresh = cfg.batch_size - _twin_count(cfg)
    per_shard = cfg.shard_size // fresh
    if per_shard < 1:
        raise PretrainError(f"pretrain config: shard_size ({cfg.shard_size}) must be >= batch_size ({cfg.batch_size})")
    shard, slot = divmod(step, per_shard)
    start = slot * fresh
    return list(_spec_shard(cfg.seed, shard, cfg.shard_size)[start : start + fresh])


def _shape_twins(
    specs: Sequence[synthetic.SceneSpec], count: int, rng: np.random.Generator
) -> list[synthetic.SceneSpec]:
    """Copies of the first `count` specs, each with another shape drawn at random."""
    offsets = rng.integers(1, len(synthetic.SHAPES), count)
    twins = []
    for spec, offset in zip(specs[:count], offsets, strict=True):
        shape = synthetic.SHAPES[(synthetic.SHAPES.index(spec.shape) + int(offset)) % len(synthetic.SHAPES)]
        twins.append(dataclasses.replace(spec, shape=shape))
    return twins


def _batch_specs(cfg: PretrainConfig, step: int) -> list[synthetic.SceneSpec]:
    specs = _fresh_specs(cfg, step)
    rng = np.random.default_rng([cfg.seed, step, 29])
    return specs + _shape_twins(specs, _twin_count(cfg), rng)


def caption_batch(cfg: PretrainConfig, step: int, context_length: int = 77) -> CaptionedBatch:
    """Render batch `step` of the run defined by `cfg` (a pure function of `cfg.seed` and `step`)."""
    specs = _batch_specs(cfg, step)
    rng = np.random.default_rng([cfg.seed, step, 17])
    partial = rng.random(len(specs)) < cfg.partial_caption_prob
    variants = rng.integers(0, 1 << 20, len(specs))
    captions: list[str] = []
    mentioned: list[tuple[int, ...]] = []
    for spec, is_partial, variant in zip(specs, partial, variants, strict=True):
        if is_partial:
            text, keys = attribute_caption(spec, int(variant))
        else:
            text, keys = synthetic.caption(spec, int(variant)), _FULL
        captions.append(text)
        mentioned.append(keys)
    images, _ = synthetic.render_batch(specs, RENDER_SIZE)
    tokens = torch.tensor([_token_ids(text, context_length) for text in captions], dtype=torch.long)
    return CaptionedBatch(images, tokens, _match_matrix(specs, mentioned), captions)


def images_to_pixels(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, 3, S, S] (bicubic resize when S differs from H)."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    if pixels.shape[-1] != image_size:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bicubic", antialias=True).clamp_(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


# --------------------------------------------------------------------------------------------------------
# Loss and schedule
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Zero-shot probes on the downstream tasks
# --------------------------------------------------------------------------------------------------------


@dataclass
class ZeroShotProbe:
    """Rendered images of one downstream task split, with its classes and prompt template."""

    task: str
    classnames: list[str]
    template: str
    images: np.ndarray
    labels: np.ndarray


def build_probes(split: str = "val", per_class: int = 8, seed: int = 0) -> list[ZeroShotProbe]:
    """One probe per synthetic task: `per_class` images of every class from the task's `split`."""
    probes = []
    for name in synthetic.TASK_NAMES:
        counts = {"val_per_class": per_class} if split == "val" else {"test_per_class": per_class}
        task = synthetic.build_task(name, seed=seed, image_size=RENDER_SIZE, **counts)
        samples = task.split(split)
        images, _ = synthetic.render_batch([s.spec for s in samples], RENDER_SIZE)
        labels = np.array([s.label for s in samples], dtype=np.int64)
        probes.append(ZeroShotProbe(name, list(task.classnames), task.template, images, labels))
    return probes


def _halves(num_classes: int) -> dict[str, list[int]]:
    cut = math.ceil(num_classes / 2)  # the field's base/new cut: base = first ceil(n/2) labels
    return {"all": list(range(num_classes)), "base": list(range(cut)), "new": list(range(cut, num_classes))}


@torch.no_grad()
def zero_shot_accuracy(
    model: CLIP, probes: Sequence[ZeroShotProbe], batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy (%) of `model` on each probe with the task's template: over all classes, and over
    the base and new halves (each half classified among its own classes, as in base-to-novel)."""
    was_training = model.training
    model.eval()
    device = model.token_embedding.weight.device
    results: dict[str, dict[str, float]] = {}
    for probe in probes:
        prompts = [probe.template.format(name) for name in probe.classnames]
        text = F.normalize(model.encode_text(tokenize(prompts, model.context_length).to(device)).float(), dim=-1)
        image = torch.cat(
            [
                F.normalize(
                    model.encode_image(
                        images_to_pixels(probe.images[i : i + batch_size], model.image_size).to(device)
                    ).float(),
                    dim=-1,
                )
                for i in range(0, len(probe.images), batch_size)
            ]
        )
        labels = torch.from_numpy(probe.labels).to(device)
        scores = image @ text.t()
        results[probe.task] = {}
        for half, classes in _halves(len(probe.classnames)).items():
            chosen = torch.tensor(classes, device=device)
            rows = torch.isin(labels, chosen)
            predicted = chosen[scores[rows][:, chosen].argmax(dim=1)]
            results[probe.task][half] = round(100.0 * (predicted == labels[rows]).float().mean().item(), 2)
    model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------


def _save_checkpoint(
    path: Path, model: CLIP, optimizer: torch.optim.Optimizer, step: int, cfg: PretrainConfig, history: list
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "model": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "history": json.dumps(history),
    }
    atomic_write_with(path, lambda tmp: torch.save(payload, tmp))


# Settings that do not change the weights, so a resumed run may choose them anew.
_BOOKKEEPING = frozenset({"eval_every", "eval_per_class", "checkpoint_every"})


def _load_checkpoint(path: Path, cfg: PretrainConfig) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file
        raise PretrainError(
            f"{path}: cannot be read as a pretraining checkpoint ({type(err).__name__}: {err}); delete it or "
            "choose another output folder to start afresh"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise PretrainError(f"{path}: not a promptclip pretraining checkpoint (format {CHECKPOINT_FORMAT})")
    saved, current = json.loads(payload["config"]), cfg.to_dict()
    keys = (saved.keys() | current.keys()) - _BOOKKEEPING
    differing = sorted(k for k in keys if saved.get(k) != current.get(k))
    if differing:
        raise PretrainError(
            f"{path}: was written by a run with other settings ({', '.join(differing)} differ); resume with the "
            "same settings, or choose another output folder (or pass --no-resume) to start afresh"
        )
    return payload


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    model: CLIP
    history: list[dict[str, Any]]
    steps_run: int
    seconds: float
    trained_tokens: torch.Tensor | None = None
    """Bool mask over the vocabulary: token ids that received a gradient during training."""

    @property
    def last_eval(self) -> dict[str, Any] | None:
        return next((h for h in reversed(self.history) if "zero_shot" in h), None)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_step(
    model: CLIP, optimizer: torch.optim.Optimizer, batch: CaptionedBatch, cfg: PretrainConfig, step: int
) -> dict[str, float]:
    device = model.token_embedding.weight.device
    lr = learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    pixels = images_to_pixels(batch.images, model.image_size).to(device)
    with _autocast(device, cfg.precision):
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(batch.tokens.to(device))
    loss = clip_loss(image_features, text_features, model.logit_scale, batch.matches)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite pretraining loss at step {step}; lower lr or use fp32")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))
    return {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "logit_scale": model.logit_scale.exp().item()}


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = tqdm.write,
) -> PretrainResult:
    """Pretrain a CLIP of `cfg.arch` from scratch (or resume `out_dir/checkpoint.pt`).

    `out_dir` receives `checkpoint.pt` (every `checkpoint_every` steps and at the end, written atomically)
    and `metrics.json`. `stop_after` ends the run after that many steps of this call (the checkpoint lets a
    later call continue). The returned model is in eval mode with gradients still enabled.
    """
    cfg.check()
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = CLIP(cfg.arch_config()).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    history: list[dict[str, Any]] = []
    start = 0
    ckpt_path = Path(out_dir) / CHECKPOINT_FILE if out_dir is not None else None
    if ckpt_path is not None and resume and ckpt_path.is_file():
        payload = _load_checkpoint(ckpt_path, cfg)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        history = json.loads(payload["history"])
        start = int(payload["step"])
        if log:
            log(f"resuming from {ckpt_path} at step {start}/{cfg.steps}")
    probes = build_probes("val", cfg.eval_per_class, seed=0) if cfg.eval_every <= cfg.steps else []
    began = time.time()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(total=cfg.steps, initial=start, desc="pretrain", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, end):
            batch = caption_batch(cfg, step, model.context_length)
            record: dict[str, Any] = {"step": step + 1, **_train_step(model, optimizer, batch, cfg, step)}
            done = step + 1
            if probes and (done % cfg.eval_every == 0 or done == cfg.steps):
                record["zero_shot"] = zero_shot_accuracy(model, probes)
                if log:
                    log(f"step {done}: loss {record['loss']:.3f} zero-shot " + _format_eval(record["zero_shot"]))
            history.append(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", scale=f"{record['logit_scale']:.1f}", lr=f"{record['lr']:.1e}"
            )
            if ckpt_path is not None and (done % cfg.checkpoint_every == 0 or done == end):
                _save_checkpoint(ckpt_path, model, optimizer, done, cfg, history)
                atomic_write_json(ckpt_path.with_name(METRICS_FILE), history)
    finally:
        bar.close()
    model.eval()
    steps_run = max(0, end - start)
    return PretrainResult(model, history, steps_run, time.time() - began, _trained_tokens(model, optimizer))


def _trained_tokens(model: CLIP, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Rows of the token embedding that ever had a gradient: Adam's second moment is non-zero exactly there."""
    state = optimizer.state.get(model.token_embedding.weight, {})
    second_moment = state.get("exp_avg_sq")
    return None if second_moment is None else (second_moment != 0).any(dim=1).cpu()


def zero_untrained_tokens(model: CLIP, trained: torch.Tensor) -> int:
    """Set the embedding rows of tokens never seen in training to zero (they hold only their random
    initialisation); zero rows keep the shipped file small once compressed. Returns how many were kept."""
    with torch.no_grad():
        model.token_embedding.weight[~trained.to(model.token_embedding.weight.device)] = 0.0
    return int(trained.sum())


def _format_eval(results: Mapping[str, Mapping[str, float]]) -> str:
    return ", ".join(f"{task}: base {r['base']:.1f} new {r['new']:.1f}" for task, r in results.items())


def _harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def format_zero_shot_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of `zero_shot_accuracy` results, with the chance level of each half."""
    lines = [
        "| task | classes | base | new | HM | all | chance base / new |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        count = len(synthetic.build_task(task, train_per_class=1, val_per_class=0, test_per_class=1).classnames)
        halves = _halves(count)
        chance = f"{100 / len(halves['base']):.1f} / {100 / len(halves['new']):.1f}"
        hm = _harmonic_mean(r["base"], r["new"])
        lines.append(f"| {task} | {count} | {r['base']:.1f} | {r['new']:.1f} | {hm:.1f} | {r['all']:.1f} | {chance} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Shipping
# --------------------------------------------------------------------------------------------------------


def export_weights(model: CLIP, path: str | Path, dtype: torch.dtype = torch.float16) -> str:
    """Write the model as `path` (safetensors, `dtype` storage, architecture in the metadata) and its
    architecture JSON beside it; return the file's sha256. `load_clip(path)` reads it back as fp32."""
    from promptclip.clip.weights import save_clip
    from promptclip.io import sha256_file

    stored = copy.deepcopy(model).to("cpu", dtype)
    save_clip(stored, Path(path))
    return sha256_file(path)


def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads (and OpenMP's, for libraries that read the variable late)."""
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
