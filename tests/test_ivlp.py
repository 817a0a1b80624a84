"""IVLP, VPT-deep and deep language prompting on a tiny random CLIP whose towers differ in width."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import get_tokenizer, tokenize
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.methods.ivlp import IVLP, DeepLanguagePrompting, VPTDeep, convert_official_state

NAMES = ["cat", "red_sports_car", "tree"]
LAYERS = 3


@pytest.fixture
def clip(tiny_clips) -> CLIP:
    """The two-width tiny CLIP (text 32, vision 48) with LAYERS blocks per tower, random weights of seed 0."""
    return tiny_clips.seeded(tiny_clips.two_width(LAYERS))


def batch(clip: CLIP, size: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randn(size, 3, clip.image_size, clip.image_size, generator=generator)
    return {"image": pixels, "label": torch.arange(size) % len(NAMES)}


def capture_layer_inputs(blocks: torch.nn.ModuleList) -> tuple[list[torch.Tensor], list[Any]]:
    """Record the tokens entering every block (forward pre-hooks)."""
    inputs: list[torch.Tensor] = []
    handles = [block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())) for block in blocks]
    return inputs, handles


def test_parameters_are_named_per_tower_and_depth(clip) -> None:
    learner = get_prompt_model(
        clip, {"method": "ivlp", "n_ctx_text": 2, "depth_text": 3, "n_ctx_vision": 5, "depth_vision": 2}, NAMES
    )
    shapes = {name: tuple(p.shape) for name, p in learner.trainable_parameters().items()}
    assert shapes == {
        "text.ctx": (2, 32),
        "text.deep.1": (2, 32),
        "text.deep.2": (2, 32),
        "vision.ctx": (5, 48),
        "vision.deep.1": (5, 48),
    }


def test_text_context_takes_the_first_tokens_of_ctx_init_and_keeps_the_rest_as_words(clip) -> None:
    learner = get_prompt_model(clip, {"method": "ivlp", "n_ctx_text": 2, "depth_text": 1, "depth_vision": 1}, NAMES)
    ids = get_tokenizer().encode("a photo of a")
    embedding = clip.token_embedding.weight
    assert torch.equal(learner.text.ctx.detach(), embedding[ids[:2]])
    parts = learner.prompt_parts(learner.classnames)
    # [SOS] c1 c2 "of" "a" <name> ...: the words after the first two tokens stay fixed in the suffix.
    assert torch.equal(parts.suffix[:, :2], embedding[ids[2:]].expand(len(NAMES), -1, -1))


def test_prompts_enter_every_prompted_layer_of_both_towers(clip) -> None:
    learner = get_prompt_model(
        clip, {"method": "ivlp", "n_ctx_text": 2, "depth_text": 2, "n_ctx_vision": 3, "depth_vision": 2}, NAMES
    )
    text_inputs, text_handles = capture_layer_inputs(clip.transformer.resblocks)
    vision_inputs, vision_handles = capture_layer_inputs(clip.visual.transformer.resblocks)
    with torch.no_grad():
        learner.text_features()
        learner.image_features(batch(clip)["image"])
    for handle in text_handles + vision_handles:
        handle.remove()
    text, vision = learner.text, learner.vision
    # Text: layer 0 reads the context plus its positional embedding; layer 1 the deep prompt itself.
    expected_0 = text.ctx + clip.positional_embedding[1:3]
    assert torch.allclose(text_inputs[0][:, 1:3], expected_0.expand(len(NAMES), -1, -1), atol=1e-6)
    assert torch.equal(text_inputs[1][:, 1:3], text.deep["1"].detach().expand(len(NAMES), -1, -1))
    assert not torch.allclose(text_inputs[2][:, 1:3], text.deep["1"].expand(len(NAMES), -1, -1))
    # Vision: the slots after the patch tokens; layer 0 after ln_pre, layer 1 the deep prompt.
    assert torch.allclose(vision_inputs[0][:, -3:], clip.visual.ln_pre(vision.ctx).expand(2, -1, -1), atol=1e-5)
    assert torch.equal(vision_inputs[1][:, -3:], vision.deep["1"].detach().expand(2, -1, -1))
    assert vision_inputs[0].shape[1] == 1 + (32 // 8) ** 2 + 3


def test_gradients_reach_every_prompt_and_nothing_frozen(clip) -> None:
    learner = get_prompt_model(clip, {"method": "ivlp", "depth_text": 3, "depth_vision": 3}, NAMES)
    learner.train()
    data = batch(clip)
    losses = learner.loss(data, learner(data))
    assert set(losses) == {"ce"}
    sum(losses.values()).backward()
    for name, param in learner.trainable_parameters().items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in clip.parameters())


def test_vpt_has_a_frozen_text_side_encoded_once_and_prompted_images(clip) -> None:
    learner = get_prompt_model(clip, {"method": "vpt", "n_ctx": 4, "depth": 3}, NAMES, template="{} texture.")
    assert isinstance(learner, VPTDeep)
    assert sorted(learner.trainable_parameters()) == ["vision.ctx", "vision.deep.1", "vision.deep.2"]
    learner.train()
    text = learner.text_features()
    assert not text.requires_grad
    assert learner.text_features() is text  # cached while training: nothing on the text side can change
    with torch.no_grad():
        tokens = tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
        frozen = F.normalize(clip.encode_text(tokens), dim=-1)
    assert torch.allclose(text, frozen, atol=1e-6)  # the reference's fixed "a photo of a {}." template
    images = batch(clip)["image"]
    with torch.no_grad():
        plain = F.normalize(clip.encode_image(images), dim=-1)
    assert not torch.allclose(learner.image_features(images), plain, atol=1e-4)
    dataset_template = get_prompt_model(
        clip, {"method": "vpt", "n_ctx": 4, "depth": 3, "text_template": ""}, NAMES, template="{} texture."
    )
    assert not torch.allclose(dataset_template.text_features(), text, atol=1e-4)


def test_deep_language_prompting_leaves_the_image_tower_frozen(clip) -> None:
    learner = get_prompt_model(clip, {"method": "deep_lang", "n_ctx": 4, "depth": 3}, NAMES)
    assert isinstance(learner, DeepLanguagePrompting) and not learner.has_visual_prompts
    assert sorted(learner.trainable_parameters()) == ["text.ctx", "text.deep.1", "text.deep.2"]
    images = batch(clip)["image"]
    with torch.no_grad():
        plain = F.normalize(clip.encode_image(images), dim=-1)
    assert torch.equal(learner.image_features(images), plain)


def test_encode_classnames_applies_the_learned_prompts_to_any_names(clip) -> None:
    learner = get_prompt_model(clip, {"method": "ivlp", "depth_text": 3, "depth_vision": 3}, NAMES)
    change = torch.randn(learner.text.deep["2"].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        learner.text.deep["2"].add_(change)  # a trained-looking deep prompt
        others = learner.encode_classnames(["house", "blue whale"])
        learner.set_classnames(["house", "blue_whale"])
        assert torch.allclose(learner.text_features(), others, atol=1e-6)
        learner.text.deep["2"].sub_(change)
        assert not torch.allclose(learner.encode_classnames(["house", "blue whale"]), others, atol=1e-4)


def test_sentences_get_the_deep_prompts_but_keep_their_own_first_layer(clip) -> None:
    learner = get_prompt_model(clip, {"method": "ivlp", "depth_text": 2, "depth_vision": 1}, NAMES)
    sentences = ["a clean origami sky.", "a clean origami road."]
    tokens = tokenize(sentences)
    inputs, handles = capture_layer_inputs(clip.transformer.resblocks)
    with torch.no_grad():
        features = learner.encode_sentences(sentences)
    for handle in handles:
        handle.remove()
    assert torch.allclose(inputs[0][:, 1:3], clip.token_embedding(tokens)[:, 1:3] + clip.positional_embedding[1:3])
    assert torch.equal(inputs[1][:, 1:3], learner.text.deep["1"].detach().expand(2, -1, -1))
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-6)


@pytest.mark.parametrize("method", ["ivlp", "vpt", "deep_lang"])
def test_functional_call_with_substituted_prompts_equals_setting_them(clip, method: str) -> None:
    cfg = {"ivlp": {"depth_text": 3, "depth_vision": 3}, "vpt": {"depth": 3}, "deep_lang": {"depth": 3}}[method]
    learner = get_prompt_model(clip, {"method": method, **cfg}, NAMES)
    generator = torch.Generator().manual_seed(3)
    substitutes = {
        name: p.detach() + 0.3 * torch.randn(p.shape, generator=generator)
        for name, p in learner.trainable_parameters().items()
    }
    data = batch(clip)
    learner.train()
    substituted = functional_call(learner, substitutes, (data,)).logits
    reference = copy.deepcopy(learner)
    with torch.no_grad():
        for name, param in reference.trainable_parameters().items():
            param.copy_(substitutes[name])
    assert torch.allclose(substituted, reference(data).logits, atol=1e-5)
    assert not torch.allclose(substituted, learner(data).logits, atol=1e-4)


def test_save_and_load_keeps_every_prompt(clip, tmp_path: Any) -> None:
    learner = get_prompt_model(clip, {"method": "ivlp", "depth_text": 3, "depth_vision": 2}, NAMES)
    with torch.no_grad():
        for param in learner.trainable_parameters().values():
            param.add_(torch.randn_like(param))
    learner.save_pretrained(tmp_path)
    loaded = PromptModel.from_pretrained(clip, tmp_path)
    assert isinstance(loaded, IVLP)
    for name, tensor in learner.trainable_state().items():
        assert torch.equal(loaded.trainable_state()[name], tensor), name


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"depth_text": 4}, "depth 4 exceeds the 3 layers"),
        ({"depth_vision": 5, "depth_text": 1}, "vision prompt depth 5"),
        ({"n_ctx_text": 0, "depth_text": 2, "depth_vision": 1}, "needs both"),
        ({"n_ctx_text": 6, "depth_text": 1, "depth_vision": 1}, "has 4 tokens"),
    ],
)
def test_bad_layouts_are_refused_with_the_fix(clip, cfg: dict[str, Any], message: str) -> None:
    full = {"method": "ivlp", "depth_text": 3, "depth_vision": 3, **cfg}
    with pytest.raises(ValueError, match=message):
        get_prompt_model(clip, full, NAMES)


def test_vision_prompts_on_a_resnet_are_refused(tiny_clips) -> None:
    resnet_tower = {"image_size": 64, "width": 16, "resnet_layers": [1, 1, 1, 1]}
    clip = tiny_clips.seeded({**tiny_clips.two_width(LAYERS), "vision": resnet_tower})
    with pytest.raises(ValueError, match="ViT"):
        get_prompt_model(clip, {"method": "vpt", "depth": 1}, NAMES)
    learner = get_prompt_model(clip, {"method": "deep_lang", "depth": 2}, NAMES)  # text-only works on a ResNet
    assert learner.text_features().shape == (len(NAMES), 24)


def test_prompts_of_the_original_trainers_convert_to_ours(clip) -> None:
    learner = get_prompt_model(clip, {"method": "ivlp", "n_ctx_text": 2, "depth_text": 3, "depth_vision": 2}, NAMES)
    generator = torch.Generator().manual_seed(2)
    ctx, text_deep, vpt, vision_deep = (torch.randn(2, w, generator=generator).half() for w in (32, 32, 48, 48))
    original = {  # what the original IVLP / PromptSRC trainers save (the whole model, fp16)
        "prompt_learner.ctx": ctx,
        "prompt_learner.token_prefix": torch.zeros(3, 1, 32),
        "prompt_learner.ZS_image_encoder.conv1.weight": torch.zeros(48, 3, 8, 8),
        "text_encoder.transformer.resblocks.1.VPT_shallow": text_deep,
        "text_encoder.transformer.resblocks.2.VPT_shallow": 2 * text_deep,
        "text_encoder.transformer.resblocks.1.attn.in_proj_weight": torch.zeros(96, 32),
        "image_encoder.VPT": vpt,
        "image_encoder.transformer.resblocks.1.VPT_shallow": vision_deep,
        "logit_scale": torch.tensor(4.6),
    }
    learner.load_trainable_state(convert_official_state(original), source="model.pth.tar-20")
    assert learner.text.ctx.dtype == torch.float32 and torch.equal(learner.text.ctx, ctx.float())
    assert torch.equal(learner.text.deep["2"], 2 * text_deep.float())
    assert torch.equal(learner.vision.ctx, vpt.float()) and torch.equal(learner.vision.deep["1"], vision_deep.float())
    deeper = {**original, "image_encoder.transformer.resblocks.2.VPT_shallow": vision_deep}
    with pytest.raises(ValueError, match="unexpected"):  # a checkpoint of another depth is refused by name
        learner.load_trainable_state(convert_official_state(deeper))
