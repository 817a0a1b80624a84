"""MaPLe on a tiny random CLIP whose text (32) and vision (48) towers differ in width."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.func import functional_call

from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import get_tokenizer
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.methods.maple import MaPLe, MaPLeConfig, convert_official_state

NAMES = ["cat", "golden retriever", "red_sports_car"]
LAYERS = 4
DEPTH = 3


@pytest.fixture
def clip(tiny_clips) -> CLIP:
    """The two-width tiny CLIP (text 32, vision 48) with LAYERS blocks per tower, random weights of seed 0."""
    return tiny_clips.seeded(tiny_clips.two_width(LAYERS))


def make_learner(clip: CLIP, depth: int = DEPTH, **cfg: Any) -> MaPLe:
    learner = get_prompt_model(clip, {"method": "maple", "depth": depth, **cfg}, NAMES)
    assert isinstance(learner, MaPLe)
    return learner


def images(clip: CLIP, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(4))


def test_defaults_are_the_base_to_novel_recipe() -> None:
    cfg = MaPLeConfig()
    assert (cfg.n_ctx, cfg.depth, cfg.ctx_init) == (2, 9, "a photo of a")


def test_vision_prompt_at_every_depth_is_the_coupling_of_that_depths_text_prompt(clip) -> None:
    learner = make_learner(clip)
    with torch.no_grad():  # move every prompt off its initial value, as after training
        for param in learner.trainable_parameters().values():
            param.add_(0.1 * torch.randn_like(param))
    entering: list[torch.Tensor] = []
    handles = [
        block.register_forward_pre_hook(lambda _m, args: entering.append(args[0].detach()))
        for block in clip.visual.transformer.resblocks
    ]
    with torch.no_grad():
        learner.image_features(images(clip))
    for handle in handles:
        handle.remove()
    assert len(entering) == LAYERS
    text, couplings = learner.text, learner.couplings
    with torch.no_grad():
        # Layer 0: the coupled context is appended after the patch tokens and goes through ln_pre with them.
        expected = [clip.visual.ln_pre(couplings[0](text.ctx))]
        expected += [couplings[j](text.deep[str(j)]) for j in range(1, DEPTH)]
    for layer, prompt in enumerate(expected):
        slots = entering[layer][:, -learner.layout.n_ctx_text :]
        assert torch.allclose(slots, prompt.expand(2, -1, -1), atol=1e-5), f"layer {layer}"
    # Past the prompt depth the slots carry the previous layer's outputs, not a fresh coupling.
    beyond = entering[DEPTH][:, -2:]
    assert not torch.allclose(beyond, expected[-1].expand(2, -1, -1), atol=1e-3)
    assert entering[0].shape[1] == 1 + (32 // 8) ** 2 + 2


def test_text_prompts_enter_positions_after_the_start_token(clip) -> None:
    learner = make_learner(clip)
    entering: list[torch.Tensor] = []
    handles = [
        block.register_forward_pre_hook(lambda _m, args: entering.append(args[0].detach()))
        for block in clip.transformer.resblocks
    ]
    with torch.no_grad():
        learner.text_features()
    for handle in handles:
        handle.remove()
    for layer in range(1, DEPTH):
        expected = learner.text.deep[str(layer)].detach().expand(len(NAMES), -1, -1)
        assert torch.equal(entering[layer][:, 1:3], expected), f"layer {layer}"


def test_context_is_the_first_two_tokens_of_a_photo_of_a_and_of_a_stays_fixed(clip) -> None:
    learner = make_learner(clip)
    ids = get_tokenizer().encode("a photo of a")
    embedding = clip.token_embedding.weight
    assert torch.equal(learner.text.ctx.detach(), embedding[ids[:2]])  # "a", "photo"
    parts = learner.prompt_parts(learner.classnames)
    assert torch.equal(parts.suffix[:, :2], embedding[ids[2:]].expand(len(NAMES), -1, -1))  # "of", "a"
    cat_ids = get_tokenizer().encode("a photo of a cat.")
    assert int(parts.eot_index[0]) == len(cat_ids) + 1


def test_one_coupling_per_depth_with_backbone_widths(clip) -> None:
    learner = make_learner(clip)
    assert len(learner.couplings) == DEPTH
    for coupling in learner.couplings:
        assert tuple(coupling.weight.shape) == (48, 32)
    couplings = [f"couplings.{j}.{kind}" for j in range(DEPTH) for kind in ("weight", "bias")]
    assert sorted(learner.trainable_parameters()) == sorted(["text.ctx", "text.deep.1", "text.deep.2", *couplings])
    # The deep couplings start as copies of one layer (the reference clones one Linear); layer 0 differs.
    assert torch.equal(learner.couplings[1].weight, learner.couplings[2].weight)
    assert not torch.equal(learner.couplings[0].weight, learner.couplings[1].weight)


def test_gradients_reach_every_coupling_and_text_prompt(clip) -> None:
    learner = make_learner(clip)
    learner.train()
    data = {"image": images(clip), "label": torch.tensor([0, 2])}
    losses = learner.loss(data, learner(data))
    losses["ce"].backward()
    for name, param in learner.trainable_parameters().items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in clip.parameters())


def test_image_side_alone_sends_gradient_into_the_text_prompts(clip) -> None:
    """The coupling makes the vision prompts functions of the text prompts."""
    learner = make_learner(clip)
    learner.image_features(images(clip)).sum().backward()
    assert learner.text.ctx.grad is not None and learner.text.ctx.grad.abs().sum() > 0
    assert learner.text.deep["2"].grad is not None and learner.text.deep["2"].grad.abs().sum() > 0


def test_functional_call_with_substituted_prompts_and_couplings(clip) -> None:
    learner = make_learner(clip)
    generator = torch.Generator().manual_seed(8)
    substitutes = {
        name: p.detach() + 0.2 * torch.randn(p.shape, generator=generator)
        for name, p in learner.trainable_parameters().items()
    }
    data = {"image": images(clip), "label": torch.tensor([0, 1])}
    learner.train()
    substituted = functional_call(learner, substitutes, (data,)).logits
    reference = copy.deepcopy(learner)
    with torch.no_grad():
        for name, param in reference.trainable_parameters().items():
            param.copy_(substitutes[name])
    assert torch.allclose(substituted, reference(data).logits, atol=1e-5)
    assert not torch.allclose(substituted, learner(data).logits, atol=1e-4)


def test_round_trip_through_save_pretrained(clip, tmp_path: Any) -> None:
    learner = make_learner(clip)
    with torch.no_grad():
        learner.couplings[2].bias.add_(1.0)
    learner.save_pretrained(tmp_path)
    loaded = PromptModel.from_pretrained(clip, tmp_path, classnames=["tree"])
    assert isinstance(loaded, MaPLe) and loaded.classnames == ["tree"]
    assert torch.equal(loaded.couplings[2].bias, learner.couplings[2].bias)


@pytest.mark.parametrize(("cfg", "message"), [({"depth": 5}, "exceeds"), ({"n_ctx": 0}, "at least 1")])
def test_bad_configs_are_refused(clip, cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_learner(clip, **cfg)


def test_prompts_of_the_original_trainer_convert_to_ours(clip) -> None:
    learner = make_learner(clip)
    generator = torch.Generator().manual_seed(3)
    original: dict[str, torch.Tensor] = {
        "prompt_learner.ctx": torch.randn(2, 32, generator=generator).half(),
        "prompt_learner.proj.weight": torch.randn(48, 32, generator=generator).half(),
        "prompt_learner.proj.bias": torch.randn(48, generator=generator).half(),
        "prompt_learner.token_suffix": torch.zeros(3, 74, 32),
        "image_encoder.conv1.weight": torch.zeros(48, 3, 8, 8),
    }
    for i in range(DEPTH - 1):
        original[f"prompt_learner.compound_prompts_text.{i}"] = torch.randn(2, 32, generator=generator)
        original[f"prompt_learner.compound_prompt_projections.{i}.weight"] = torch.randn(48, 32, generator=generator)
        original[f"prompt_learner.compound_prompt_projections.{i}.bias"] = torch.randn(48, generator=generator)
    learner.load_trainable_state(convert_official_state(original))
    assert torch.equal(learner.text.ctx, original["prompt_learner.ctx"].float())
    assert torch.equal(learner.couplings[0].weight, original["prompt_learner.proj.weight"].float())
    assert torch.equal(learner.text.deep["2"], original["prompt_learner.compound_prompts_text.1"])
    assert torch.equal(learner.couplings[2].bias, original["prompt_learner.compound_prompt_projections.1.bias"])
