"""CoCoOp: the meta-net shift, batched per-image prompts, and what `text_features()` means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import promptclip.clip
from promptclip.clip.model import CLIP, ArchConfig
from promptclip.methods.cocoop import CoCoOp, CoCoOpConfig, meta_net_widths
from promptclip.methods.coop import CoOp, CoOpConfig

CLASSES = ["cat", "golden retriever", "red sports car", "tree"]
ARCHS = Path(promptclip.clip.__file__).parent / "archs"


def images(clip: CLIP, count: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, clip.image_size, clip.image_size, generator=generator)


def cocoop(clip: CLIP, **fields: Any) -> CoCoOp:
    torch.manual_seed(1)
    return CoCoOp(clip, CLASSES, CoCoOpConfig(**fields))


def test_meta_net_widths_follow_the_backbone() -> None:
    vit_b16 = ArchConfig.from_json(ARCHS / "ViT-B-16.json")
    assert meta_net_widths(vit_b16) == (512, 32, 512)  # the field's 512 -> 32 -> 512
    vit_l14 = ArchConfig.from_json(ARCHS / "ViT-L-14.json")
    assert meta_net_widths(vit_l14) == (768, 48, 768)
    tiny = ArchConfig.from_json(ARCHS / "tiny-vit.json")
    assert meta_net_widths(tiny) == (32, 2, 64)
    assert meta_net_widths(tiny, hidden=5) == (32, 5, 64)
    with pytest.raises(ValueError, match="meta_hidden"):
        meta_net_widths(tiny, hidden=0)


def test_defaults_are_the_official_recipe(tiny_clip: CLIP) -> None:
    learner = cocoop(tiny_clip)
    assert learner.ctx.shape == (4, 64)  # "a photo of a"
    assert learner.meta_net.linear1.weight.shape == (2, 32)
    assert learner.meta_net.linear2.weight.shape == (64, 2)
    assert learner.image_conditioned_text
    assert sorted(learner.trainable_parameters()) == [
        "ctx",
        "meta_net.linear1.bias",
        "meta_net.linear1.weight",
        "meta_net.linear2.bias",
        "meta_net.linear2.weight",
    ]


@pytest.mark.parametrize("chunk", [None, 1, 5, 8, 100])
@pytest.mark.parametrize("position", ["end", "middle"])
def test_batched_equals_one_image_at_a_time(tiny_clip: CLIP, chunk: int | None, position: str) -> None:
    learner = cocoop(tiny_clip, text_chunk_size=chunk, class_token_position=position)
    x = images(tiny_clip, 5)
    with torch.no_grad():
        batched = learner({"image": x})
        single = [learner({"image": x[i : i + 1]}) for i in range(len(x))]
    assert batched.logits.shape == (5, len(CLASSES))
    assert batched.text_features.shape == (5, len(CLASSES), 32)
    assert torch.allclose(batched.logits, torch.cat([s.logits for s in single]), atol=1e-5)
    assert torch.allclose(batched.text_features, torch.cat([s.text_features for s in single]), atol=1e-5)


def test_chunk_size_bounds_rows_per_text_pass(tiny_clip: CLIP) -> None:
    x = images(tiny_clip, 3)
    rows: list[int] = []
    handle = tiny_clip.transformer.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    passes = {}
    try:
        for chunk in (None, 8, 5, 2):
            learner = cocoop(tiny_clip, text_chunk_size=chunk)
            rows.clear()
            with torch.no_grad():
                learner({"image": x})
            passes[chunk] = list(rows)
    finally:
        handle.remove()
    assert passes[None] == [12]  # 3 images x 4 classes in one pass
    assert passes[8] == [8, 4]  # two images per pass
    assert passes[5] == [4, 4, 4]  # one image per pass
    assert passes[2] == [2, 2] * 3  # one image split in two


def test_context_shift_is_added_to_every_context_token(tiny_clip: CLIP) -> None:
    learner = cocoop(tiny_clip)
    x = images(tiny_clip, 2)
    with torch.no_grad():
        image = learner.image_features(x)
        shift = learner.context_shift(image)
        features = learner.conditional_text_features(image)
        for i in range(len(x)):
            plain = CoOp(tiny_clip, CLASSES, CoOpConfig(n_ctx=4))
            plain.ctx.copy_(learner.ctx + shift[i])
            assert torch.allclose(features[i], plain.text_features(), atol=1e-6)
    assert shift.abs().sum() > 0


def test_text_features_are_the_context_without_shift(tiny_clip: CLIP) -> None:
    learner = cocoop(tiny_clip)
    coop = CoOp(tiny_clip, CLASSES, CoOpConfig(ctx_init="a photo of a"))
    x = images(tiny_clip, 2)
    learner.eval()
    with torch.no_grad():
        assert torch.allclose(learner.text_features(), coop.text_features(), atol=1e-6)
        shifted = learner({"image": x}).text_features
        assert not torch.allclose(shifted[0], learner.text_features(), atol=1e-4)
        # A meta-net that outputs zero leaves exactly the image-independent prompts.
        learner.meta_net.linear2.weight.zero_()
        learner.meta_net.linear2.bias.zero_()
        unshifted = learner({"image": x}).text_features
    assert torch.allclose(unshifted, learner.text_features().expand(2, -1, -1), atol=1e-6)


def test_conditional_features_of_other_names(tiny_clip: CLIP) -> None:
    learner = cocoop(tiny_clip)
    with torch.no_grad():
        image = learner.image_features(images(tiny_clip, 2))
        other = learner.conditional_text_features(image, ["house", "blue whale"])
        learner.set_classnames(["house", "blue whale"])
        switched = learner.conditional_text_features(image)
    assert other.shape == (2, 2, 32)
    assert torch.allclose(other, switched, atol=1e-6)


def test_meta_net_and_context_get_gradient(tiny_clip: CLIP) -> None:
    learner = cocoop(tiny_clip)
    learner.train()
    batch = {"image": images(tiny_clip, 3), "label": torch.tensor([0, 2, 3])}
    losses = learner.loss(batch, learner(batch))
    assert set(losses) == {"ce"}
    losses["ce"].backward()
    for name in ("ctx", "meta_net.linear1.weight", "meta_net.linear2.weight", "meta_net.linear2.bias"):
        grad = learner.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_logits_use_the_frozen_scale(tiny_clip: CLIP) -> None:
    learner = cocoop(tiny_clip)
    with torch.no_grad():
        out = learner({"image": images(tiny_clip, 2)})
        expected = tiny_clip.logit_scale.exp() * (out.image_features.unsqueeze(1) * out.text_features).sum(-1)
    assert torch.allclose(out.logits, expected, atol=1e-5)
