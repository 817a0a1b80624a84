"""Hugging Face `CLIPModel` <-> OpenAI CLIP: the key maps, the config.json of an export, and the head counts
read from a Hugging Face config.json.

Hugging Face splits each attention input projection into q/k/v and stores the projections as `nn.Linear`
weights (transposed); everything else is a rename. Only ViT CLIPs exist on the Hugging Face side.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from promptclip.clip.errors import WeightsError, preview
from promptclip.clip.model import ACTIVATIONS, QUICK_GELU, ArchConfig

__all__ = ["apply_hf_config", "hf_config_dict", "hf_to_openai", "openai_to_hf"]

# --------------------------------------------------------------------------------------------------------
# Hugging Face <-> OpenAI key maps
# --------------------------------------------------------------------------------------------------------


# (HF tower prefix, OpenAI tower prefix)
_HF_TOWERS = (("text_model.", ""), ("vision_model.", "visual."))
# Renames inside a tower, outside the blocks (HF name -> OpenAI name, both after the tower prefix).
_HF_TOWER_RENAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "pre_layrnorm.weight": "ln_pre.weight",  # sic: HF spells it "layrnorm"
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# Renames inside one transformer block (prefix -> prefix).
_HF_BLOCK_RENAMES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
# Projections: HF stores nn.Linear weights [embed, width], OpenAI the matrix [width, embed].
_HF_PROJECTIONS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OPENAI_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_QKV = ("q", "k", "v")


def _rename_hf_block(rest: str) -> str | None:
    return next((new + rest[len(old) :] for old, new in _HF_BLOCK_RENAMES.items() if rest.startswith(old)), None)


def hf_to_openai(
    state: Mapping[str, torch.Tensor], source: str | os.PathLike[str] = "state dict"
) -> dict[str, torch.Tensor]:
    """Map a Hugging Face `CLIPModel` state dict to OpenAI's key layout (q/k/v concatenated, projections
    transposed). Keys it does not know raise, listing a few of them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # OpenAI in_proj key -> {"q": ..., "k": ..., "v": ...}
    unknown: list[str] = []
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "logit_scale":
            out[key] = tensor
        elif key in _HF_PROJECTIONS:
            out[_HF_PROJECTIONS[key]] = tensor.t().contiguous()
        elif not _map_hf_tower_key(key, tensor, out, qkv):
            unknown.append(key)
    for target, parts in qkv.items():
        if set(parts) != set(_QKV):
            unknown.append(f"{target} (missing {sorted(set(_QKV) - set(parts))} projections)")
            continue
        out[target] = torch.cat([parts[p] for p in _QKV], dim=0)
    if unknown:
        raise WeightsError(f"{source}: Hugging Face keys with no OpenAI counterpart: {preview(unknown)}")
    return out


def _map_hf_tower_key(
    key: str, tensor: torch.Tensor, out: dict[str, torch.Tensor], qkv: dict[str, dict[str, torch.Tensor]]
) -> bool:
    for hf_prefix, openai_prefix in _HF_TOWERS:
        if not key.startswith(hf_prefix):
            continue
        rest = key[len(hf_prefix) :]
        if rest in _HF_TOWER_RENAMES:
            out[openai_prefix + _HF_TOWER_RENAMES[rest]] = tensor
            return True
        block = _HF_BLOCK.fullmatch(rest)
        if block is None:
            return False
        index, inner = block.groups()
        base = f"{openai_prefix}transformer.resblocks.{index}."
        projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", inner)
        if projection is not None:
            letter, kind = projection.groups()
            qkv.setdefault(f"{base}attn.in_proj_{kind}", {})[letter] = tensor
            return True
        renamed = _rename_hf_block(inner)
        if renamed is None:
            return False
        out[base + renamed] = tensor
        return True
    return False


def openai_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an OpenAI-layout state dict of a ViT CLIP to Hugging Face `CLIPModel` keys (the inverse of
    `hf_to_openai`). Hugging Face has no ResNet CLIP, so a ResNet image tower raises."""
    if any(k.startswith(("visual.attnpool.", "visual.layer1.")) for k in state):
        raise WeightsError("Hugging Face CLIPModel has no ResNet image tower; only ViT CLIPs can be exported")
    tower_renames = {v: k for k, v in _HF_TOWER_RENAMES.items()}
    block_renames = {v: k for k, v in _HF_BLOCK_RENAMES.items()}
    projections = {v: k for k, v in _HF_PROJECTIONS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "logit_scale":
            out[key] = tensor
            continue
        if key in projections:
            out[projections[key]] = tensor.t().contiguous()
            continue
        hf_prefix, rest = (
            ("vision_model.", key[len("visual.") :]) if key.startswith("visual.") else ("text_model.", key)
        )
        if rest in tower_renames:
            out[hf_prefix + tower_renames[rest]] = tensor
            continue
        block = _OPENAI_BLOCK.fullmatch(rest)
        if block is None:
            raise WeightsError(f"no Hugging Face counterpart for key {key!r}")
        index, inner = block.groups()
        base = f"{hf_prefix}encoder.layers.{index}."
        if inner.startswith("attn.in_proj_"):
            kind = inner[len("attn.in_proj_") :]
            for letter, part in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                out[f"{base}self_attn.{letter}_proj.{kind}"] = part.contiguous()
            continue
        old = next((o for o in block_renames if inner.startswith(o)), None)
        if old is None:
            raise WeightsError(f"no Hugging Face counterpart for key {key!r}")
        out[base + block_renames[old] + inner[len(old) :]] = tensor
    return out


def hf_config_dict(cfg: ArchConfig) -> dict[str, object]:
    """A Hugging Face `CLIPConfig` (as config.json content) for a ViT architecture."""
    if not cfg.vision.is_vit:
        raise WeightsError(f"{cfg.name}: Hugging Face CLIPModel has no ResNet image tower")
    common = {"hidden_act": cfg.activation, "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim}
    text = cfg.text
    vision = cfg.vision
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "text_config": {
            **common,
            "model_type": "clip_text_model",
            "hidden_size": text.width,
            "intermediate_size": 4 * text.width,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "vocab_size": text.vocab_size,
            "bos_token_id": 49406,
            "eos_token_id": 49407,  # pool at the first end-of-text token, as OpenAI's argmax does
        },
        "vision_config": {
            **common,
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": 4 * vision.width,
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
        },
    }


# --------------------------------------------------------------------------------------------------------
# Hugging Face config.json
# --------------------------------------------------------------------------------------------------------


def _hf_sub_config(config: Mapping[str, object], tower: str) -> Mapping[str, object]:
    # Old configs spell the sub-configs `text_config_dict`/`vision_config_dict`.
    sub = config.get(f"{tower}_config") or config.get(f"{tower}_config_dict") or {}
    return sub if isinstance(sub, Mapping) else {}


def apply_hf_config(inferred: ArchConfig, config: Mapping[str, object], path: Path) -> ArchConfig:
    """The inferred shapes with the head counts of config.json (HF's defaults where a field is omitted)."""
    if config.get("model_type", "clip") != "clip":
        raise WeightsError(f"{path}: model_type {config.get('model_type')!r} is not 'clip'")
    text, vision = _hf_sub_config(config, "text"), _hf_sub_config(config, "vision")
    for tower, sub in (("text_config", text), ("vision_config", vision)):
        act = sub.get("hidden_act", QUICK_GELU)
        if act not in ACTIVATIONS:
            raise WeightsError(
                f"{path}: {tower}.hidden_act is {act!r}; this backbone implements {' and '.join(ACTIVATIONS)} "
                "only, so the features would be wrong"
            )
        eps = float(sub.get("layer_norm_eps", 1e-5))  # type: ignore[arg-type]
        if abs(eps - 1e-5) > 1e-12:
            raise WeightsError(f"{path}: {tower}.layer_norm_eps is {eps}; this backbone uses 1e-5")
    activations = {str(sub.get("hidden_act", QUICK_GELU)) for sub in (text, vision)}
    if len(activations) > 1:
        raise WeightsError(
            f"{path}: text_config.hidden_act and vision_config.hidden_act differ ({', '.join(sorted(activations))}); "
            "this backbone uses one activation in both towers"
        )
    return dataclasses.replace(
        inferred,
        activation=activations.pop(),
        text=dataclasses.replace(inferred.text, heads=int(text.get("num_attention_heads", 8))),  # type: ignore[call-overload]
        vision=dataclasses.replace(inferred.vision, heads=int(vision.get("num_attention_heads", 12))),  # type: ignore[call-overload]
    )
