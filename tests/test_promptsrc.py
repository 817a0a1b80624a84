"""PromptSRC: the self-regulating losses, the frozen targets and Gaussian prompt aggregation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from promptclip.clip.model import CLIP, VisionTransformer
from promptclip.clip.tokenizer import tokenize
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.methods.promptsrc import PromptSRC, PromptSRCConfig, gaussian_weights
from promptclip.methods.templates import IMAGENET_TEMPLATES

NAMES = ["cat", "golden retriever", "tree"]


@pytest.fixture
def clip(tiny_clips) -> CLIP:
    """The two-width tiny CLIP (text 32, vision 48, 2 blocks per tower), random weights of seed 0."""
    return tiny_clips.seeded(tiny_clips.two_width())


def make_learner(clip: CLIP, **cfg: Any) -> PromptSRC:
    learner = get_prompt_model(clip, {"method": "promptsrc", "depth_text": 2, "depth_vision": 2, **cfg}, NAMES)
    assert isinstance(learner, PromptSRC)
    return learner


def make_batch(clip: CLIP) -> dict[str, torch.Tensor]:
    pixels = torch.randn(3, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(6))
    return {"image": pixels, "label": torch.tensor([0, 1, 2])}


def randomise(learner: PromptModel, seed: int) -> dict[str, torch.Tensor]:
    """Give every trainable tensor new values (an epoch of training) and return a copy of them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in learner.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator))
    return {name: p.detach().clone() for name, p in learner.trainable_parameters().items()}


def test_defaults_are_the_base_to_novel_recipe() -> None:
    cfg = PromptSRCConfig()
    assert (cfg.n_ctx_text, cfg.n_ctx_vision, cfg.depth_text, cfg.depth_vision) == (4, 4, 9, 9)
    assert (cfg.text_loss_weight, cfg.image_loss_weight, cfg.logits_loss_weight) == (25.0, 10.0, 1.0)
    assert (cfg.gpa, cfg.gpa_mean, cfg.gpa_std, cfg.ctx_init) == (True, 15.0, 1.0, "a photo of a")
    assert len(IMAGENET_TEMPLATES) == 60 and len(set(IMAGENET_TEMPLATES)) == 60


@pytest.mark.parametrize(("epochs", "mean", "std"), [(20, 15, 1), (20, 6, 10), (50, 30, 30), (50, 45, 5), (5, 300, 1)])
def test_aggregation_weights_are_the_normalised_gaussian(epochs: int, mean: float, std: float) -> None:
    weights = gaussian_weights(epochs, mean, std)
    assert weights.shape == (epochs,)
    assert math.isclose(float(weights.sum()), 1.0, abs_tol=1e-12)
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    if sum(density) > 0:  # far in the tails the density underflows; the weights stay well defined
        expected = torch.tensor(density, dtype=torch.float64) / sum(density)
        assert torch.allclose(weights, expected, rtol=1e-9, atol=1e-15)
    else:
        assert int(weights.argmax()) == epochs - 1
    if 1 <= mean <= epochs:
        assert int(weights.argmax()) == round(mean) - 1


def test_aggregate_is_the_weighted_mean_of_the_epoch_snapshots(clip) -> None:
    epochs = 6
    learner = make_learner(clip, gpa_mean=3.0, gpa_std=2.0)
    snapshots = []
    for epoch in range(epochs):
        snapshots.append(randomise(learner, seed=epoch))
        learner.on_epoch_end(epoch, epochs)
        if epoch < epochs - 1:  # between epochs the prompts are left as trained
            for name, param in learner.trainable_parameters().items():
                assert torch.equal(param, snapshots[-1][name])
    weights = gaussian_weights(epochs, 3.0, 2.0)
    for name, param in learner.trainable_parameters().items():
        expected = sum(float(weights[e]) * snapshots[e][name] for e in range(epochs))
        assert torch.allclose(param, expected, atol=1e-6), name
        assert not torch.allclose(param, snapshots[-1][name], atol=1e-3)


def test_a_resumed_run_aggregates_like_an_uninterrupted_one(clip) -> None:
    epochs, interrupt = 5, 2
    straight = make_learner(clip, gpa_mean=2.0, gpa_std=1.5)
    for epoch in range(epochs):
        randomise(straight, seed=10 + epoch)
        straight.on_epoch_end(epoch, epochs)

    first = make_learner(clip, gpa_mean=2.0, gpa_std=1.5)
    for epoch in range(interrupt):
        randomise(first, seed=10 + epoch)
        first.on_epoch_end(epoch, epochs)
    saved_prompts, saved_training = first.trainable_state(), first.training_state()
    assert not any(key.startswith("gpa") for key in saved_prompts)  # the running sum stays out of prompts

    resumed = make_learner(clip, gpa_mean=2.0, gpa_std=1.5)
    resumed.load_trainable_state(saved_prompts)
    with pytest.raises(RuntimeError, match="load_training_state"):
        resumed.on_epoch_end(interrupt, epochs)  # without the running sum it refuses to aggregate wrongly
    resumed.load_training_state(saved_training)
    for epoch in range(interrupt, epochs):
        randomise(resumed, seed=10 + epoch)
        resumed.on_epoch_end(epoch, epochs)
    for name, param in straight.trainable_parameters().items():
        assert torch.allclose(resumed.trainable_parameters()[name], param, atol=1e-7), name


def test_without_gpa_the_last_epoch_is_kept(clip) -> None:
    learner = make_learner(clip, gpa=False)
    last = randomise(learner, seed=1)
    learner.on_epoch_end(0, 1)
    assert all(torch.equal(p, last[n]) for n, p in learner.trainable_parameters().items())
    assert learner.training_state() == {}


def test_loss_terms_match_their_definitions(clip) -> None:
    learner = make_learner(clip)
    randomise(learner, seed=3)
    data = make_batch(clip)
    learner.train()
    output = learner(data)
    losses = learner.loss(data, output)
    assert set(losses) == {"ce", "scl_text", "scl_image", "scl_logits"}

    with torch.no_grad():
        # The textual diversity target: raw features averaged over the 60 templates, then normalised.
        raw = torch.stack([clip.encode_text(tokenize([t.format(n) for n in NAMES])) for t in IMAGENET_TEMPLATES])
        ensemble = F.normalize(raw.mean(dim=0), dim=-1)
        frozen_image = F.normalize(clip.encode_image(data["image"]), dim=-1)
        scale = clip.logit_scale.exp()
        p_frozen = (scale * frozen_image @ ensemble.t()).softmax(dim=-1)
        p_prompted = output.logits.softmax(dim=-1)
        kl = (p_frozen * (p_frozen.log() - p_prompted.log())).sum() / output.logits.numel()
    assert torch.allclose(losses["ce"], F.cross_entropy(output.logits, data["label"]))
    assert torch.allclose(losses["scl_text"], 25 * (output.text_features - ensemble).abs().mean(), atol=1e-6)
    assert torch.allclose(losses["scl_image"], 10 * (output.image_features - frozen_image).abs().mean(), atol=1e-6)
    assert torch.allclose(losses["scl_logits"], kl, atol=1e-6)
    # Normalising each template before averaging (the zero-shot ensembling) would be another target.
    other = F.normalize(F.normalize(raw, dim=-1).mean(dim=0), dim=-1)
    assert not torch.allclose(other, ensemble, atol=1e-4)


def test_frozen_text_ensemble_is_encoded_once_per_class_set(clip) -> None:
    learner = make_learner(clip)
    calls = {"count": 0}

    def count(*_args: Any) -> None:
        calls["count"] += 1

    handle = clip.transformer.register_forward_hook(count)
    data = make_batch(clip)
    learner.train()
    learner.loss(data, learner(data))
    first = calls["count"]
    assert first == 1 + len(IMAGENET_TEMPLATES)  # the prompted classes, then the 60 frozen templates
    learner.loss(data, learner(data))
    assert calls["count"] == first + 1  # only the prompted text is encoded again
    learner.set_classnames(["house", "whale"])
    learner.frozen_text_features()
    assert calls["count"] == first + 1 + len(IMAGENET_TEMPLATES)
    handle.remove()


def test_frozen_image_features_come_from_the_one_clip_without_prompts(clip) -> None:
    learner = make_learner(clip)
    towers = [m for m in learner.modules() if isinstance(m, VisionTransformer)]
    assert towers == [clip.visual]  # no second copy of the image tower
    images = make_batch(clip)["image"]
    with torch.no_grad():
        plain = F.normalize(clip.encode_image(images), dim=-1)
    assert torch.equal(learner.frozen_image_features(images), plain)
    assert not torch.allclose(learner.image_features(images), plain, atol=1e-4)


def test_regulariser_terms_do_not_reach_the_backbone(clip) -> None:
    learner = make_learner(clip)
    data = make_batch(clip)
    learner.train()
    losses = learner.loss(data, learner(data))
    (losses["scl_text"] + losses["scl_image"] + losses["scl_logits"]).backward()
    for name, param in learner.trainable_parameters().items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert learner.text.ctx.grad.abs().sum() > 0 and learner.vision.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_zero_weights_drop_their_terms(clip) -> None:
    learner = make_learner(clip, text_loss_weight=0.0, logits_loss_weight=0.0)
    data = make_batch(clip)
    assert set(learner.loss(data, learner(data))) == {"ce", "scl_image"}


def test_bad_gpa_std_is_refused_at_construction(clip) -> None:
    with pytest.raises(ValueError, match="gpa_std"):
        make_learner(clip, gpa_std=0.0)
