"""KgCoOp: the knowledge-guidance term against the frozen template features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import tokenize
from promptclip.methods.kgcoop import KgCoOp, KgCoOpConfig
from promptclip.methods.prompting import assemble_prompts, encode_templates

CLASSES = ["cat", "golden retriever", "red sports car", "tree"]
PET_TEMPLATE = "a photo of a {}, a type of pet."


def batch(clip: CLIP) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(3, 3, clip.image_size, clip.image_size, generator=generator),
        "label": torch.tensor([0, 1, 3]),
    }


def losses_of(learner: KgCoOp, clip: CLIP) -> dict[str, torch.Tensor]:
    learner.train()
    data = batch(clip)
    return learner.loss(data, learner(data))


def test_defaults_follow_the_field(tiny_clip: CLIP) -> None:
    cfg = KgCoOpConfig()
    assert cfg.ctx_init == "a photo of a" and cfg.weight == 8.0
    learner = KgCoOp(tiny_clip, CLASSES, cfg)
    assert learner.ctx.shape == (4, 64)


def test_prompt_equals_the_template_when_context_is_its_words(tiny_clip: CLIP) -> None:
    learner = KgCoOp(tiny_clip, CLASSES, KgCoOpConfig(), template="a photo of a {}.")
    parts = learner.prompt_parts(CLASSES)
    prompts = assemble_prompts(parts, learner.ctx.detach())
    tokens = tokenize([f"a photo of a {name}." for name in CLASSES])
    assert torch.equal(prompts, tiny_clip.token_embedding(tokens))
    assert torch.equal(parts.eot_index, tokens.argmax(dim=-1))


def test_knowledge_term_is_zero_at_init_and_grows_as_the_context_moves(tiny_clip: CLIP) -> None:
    learner = KgCoOp(tiny_clip, CLASSES, KgCoOpConfig(), template="a photo of a {}.")
    at_init = losses_of(learner, tiny_clip)["kg"]
    assert abs(at_init.item()) < 1e-6
    direction = torch.randn_like(learner.ctx)
    values = []
    for _ in range(2):
        with torch.no_grad():
            learner.ctx.add_(0.05 * direction)
        values.append(losses_of(learner, tiny_clip)["kg"].item())
    assert 1e-5 < values[0] < values[1]


def test_knowledge_term_matches_a_hand_computation(tiny_clip: CLIP) -> None:
    learner = KgCoOp(tiny_clip, CLASSES, KgCoOpConfig(weight=2.5), template=PET_TEMPLATE)
    with torch.no_grad():
        learner.ctx.add_(0.1 * torch.randn_like(learner.ctx))
    losses = losses_of(learner, tiny_clip)
    with torch.no_grad():
        learned = F.normalize(learner.compute_text_features(), dim=-1)
        frozen = F.normalize(tiny_clip.encode_text(tokenize([PET_TEMPLATE.format(n) for n in CLASSES])), dim=-1)
        expected = 2.5 * (1 - (learned * frozen).sum(-1).mean())
    assert torch.allclose(losses["kg"], expected, atol=1e-6)
    assert losses["kg"].item() > 0
    data = batch(tiny_clip)
    assert torch.allclose(losses["ce"], F.cross_entropy(learner(data).logits, data["label"]), atol=1e-6)


def test_knowledge_term_alone_moves_the_context(tiny_clip: CLIP) -> None:
    learner = KgCoOp(tiny_clip, CLASSES, KgCoOpConfig(), template=PET_TEMPLATE)
    losses_of(learner, tiny_clip)["kg"].backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0


def test_targets_are_encoded_once_per_class_set(tiny_clip: CLIP) -> None:
    learner = KgCoOp(tiny_clip, CLASSES, KgCoOpConfig(), template=PET_TEMPLATE)
    data = batch(tiny_clip)
    learner.train()
    output = learner(data)  # the prompts: one text pass
    calls: list[int] = []
    handle = tiny_clip.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        learner.loss(data, output)
        learner.loss(data, output)
        assert len(calls) == 1, "the frozen template features were encoded more than once"
        learner.set_classnames(["house", "blue whale"])
        targets = learner.clip_text_features()
        assert len(calls) == 2
    finally:
        handle.remove()
    assert targets.shape == (2, 32)
    assert torch.allclose(targets, encode_templates(tiny_clip, ["house", "blue whale"], PET_TEMPLATE), atol=1e-6)


def test_target_template_overrides_the_dataset_template(tiny_clip: CLIP) -> None:
    texture = "a photo of a {}, a type of texture."
    learner = KgCoOp(tiny_clip, CLASSES, KgCoOpConfig(target_template=texture), template="{} texture.")
    assert torch.allclose(learner.clip_text_features(), encode_templates(tiny_clip, CLASSES, texture), atol=1e-6)
    plain = KgCoOp(tiny_clip, CLASSES, KgCoOpConfig(), template="{} texture.")
    targets = plain.clip_text_features()
    assert torch.allclose(targets, encode_templates(tiny_clip, CLASSES, "{} texture."), atol=1e-6)
    plain.template = PET_TEMPLATE  # a changed template is never answered from the cache
    assert torch.allclose(plain.clip_text_features(), encode_templates(tiny_clip, CLASSES, PET_TEMPLATE), atol=1e-6)
