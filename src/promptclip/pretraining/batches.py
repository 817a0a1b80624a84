"""Pretraining batches: rendered scenes of the synthetic world and their captions, a pure function of the
run's seed and the step (so a resumed run sees exactly the batches an uninterrupted one would)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from promptclip.clip.tokenizer import tokenize
from promptclip.clip.transforms import CLIP_MEAN, CLIP_STD
from promptclip.data import synthetic
from promptclip.data.synthetic_style import STYLE_RANGES, apply_style
from promptclip.pretraining.config import PretrainConfig, PretrainError

__all__ = ["RENDER_SIZE", "CaptionedBatch", "attribute_caption", "caption_batch", "images_to_pixels"]

RENDER_SIZE = 64  # the downstream synthetic tasks' default image size

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
def _spec_shard(seed: int, shard: int, shard_size: int, kinds: bool) -> tuple[synthetic.SceneSpec, ...]:
    return tuple(synthetic.sample_pretraining_specs(shard_size, seed=seed * 1_000_003 + shard, kinds=kinds))


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
    kinds = cfg.world == "kinds"
    return list(_spec_shard(cfg.seed, shard, cfg.shard_size, kinds)[start : start + fresh])


def _shape_twins(
    specs: Sequence[synthetic.SceneSpec], count: int, rng: np.random.Generator
) -> list[synthetic.SceneSpec]:
    """Copies of the first `count` specs, each with another of the ten plain shapes (the "shapes" world)."""
    offsets = rng.integers(1, len(synthetic.SHAPES), count)
    twins = []
    for spec, offset in zip(specs[:count], offsets, strict=True):
        shape = synthetic.SHAPES[(synthetic.SHAPES.index(spec.shape) + int(offset)) % len(synthetic.SHAPES)]
        twins.append(dataclasses.replace(spec, shape=shape))
    return twins


def with_shape(spec: synthetic.SceneSpec, shape: str) -> synthetic.SceneSpec:
    """`spec` with another shape or kind (a kind brings its own colour)."""
    colour = synthetic.KINDS[shape].colour if shape in synthetic.KINDS else spec.colour
    return dataclasses.replace(spec, shape=shape, colour=colour)


def _kind_twins(
    specs: Sequence[synthetic.SceneSpec], count: int, rng: np.random.Generator
) -> list[synthetic.SceneSpec]:
    """Copies of the first `count` specs, each with another shape or kind.

    Half the twins of a kind keep its colour: another kind of that colour, or its silhouette without the
    marking, so that outline and marking, not the colour, must be seen to tell kinds apart."""
    twins = []
    for spec in specs[:count]:
        siblings = _siblings(spec.shape)
        pool = siblings if siblings and rng.random() < 0.5 else [s for s in synthetic.ALL_SHAPES if s != spec.shape]
        twins.append(with_shape(spec, pool[int(rng.integers(len(pool)))]))
    return twins


@lru_cache(maxsize=64)
def _siblings(shape: str) -> list[str]:
    """For kind `shape`: its silhouette without the marking, and the other kinds of its colour (empty for a
    plain shape). A twin among these differs from the original only in outline and marking."""
    if shape not in synthetic.KINDS:
        return []
    own = synthetic.KINDS[shape]
    mates = [name for name, kind in synthetic.KINDS.items() if kind.colour == own.colour and name != shape]
    return [own.silhouette, *mates]


def _batch_specs(cfg: PretrainConfig, step: int) -> list[synthetic.SceneSpec]:
    specs = _fresh_specs(cfg, step)
    rng = np.random.default_rng([cfg.seed, step, 29])
    twins = _kind_twins if cfg.world == "kinds" else _shape_twins
    return specs + twins(specs, _twin_count(cfg), rng)


# Captions of zoomed-in crops: the crop changes the size and position words, so they name neither.
_CROP_PATTERNS: tuple[str, ...] = (
    "a close-up of a {colour} {shape} {scene}.",
    "a {colour} {shape} {scene}, seen up close.",
)


def _crop_caption(spec: synthetic.SceneSpec, variant: int) -> str:
    pattern = _CROP_PATTERNS[variant % len(_CROP_PATTERNS)]
    if spec.shape in synthetic.KINDS:  # as in the world's captions, a kind's name carries its colour
        pattern = pattern.replace("{colour} ", "")
    scene = synthetic.caption_scene_phrase(spec.scene, variant // len(_CROP_PATTERNS))
    return _with_articles(pattern.format(colour=spec.colour, shape=spec.shape, scene=scene))


def _zoom_crop(image: np.ndarray, spec: synthetic.SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """A square crop that keeps the whole object in view, resized back to the image's side (bilinear)."""
    n = image.shape[0]
    low = min(1.0, spec.size + 0.1)
    side = max(4, round(rng.uniform(low, 1.0) * n))
    radius = spec.size / 2 * n
    x_min = max(0, min(n - side, math.ceil(spec.cx * n + radius) - side))
    x_max = max(x_min, min(n - side, math.floor(spec.cx * n - radius)))
    y_min = max(0, min(n - side, math.ceil(spec.cy * n + radius) - side))
    y_max = max(y_min, min(n - side, math.floor(spec.cy * n - radius)))
    x0, y0 = int(rng.integers(x_min, x_max + 1)), int(rng.integers(y_min, y_max + 1))
    crop = Image.fromarray(image[y0 : y0 + side, x0 : x0 + side])
    return np.asarray(crop.resize((n, n), Image.Resampling.BILINEAR))


def _style(image: np.ndarray, spec: synthetic.SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """The image in one of the world's styles, drawn at random with a random strength."""
    style = synthetic.STYLES[1 + int(rng.integers(len(synthetic.STYLES) - 1))]
    low, high = STYLE_RANGES[style]
    return apply_style(image, style, float(rng.uniform(low, high)), spec.seed)


def caption_batch(cfg: PretrainConfig, step: int, context_length: int = 77) -> CaptionedBatch:
    """Render batch `step` of the run defined by `cfg` (a pure function of `cfg.seed` and `step`)."""
    specs = _batch_specs(cfg, step)
    rng = np.random.default_rng([cfg.seed, step, 17])
    partial = rng.random(len(specs)) < cfg.partial_caption_prob
    variants = rng.integers(0, 1 << 20, len(specs))
    view_rng = np.random.default_rng([cfg.seed, step, 31])
    cropped = view_rng.random(len(specs)) < cfg.crop_fraction
    styled = view_rng.random(len(specs)) < cfg.style_fraction
    images, _ = synthetic.render_batch(specs, RENDER_SIZE)
    captions: list[str] = []
    mentioned: list[tuple[int, ...]] = []
    for i, (spec, variant) in enumerate(zip(specs, variants, strict=True)):
        keys: tuple[int, ...]
        if cropped[i]:
            images[i] = _zoom_crop(images[i], spec, view_rng)
            text, keys = _crop_caption(spec, int(variant)), (_SHAPE, _COLOUR, _SCENE)
        elif partial[i]:
            text, keys = attribute_caption(spec, int(variant))
        else:
            text, keys = synthetic.caption(spec, int(variant)), _FULL
        if styled[i]:
            images[i] = _style(images[i], spec, view_rng)
        captions.append(text)
        mentioned.append(keys)
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
