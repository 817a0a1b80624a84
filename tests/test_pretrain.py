"""Pretraining of the tiny CLIP: batches, loss, resume, export, and the bundled `tiny-synthetic` weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from promptclip.data import synthetic
from promptclip.io import sha256_file
from promptclip.pretraining import (
    PretrainConfig,
    PretrainError,
    attribute_caption,
    caption_batch,
    clip_loss,
    export_weights,
    images_to_pixels,
    learning_rate,
    pretrain,
)
from promptclip.pretraining.loop import CHECKPOINT_FILE

DOC = Path(__file__).resolve().parents[1] / "docs" / "tiny-clip.md"
ASSET = Path(__file__).resolve().parents[1] / "src" / "promptclip" / "assets" / "tiny-synthetic.safetensors"

# A CLIP small enough that a few optimiser steps take well under a second each.
MICRO_ARCH = {
    "name": "micro",
    "embed_dim": 32,
    "vision": {"image_size": 32, "width": 32, "layers": 1, "heads": 1, "patch_size": 8},
    "text": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


def micro_config(**changes: object) -> PretrainConfig:
    settings: dict[str, object] = {
        "arch": dict(MICRO_ARCH),
        "steps": 4,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 1,
        "eval_every": 10_000,  # no zero-shot probes: beyond the last step
        "checkpoint_every": 1,
        "shard_size": 256,
    }
    settings.update(changes)
    return PretrainConfig(**settings)  # type: ignore[arg-type]


def batch_loss(model: torch.nn.Module, cfg: PretrainConfig, step: int) -> float:
    batch = caption_batch(cfg, step)
    with torch.no_grad():
        image = model.encode_image(images_to_pixels(batch.images, model.image_size))
        text = model.encode_text(batch.tokens)
        return clip_loss(image, text, model.logit_scale, batch.matches).item()


# ---------------------------------------------------------------------------------------------------- data


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    cfg = micro_config()
    first, again, other = caption_batch(cfg, 3), caption_batch(cfg, 3), caption_batch(cfg, 4)
    assert first.captions == again.captions
    assert (first.images == again.images).all()
    assert torch.equal(first.tokens, again.tokens)
    assert first.captions != other.captions


def test_shape_twins_differ_from_their_source_only_in_shape() -> None:
    cfg = micro_config(batch_size=16, twin_fraction=0.5, world="shapes")
    from promptclip.pretraining.batches import _batch_specs

    specs = _batch_specs(cfg, 0)
    fresh, twins = specs[:8], specs[8:]
    for source, twin in zip(fresh, twins, strict=True):
        assert twin.shape != source.shape and twin.shape in synthetic.SHAPES
        assert (twin.colour, twin.scene, twin.size, twin.cx, twin.cy, twin.seed) == (
            source.colour,
            source.scene,
            source.size,
            source.cx,
            source.cy,
            source.seed,
        )


def test_kind_twins_differ_from_their_source_only_in_shape_and_the_colour_a_kind_brings() -> None:
    from promptclip.pretraining.batches import _batch_specs

    for step in range(4):
        specs = _batch_specs(micro_config(batch_size=32, twin_fraction=0.5, world="kinds"), step)
        fresh, twins = specs[:16], specs[16:]
        for source, twin in zip(fresh, twins, strict=True):
            assert twin.shape != source.shape
            colour = synthetic.KINDS[twin.shape].colour if twin.shape in synthetic.KINDS else source.colour
            assert (twin.colour, twin.scene, twin.size, twin.cx, twin.cy, twin.seed) == (
                colour,
                source.scene,
                source.size,
                source.cx,
                source.cy,
                source.seed,
            )


def test_partial_caption_matches_every_image_with_its_attributes() -> None:
    cfg = micro_config(partial_caption_prob=1.0, twin_fraction=0.0)
    batch = caption_batch(cfg, 0)
    from promptclip.pretraining.batches import _batch_specs

    specs = _batch_specs(cfg, 0)
    for j, text in enumerate(batch.captions):
        described = [i for i, spec in enumerate(specs) if _names(text, spec)]
        assert batch.matches[j, j]
        assert set(torch.nonzero(batch.matches[:, j]).flatten().tolist()) == set(described), text


def _names(text: str, spec: synthetic.SceneSpec) -> bool:
    """Whether every attribute word of a partial caption holds for `spec` (words are unambiguous here)."""
    words = text.rstrip(".")
    mentioned_shapes = [s for s in synthetic.ALL_SHAPES if re.search(rf"\b{s}\b", words)]
    mentioned_colours = [c for c in synthetic.COLOURS if re.search(rf"\b{c}\b", words)]
    mentioned_scenes = [s for s in synthetic.ALL_SCENES if re.search(rf"\b{s}\b", words)]
    if "night sky" in mentioned_scenes and "sky" in mentioned_scenes:
        mentioned_scenes.remove("sky")
    return (
        all(s == spec.shape for s in mentioned_shapes)
        and all(c == spec.colour for c in mentioned_colours)
        and all(s == spec.scene for s in mentioned_scenes)
    )


def test_attribute_caption_fixes_articles() -> None:
    spec = synthetic.SceneSpec("star", "orange", "grass", 0.5, 0.5, 0.5, 1)
    texts = {attribute_caption(spec, v)[0] for v in range(12)}
    assert "an orange star." in texts
    assert not any(" a orange" in t for t in texts)


# ---------------------------------------------------------------------------------------------------- loss


def test_clip_loss_with_identity_matches_is_clips_loss() -> None:
    torch.manual_seed(0)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(2.0)
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert clip_loss(image, text, scale, torch.eye(6, dtype=torch.bool)).item() == pytest.approx(expected.item())


def test_clip_loss_spreads_targets_over_matching_pairs() -> None:
    # Captions 0 and 1 both describe images 0 and 1. Image 0 placed midway between the two captions is
    # right under the true matches, while CLIP's one-to-one targets want it on caption 0 alone.
    text = torch.tensor([[1.0, 0.2, 0.0], [1.0, -0.2, 0.0], [0.0, 0.0, 1.0]])
    midway = torch.tensor([[1.0, 0.0, 0.0], [1.0, -0.2, 0.0], [0.0, 0.0, 1.0]])
    on_caption_0 = text.clone()
    matches = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    identity = torch.eye(3, dtype=torch.bool)
    scale = torch.tensor(4.0)
    assert clip_loss(midway, text, scale, matches) < clip_loss(on_caption_0, text, scale, matches)
    assert clip_loss(on_caption_0, text, scale, identity) < clip_loss(midway, text, scale, identity)


def test_logit_scale_is_clamped_at_100() -> None:
    image = torch.eye(2)
    loss_at_cap = clip_loss(image, image, torch.tensor(float(torch.log(torch.tensor(100.0)))), torch.eye(2).bool())
    loss_beyond = clip_loss(image, image, torch.tensor(10.0), torch.eye(2).bool())
    assert loss_beyond.item() == pytest.approx(loss_at_cap.item())


def test_learning_rate_warms_up_then_decays_to_min_lr() -> None:
    cfg = micro_config(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 55) < learning_rate(cfg, 20)
    assert learning_rate(cfg, 100) == pytest.approx(1e-5)


# ---------------------------------------------------------------------------------------------------- loop


def test_a_few_steps_reduce_the_loss_on_held_out_batches() -> None:
    cfg = micro_config(steps=25, warmup_steps=2, checkpoint_every=100)
    torch.manual_seed(cfg.seed)
    from promptclip.clip.model import CLIP

    initial = CLIP(cfg.arch_config())  # pretrain() starts from exactly these weights (same seed)
    result = pretrain(cfg, None, progress=False, log=None)
    held_out = range(1000, 1003)
    before = sum(batch_loss(initial, cfg, s) for s in held_out)
    after = sum(batch_loss(result.model, cfg, s) for s in held_out)
    assert after < before - 0.3, (before, after)
    assert len(result.history) == 25 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_resume_gives_the_state_of_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = micro_config(steps=4)
    straight = pretrain(cfg, tmp_path / "straight", progress=False, log=None)
    first = pretrain(cfg, tmp_path / "split", progress=False, log=None, stop_after=2)
    assert first.history[-1]["step"] == 2
    resumed = pretrain(cfg, tmp_path / "split", progress=False, log=None)
    assert resumed.steps_run == 2
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path) -> None:
    pretrain(micro_config(steps=2), tmp_path, progress=False, log=None)
    with pytest.raises(PretrainError, match=r"lr differ.*--no-resume"):
        pretrain(micro_config(steps=2, lr=1e-2), tmp_path, progress=False, log=None)
    # How often to check and save does not change the weights: such a run resumes (here: nothing left to do).
    again = pretrain(micro_config(steps=2, eval_every=5000, checkpoint_every=7), tmp_path, progress=False, log=None)
    assert again.steps_run == 0 and again.history[-1]["step"] == 2


def test_a_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainError, match=CHECKPOINT_FILE):
        pretrain(micro_config(steps=2), tmp_path, progress=False, log=None)


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(PretrainError, match="batch_size"):
        micro_config(batch_size=1).check()
    with pytest.raises(PretrainError, match="warmup_steps"):
        micro_config(steps=3, warmup_steps=3).check()


def test_only_tokens_seen_in_captions_count_as_trained() -> None:
    from promptclip.clip.tokenizer import tokenize
    from promptclip.pretraining import zero_untrained_tokens

    result = pretrain(micro_config(steps=2), None, progress=False, log=None)
    trained = result.trained_tokens
    assert trained is not None
    # Id 0 is the padding after the end of text: cut away before the text tower, so never trained.
    seen = {int(t) for t in caption_batch(micro_config(steps=2), 0).tokens.flatten()} - {0}
    assert all(trained[t] for t in seen)
    assert not trained[0]
    elephant = int(tokenize("elephant")[0, 1])  # a word of no caption
    assert not trained[elephant]
    kept = zero_untrained_tokens(result.model, trained)
    weight = result.model.token_embedding.weight
    assert kept == int(trained.sum()) and 0 < kept < 1000
    assert torch.count_nonzero(weight[elephant]) == 0
    assert torch.count_nonzero(weight[min(seen)]) > 0


def test_exported_fp16_weights_load_back(tmp_path: Path) -> None:
    from promptclip.clip.weights import load_clip

    result = pretrain(micro_config(steps=2), None, progress=False, log=None)
    path = tmp_path / "micro.safetensors"
    digest = export_weights(result.model, path)
    assert digest == sha256_file(path)
    loaded = load_clip(path)
    assert loaded.weights_sha256 == digest
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.half().float()), name


# ---------------------------------------------------------------------------------------------------- bundled


def recorded_sha256() -> str:
    match = re.search(r"sha256[^0-9a-f]*([0-9a-f]{64})", DOC.read_text(encoding="utf-8"))
    assert match, f"{DOC} records no sha256 of the bundled weights"
    return match.group(1)


def test_bundled_model_loads_offline_and_matches_its_record() -> None:
    from promptclip import load_clip

    clip = load_clip("tiny-synthetic")
    assert clip.config.name == "tiny-synthetic"
    assert clip.image_size == 64 and clip.vocab_size == 49408
    assert sha256_file(ASSET) == recorded_sha256()
    assert clip.weights_sha256 == recorded_sha256()
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in clip.parameters())
