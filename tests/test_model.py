"""The CLIP backbone: numeric parity with Hugging Face `CLIPModel`, ResNet towers, EOT truncation, prompt hooks."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from promptclip.clip.model import CLIP, ArchConfig, AttentionPool2d, VisionTransformer
from promptclip.clip.tokenizer import tokenize
from promptclip.clip.weights import Checkpoint, arch_config, build_clip, export_hf, hf_to_openai, load_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PARITY_TOLERANCE = 1e-5
TEXTS = [
    "a photo of a dog.",
    "x",
    "a blurry photo of a large red double-decker bus parked beside a very old stone bridge at dusk",
    "a photo of a golden retriever, a type of pet.",
]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def hf_clip_config(transformers, cfg: ArchConfig):
    """A Hugging Face CLIPConfig for a ViT architecture, written out field by field."""
    text = dict(
        hidden_size=cfg.text.width,
        intermediate_size=4 * cfg.text.width,
        num_hidden_layers=cfg.text.layers,
        num_attention_heads=cfg.text.heads,
        max_position_embeddings=cfg.text.context_length,
        vocab_size=cfg.text.vocab_size,
        hidden_act="quick_gelu",
        # transformers 5.x pools at the first position equal to eos_token_id, except for the legacy value 2
        # (then at the argmax of the ids); OpenAI pools at the argmax, i.e. the first end-of-text token 49407.
        eos_token_id=49407,
        bos_token_id=49406,
    )
    vision = dict(
        hidden_size=cfg.vision.width,
        intermediate_size=4 * cfg.vision.width,
        num_hidden_layers=cfg.vision.layers,
        num_attention_heads=cfg.vision.heads,
        image_size=cfg.vision.image_size,
        patch_size=cfg.vision.patch_size,
        hidden_act="quick_gelu",
    )
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)


def random_hf_clip(transformers, cfg: ArchConfig, seed: int = 0):
    """A random HF CLIPModel (eager attention: the textbook softmax) with non-zero biases and LayerNorm shifts,
    so a mis-mapped bias or norm cannot go unnoticed."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel._from_config(hf_clip_config(transformers, cfg), attn_implementation="eager")
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def pooled(output) -> torch.Tensor:
    # transformers 5.x returns an output object whose pooler_output holds the projected features.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def hf_features(hf_model, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        image = pooled(hf_model.get_image_features(pixel_values=pixels))
        text = pooled(hf_model.get_text_features(input_ids=tokens))
    return image, text


def our_features(model: CLIP, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokens)


def assert_parity(ours: tuple[torch.Tensor, ...], theirs: tuple[torch.Tensor, ...]) -> None:
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape
        assert reference.abs().mean() > 0.05, "features too small to make the comparison meaningful"
        assert (mine - reference).abs().max().item() <= PARITY_TOLERANCE


def tiny_arch(heads: int) -> ArchConfig:
    cfg = arch_config("tiny-vit")
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, heads=heads),
        text=dataclasses.replace(cfg.text, heads=heads),
    )


# --------------------------------------------------------------------------------------------------------
# Parity with transformers.CLIPModel
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [2, 4])
def test_hf_folder_matches_transformers_features(transformers, tmp_path: Path, heads: int) -> None:
    """heads=2 is tiny-vit itself; heads=4 is an unknown arch whose heads can come only from config.json."""
    hf_model = random_hf_clip(transformers, tiny_arch(heads))
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_clip(tmp_path / "hf")
    assert (model.config.vision.heads, model.config.text.heads) == (heads, heads)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = tokenize(TEXTS)
    assert_parity(our_features(model, pixels, tokens), hf_features(hf_model, pixels, tokens))


def test_vit_b16_sized_matches_transformers_features(transformers) -> None:
    hf_model = random_hf_clip(transformers, arch_config("ViT-B-16"))
    checkpoint = Checkpoint(hf_to_openai(hf_model.state_dict()), Path("in-memory"), sha256="", layout="hf")
    model = build_clip(checkpoint, arch_config("ViT-B-16")).eval()
    pixels = torch.randn(1, 3, 224, 224)
    tokens = tokenize(TEXTS[:3])
    assert_parity(our_features(model, pixels, tokens), hf_features(hf_model, pixels, tokens))


def test_exported_hf_folder_loads_in_transformers_with_same_features(tiny_clips, transformers, tmp_path: Path) -> None:
    model = tiny_clips.fresh("tiny-vit", seed=1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    export_hf(model, tmp_path / "export")
    hf_model, info = transformers.CLIPModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.randn(2, 3, 32, 32)
    tokens = tokenize(TEXTS)
    assert_parity(our_features(model, pixels, tokens), hf_features(hf_model.eval(), pixels, tokens))


# --------------------------------------------------------------------------------------------------------
# ResNet towers
# --------------------------------------------------------------------------------------------------------

# Shapes of OpenAI's published RN50 / RN101 state dicts.
OPENAI_RESNET_SHAPES = {
    "RN50": {
        "visual.conv1.weight": (32, 3, 3, 3),
        "visual.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "visual.layer3.5.conv2.weight": (256, 256, 3, 3),
        "visual.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "visual.attnpool.positional_embedding": (50, 2048),
        "visual.attnpool.c_proj.weight": (1024, 2048),
        "text_projection": (512, 1024),
    },
    "RN101": {
        "visual.layer3.22.bn3.running_var": (1024,),
        "visual.attnpool.positional_embedding": (50, 2048),
        "visual.attnpool.c_proj.weight": (512, 2048),
        "text_projection": (512, 512),
    },
}
PUBLISHED_PARAMS_MILLIONS = {"RN50": 102.01, "RN101": 119.69}


@pytest.mark.parametrize("name", ["RN50", "RN101"])
def test_resnet_towers_have_openai_shapes_and_run(name: str) -> None:
    torch.manual_seed(0)
    model = load_clip(name, weights="random")
    state = model.state_dict()
    for key, shape in OPENAI_RESNET_SHAPES[name].items():
        assert tuple(state[key].shape) == shape, key
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PUBLISHED_PARAMS_MILLIONS[name]
    inferred = ArchConfig.from_state_dict(state, name=name)
    assert inferred == arch_config(name)
    with torch.no_grad():
        features = model.encode_image(torch.randn(1, 3, 224, 224))
    assert features.shape == (1, model.config.embed_dim)
    assert torch.isfinite(features).all() and features.abs().sum() > 0


def attention_pool_by_hand(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """Attention pooling spelled out: the mean token queries [mean, positions], head by head, in float64."""
    pool = pool.double()
    tokens = x.double().flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pool.positional_embedding
    query = tokens[:, 0] @ pool.q_proj.weight.T + pool.q_proj.bias
    keys = tokens @ pool.k_proj.weight.T + pool.k_proj.bias
    values = tokens @ pool.v_proj.weight.T + pool.v_proj.bias
    head_dim = query.shape[-1] // pool.heads
    heads = []
    for head in range(pool.heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        scores = torch.einsum("bd,bnd->bn", query[:, part], keys[:, :, part]) / math.sqrt(head_dim)
        weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
        weights = weights / weights.sum(dim=1, keepdim=True)
        heads.append(torch.einsum("bn,bnd->bd", weights, values[:, :, part]))
    return torch.cat(heads, dim=-1) @ pool.c_proj.weight.T + pool.c_proj.bias


def test_attention_pool_matches_hand_computation() -> None:
    torch.manual_seed(0)
    pool = AttentionPool2d(spatial_dim=2, embed_dim=8, heads=2, output_dim=6)
    with torch.no_grad():
        for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            linear.bias.normal_()
    x = torch.randn(3, 8, 2, 2)
    with torch.no_grad():
        expected = attention_pool_by_hand(pool, x).float()
        got = pool.float()(x)
    assert got.shape == (3, 6)
    assert (got - expected).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------------------
# End-of-text truncation
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_model(tiny_clips) -> CLIP:
    """A tiny random CLIP with 3 blocks in each tower and non-trivial biases and norms."""
    cfg = arch_config("tiny-vit").to_dict()
    arch = {**cfg, "name": "tiny-test", "vision": {**cfg["vision"], "layers": 3}, "text": {**cfg["text"], "layers": 3}}
    model = tiny_clips.fresh(arch, seed=0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def sequence_lengths_entering(block: torch.nn.Module) -> list[int]:
    lengths: list[int] = []
    block.register_forward_pre_hook(lambda _module, args: lengths.append(args[0].shape[1]))
    return lengths


def test_eot_truncation_gives_full_length_features(small_model) -> None:
    model = small_model
    tokens = tokenize(TEXTS)
    lengths = sequence_lengths_entering(model.transformer.resblocks[0])
    with torch.no_grad():
        cut = model.encode_text(tokens, truncate=True)
        full = model.encode_text(tokens, truncate=False)
    assert lengths == [int(tokens.argmax(dim=-1).max()) + 1, 77]
    assert cut.abs().mean() > 0.05
    assert (cut - full).abs().max().item() <= PARITY_TOLERANCE


@pytest.mark.parametrize("context", [4, 12])
def test_eot_truncation_with_deep_prompts(small_model, context: int) -> None:
    """Prompts wider than the shortest texts (context 12 reaches past every end-of-text of short texts)."""
    model = small_model
    tokens = tokenize(["x", "a photo of a cat.", "a tiny red fox"])
    width = model.transformer.width
    words = model.token_embedding(tokens).detach()
    shallow = torch.randn(len(tokens), context, width)  # learned context after the start token, as in CoOp
    embeddings = torch.cat([words[:, :1], shallow, words[:, 1 : 77 - context]], dim=1)
    eot = tokens.argmax(dim=-1) + context
    deep = [None, torch.randn(context, width), torch.randn(len(tokens), context, width)]
    lengths = sequence_lengths_entering(model.transformer.resblocks[0])
    with torch.no_grad():
        cut = model.encode_text_embeddings(embeddings, eot, deep_prompts=deep, truncate=True)
        full = model.encode_text_embeddings(embeddings, eot, deep_prompts=deep, truncate=False)
    assert lengths[0] == max(int(eot.max()) + 1, 1 + context) < 77
    assert (cut - full).abs().max().item() <= PARITY_TOLERANCE


# --------------------------------------------------------------------------------------------------------
# Deep-prompt hooks
# --------------------------------------------------------------------------------------------------------


class LayerRecorder:
    """Inputs and outputs of every block of a transformer, captured by hooks."""

    def __init__(self, blocks: torch.nn.ModuleList) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        for block in blocks:
            block.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0].detach().clone()))
            block.register_forward_hook(lambda _m, _args, out: self.outputs.append(out.detach().clone()))


def expand(prompt: torch.Tensor, batch: int) -> torch.Tensor:
    return prompt.unsqueeze(0).expand(batch, -1, -1) if prompt.dim() == 2 else prompt


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_vision_deep_prompts_fill_slots_and_none_carries_on(small_model, per_sample: bool) -> None:
    model = small_model
    visual = model.visual
    assert isinstance(visual, VisionTransformer)
    batch, count, width = 2, 3, visual.width
    shallow = torch.randn(count, width)
    deep_shape = (batch, count, width) if per_sample else (count, width)
    prompt = torch.randn(deep_shape)
    deep = [None, prompt, None]
    recorder = LayerRecorder(visual.transformer.resblocks)
    pre_norm: list[torch.Tensor] = []
    visual.ln_pre.register_forward_hook(lambda _m, _a, out: pre_norm.append(out.detach()))
    with torch.no_grad():
        model.encode_image(torch.randn(batch, 3, 32, 32), shallow_prompts=shallow, deep_prompts=deep)
    slots = slice(-count, None)
    assert recorder.inputs[0].shape[1] == 1 + 16 + count
    torch.testing.assert_close(recorder.inputs[0], pre_norm[0], rtol=0, atol=0)
    torch.testing.assert_close(recorder.inputs[1][:, slots], expand(prompt, batch), rtol=0, atol=0)
    torch.testing.assert_close(recorder.inputs[1][:, :-count], recorder.outputs[0][:, :-count], rtol=0, atol=0)
    torch.testing.assert_close(recorder.inputs[2], recorder.outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_text_deep_prompts_fill_slots_and_none_carries_on(small_model, per_sample: bool) -> None:
    model = small_model
    tokens = tokenize(["a photo of a cat.", "a dog"])
    batch, count, start, width = len(tokens), 4, 1, model.transformer.width
    embeddings = model.token_embedding(tokens).detach()
    deep_shape = (batch, count, width) if per_sample else (count, width)
    first, last = torch.randn(deep_shape), torch.randn(deep_shape)
    deep = [first, None, last]
    recorder = LayerRecorder(model.transformer.resblocks)
    with torch.no_grad():
        model.encode_text_embeddings(embeddings, tokens.argmax(dim=-1), deep_prompts=deep, prompt_start=start)
    slots = slice(start, start + count)
    length = recorder.inputs[0].shape[1]
    before = embeddings[:, :length] + model.positional_embedding[:length]
    torch.testing.assert_close(recorder.inputs[0][:, slots], expand(first, batch), rtol=0, atol=0)
    torch.testing.assert_close(recorder.inputs[0][:, :start], before[:, :start], rtol=0, atol=0)
    torch.testing.assert_close(recorder.inputs[0][:, start + count :], before[:, start + count :], rtol=0, atol=0)
    torch.testing.assert_close(recorder.inputs[1], recorder.outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(recorder.inputs[2][:, slots], expand(last, batch), rtol=0, atol=0)
    torch.testing.assert_close(
        recorder.inputs[2][:, start + count :], recorder.outputs[1][:, start + count :], rtol=0, atol=0
    )


def test_deep_prompts_change_the_features(small_model) -> None:
    model = small_model
    tokens = tokenize(["a photo of a cat."])
    embeddings = model.token_embedding(tokens).detach()
    eot = tokens.argmax(dim=-1)
    with torch.no_grad():
        plain = model.encode_text_embeddings(embeddings, eot)
        prompted = model.encode_text_embeddings(embeddings, eot, deep_prompts=[None, torch.randn(2, 64)])
    assert (plain - prompted).abs().max() > 1e-3


def test_prompt_hook_errors(small_model, tiny_rn_clip) -> None:
    model = small_model
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="shallow_prompts"):
        model.encode_image(pixels, deep_prompts=[torch.randn(2, 64)])
    with pytest.raises(ValueError, match="3-layer"):
        model.encode_image(pixels, shallow_prompts=torch.randn(2, 64), deep_prompts=[None] * 4)
    tokens = tokenize(["a cat"])
    with pytest.raises(ValueError, match="3-layer"):
        model.encode_text_embeddings(model.token_embedding(tokens), tokens.argmax(-1), deep_prompts=[None] * 4)
    resnet = tiny_rn_clip
    with pytest.raises(ValueError, match="ViT"):
        resnet.encode_image(torch.randn(1, 3, 64, 64), shallow_prompts=torch.randn(2, 256))


def test_normalised_logits_use_logit_scale(small_model) -> None:
    model = small_model
    pixels, tokens = torch.randn(2, 3, 32, 32), tokenize(["a cat", "a dog", "a bird"])
    with torch.no_grad():
        per_image, per_text = model(pixels, tokens)
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(per_image, model.logit_scale.exp() * image @ text.T)
    torch.testing.assert_close(per_text, per_image.T)
