"""The frozen CLIP backbone: ViT and ModifiedResNet image towers, the causal text tower, and prompt hooks.

Parameter names follow OpenAI's CLIP (`visual.transformer.resblocks.N.attn.in_proj_weight`, ...), so OpenAI
archives, open_clip checkpoints and (after a key map) Hugging Face checkpoints load into one layout.

Prompt hooks are the only extension points and know nothing of any method:

* `encode_image(pixels, shallow_prompts, deep_prompts)`: shallow prompts are appended after the patch tokens
  (after the positional embedding, before `ln_pre`) and create prompt slots; `deep_prompts[j]`, when not
  `None`, replaces the slots entering layer j.
* `encode_text_embeddings(embeddings, eot_index, deep_prompts, prompt_start)`: the caller assembles token
  embeddings (with any shallow prompt already inside); `deep_prompts[j]` replaces the tokens at
  `prompt_start : prompt_start + n` entering layer j.

Text sequences are cut after the longest end-of-text position of the batch: under the causal mask no token
before it can see the padding, so the features are identical and the tower runs several times faster.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DeepPrompts = Sequence[torch.Tensor | None]


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. `patch_size` set: a ViT with `layers` blocks; `patch_size` None: a ModifiedResNet whose
    `resnet_layers` gives the bottleneck count of each stage."""

    image_size: int
    width: int
    layers: int = 0
    heads: int = 0
    patch_size: int | None = None
    resnet_layers: tuple[int, int, int, int] | None = None

    @property
    def is_vit(self) -> bool:
        return self.patch_size is not None


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12


#: The MLP activations of the transformer blocks: OpenAI's sigmoid approximation (every OpenAI model, and the
#: open_clip models named `*-quickgelu`) and the exact GELU (open_clip's plain names: LAION-2B, DataComp, ...).
QUICK_GELU, GELU = "quick_gelu", "gelu"
ACTIVATIONS = (QUICK_GELU, GELU)


@dataclass(frozen=True)
class ArchConfig:
    name: str
    embed_dim: int
    vision: VisionConfig
    text: TextConfig = field(default_factory=TextConfig)
    activation: str = QUICK_GELU
    """MLP activation of every transformer block (`quick_gelu` or `gelu`). A state dict cannot show it: it comes
    from the architecture's name, the file's own statement (an OpenAI archive, a Hugging Face config.json,
    promptclip metadata), or is assumed with a warning (see `clip.weights.load_clip`)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchConfig:
        vision = dict(data["vision"])
        if vision.get("resnet_layers") is not None:
            vision["resnet_layers"] = tuple(vision["resnet_layers"])
        vision.setdefault("heads", _default_vision_heads(vision))
        text = dict(data.get("text", {}))
        if "width" in text:
            text.setdefault("heads", text["width"] // 64)
        return cls(
            name=str(data["name"]),
            embed_dim=int(data["embed_dim"]),
            vision=VisionConfig(**vision),
            text=TextConfig(**text),
            activation=str(data.get("activation", QUICK_GELU)),  # files written before the field: OpenAI's
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ArchConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a valid architecture config ({err})") from err

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], name: str = "inferred") -> ArchConfig:
        """Infer the architecture from the tensor shapes of an OpenAI-layout state dict."""
        return _infer_arch(state_dict, name)


def _default_vision_heads(vision: Mapping[str, Any]) -> int:
    # OpenAI's convention: 64-wide heads in the ViT; the ResNet's attention pool works on width*32 channels.
    if vision.get("patch_size") is not None:
        return int(vision["width"]) // 64
    return int(vision["width"]) * 32 // 64


# --------------------------------------------------------------------------------------------------------
# Transformer pieces
# --------------------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation_module(name: str) -> nn.Module:
    """The MLP activation called `name` (see `ACTIVATIONS`); GELU is the exact (erf) one, as open_clip's."""
    if name == QUICK_GELU:
        return QuickGELU()
    if name == GELU:
        return nn.GELU()
    raise ValueError(f"activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")


def matmul_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A weight about to meet activations `x` in a matmul or convolution. Under autocast it goes as stored
    (autocast casts it if it must; one stored in the compute dtype by `CLIP.store_matmul_weights` is used as it
    is); outside autocast it takes `x`'s dtype, so a weight stored in bf16 is widened, exactly."""
    if weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return weight
    return weight.to(x.dtype)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters) whose weights may be stored in another dtype than the activations'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else matmul_weight(self.bias, x)
        return F.linear(x, matmul_weight(self.weight, x), bias)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, returned in the input dtype (as OpenAI's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with `nn.MultiheadAttention`'s parameter names, computed by fused SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, matmul_weight(self.in_proj_weight, x), matmul_weight(self.in_proj_bias, x))
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, activation: str = QUICK_GELU) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        layers = [
            ("c_fc", Linear(width, width * 4)),
            ("gelu", activation_module(activation)),
            ("c_proj", Linear(width * 4, width)),
        ]
        self.mlp = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


def replace_prompt_slots(tokens: torch.Tensor, start: int, prompts: torch.Tensor) -> torch.Tensor:
    """Return `tokens` [B, L, W] with positions `start : start + n` replaced by `prompts` ([n, W] shared by
    the batch, or [B, n, W])."""
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    count = prompts.shape[1]
    if start < 0 or start + count > tokens.shape[1]:
        raise ValueError(f"prompt slots {start}:{start + count} do not fit a sequence of {tokens.shape[1]} tokens")
    return torch.cat([tokens[:, :start], prompts.to(tokens.dtype), tokens[:, start + count :]], dim=1)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: str = QUICK_GELU) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, activation) for _ in range(layers)])

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        deep_prompts: DeepPrompts | None = None,
        slot_start: int = 0,
    ) -> torch.Tensor:
        if deep_prompts is not None and len(deep_prompts) > self.layers:
            raise ValueError(f"{len(deep_prompts)} deep prompts given for a {self.layers}-layer transformer")
        for index, block in enumerate(self.resblocks):
            prompt = deep_prompts[index] if deep_prompts is not None and index < len(deep_prompts) else None
            if prompt is not None:
                x = replace_prompt_slots(x, slot_start, prompt)
            x = block(x, causal)
        return x


# --------------------------------------------------------------------------------------------------------
# Image towers
# --------------------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, activation: str = QUICK_GELU) -> None:
        super().__init__()
        assert cfg.patch_size is not None
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.width = cfg.width
        scale = cfg.width**-0.5
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, activation)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, output_dim))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token and positional embedding: [B, 1 + grid^2, width]."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"image tower expects {self.image_size}x{self.image_size} pixels, got "
                f"{tuple(pixels.shape[-2:])}; resize with promptclip.clip.transforms.EvalTransform"
            )
        pixels = pixels.to(self.class_embedding.dtype)  # the tower's own dtype (never stored lower)
        x = F.conv2d(pixels, matmul_weight(self.conv1.weight, pixels), stride=self.conv1.stride)
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)

    def forward(
        self,
        pixels: torch.Tensor,
        shallow_prompts: torch.Tensor | None = None,
        deep_prompts: DeepPrompts | None = None,
    ) -> torch.Tensor:
        x = self.embed(pixels)
        slot_count = 0
        if shallow_prompts is not None:
            prompts = shallow_prompts
            if prompts.dim() == 2:
                prompts = prompts.unsqueeze(0).expand(x.shape[0], -1, -1)
            slot_count = prompts.shape[1]
            x = torch.cat([x, prompts.to(x.dtype)], dim=1)
        elif deep_prompts is not None and any(p is not None for p in deep_prompts):
            raise ValueError("deep vision prompts replace prompt slots: pass shallow_prompts to create them")
        x = self.ln_pre(x)
        x = self.transformer(x, deep_prompts=deep_prompts, slot_start=x.shape[1] - slot_count)
        pooled = self.ln_post(x[:, 0])
        return pooled @ matmul_weight(self.proj, pooled)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # All convolutions have stride 1; an average pool does the down-sampling (anti-aliased ResNet-D).
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean token (query) over the mean token and every spatial position."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim * spatial_dim + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = Linear(embed_dim, embed_dim)
        self.q_proj = Linear(embed_dim, embed_dim)
        self.v_proj = Linear(embed_dim, embed_dim)
        self.c_proj = Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        batch, _, width = tokens.shape
        head_dim = width // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, head_dim).transpose(1, 2)

        query = split(self.q_proj(tokens[:, :1]))
        out = F.scaled_dot_product_attention(query, split(self.k_proj(tokens)), split(self.v_proj(tokens)))
        return self.c_proj(out.transpose(1, 2).reshape(batch, width))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: a 3-convolution stem, anti-aliased strided stages and an attention-pooling head."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        assert cfg.resnet_layers is not None
        width = cfg.width
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_stage(width, cfg.resnet_layers[0])
        self.layer2 = self._make_stage(width * 2, cfg.resnet_layers[1], stride=2)
        self.layer3 = self._make_stage(width * 4, cfg.resnet_layers[2], stride=2)
        self.layer4 = self._make_stage(width * 8, cfg.resnet_layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, output_dim)

    def _make_stage(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(
        self,
        pixels: torch.Tensor,
        shallow_prompts: torch.Tensor | None = None,
        deep_prompts: DeepPrompts | None = None,
    ) -> torch.Tensor:
        if shallow_prompts is not None or deep_prompts is not None:
            raise ValueError("visual prompts need a ViT image tower; this model has a ResNet image tower")
        x = pixels.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


# --------------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------------


class CLIP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.config = cfg
        self.weights_sha256: str | None = None
        self.weights_source: str | None = None
        self.visual: VisionTransformer | ModifiedResNet
        if cfg.vision.is_vit:
            self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.activation)
        else:
            self.visual = ModifiedResNet(cfg.vision, cfg.embed_dim)
        text = cfg.text
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size
        self.transformer = Transformer(text.width, text.layers, text.heads, cfg.activation)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Default of `truncate` in the text encoders. Cutting after the last end-of-text token is exact; False
        # runs the full context (a reference path for benchmarks and exactness tests).
        self.truncate_text = True
        self.initialize_parameters()

    # -- initialisation (random weights for tests and for pretraining the tiny model) --------------------
    def initialize_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(linear.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in stage.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)
        else:
            _init_transformer(self.visual.transformer)
        _init_transformer(self.transformer)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    # -- encoders -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def encode_image(
        self,
        pixels: torch.Tensor,
        shallow_prompts: torch.Tensor | None = None,
        deep_prompts: DeepPrompts | None = None,
    ) -> torch.Tensor:
        """Unnormalised image features [B, embed_dim]."""
        return self.visual(pixels, shallow_prompts=shallow_prompts, deep_prompts=deep_prompts)

    def encode_text(self, tokens: torch.Tensor, truncate: bool | None = None) -> torch.Tensor:
        """Unnormalised text features [N, embed_dim] of token ids [N, context_length], as OpenAI's CLIP.

        The end-of-text token has the largest id of the vocabulary, so its position is the argmax."""
        embeddings = self.token_embedding(tokens)
        return self.encode_text_embeddings(embeddings, tokens.argmax(dim=-1), truncate=truncate)

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        eot_index: torch.Tensor,
        deep_prompts: DeepPrompts | None = None,
        prompt_start: int = 1,
        truncate: bool | None = None,
        text_length: int | None = None,
    ) -> torch.Tensor:
        """Text features from token embeddings [N, L, width] and end-of-text positions [N].

        `deep_prompts[j]` ([n, width] or [N, n, width]) replaces positions `prompt_start : prompt_start + n`
        entering layer j. With `truncate` (default: the model's `truncate_text`), the sequence is cut after the
        last end-of-text position: exact under the causal mask. That position + 1 is `text_length` when the
        caller knows it; otherwise it is read from `eot_index`, which waits for the device to get there."""
        length = embeddings.shape[1]
        if truncate is None:
            truncate = self.truncate_text
        if truncate:
            last = text_length if text_length is not None else int(eot_index.max()) + 1
            length = min(length, last)
            if deep_prompts is not None:
                widest = max((p.shape[-2] for p in deep_prompts if p is not None), default=0)
                length = max(length, min(embeddings.shape[1], prompt_start + widest))
        x = embeddings[:, :length] + self.positional_embedding[:length].to(embeddings.dtype)
        x = self.transformer(x, causal=True, deep_prompts=deep_prompts, slot_start=prompt_start)
        x = self.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = x[rows, eot_index.to(x.device)]
        return pooled @ matmul_weight(self.text_projection, pooled)

    # -- storage precision ----------------------------------------------------------------------------------
    def matmul_weights(self) -> list[torch.Tensor]:
        """The weights that autocast casts to its compute dtype at every call: those of the linear layers and
        the attention input projections, the patch embedding and the two output projections (not the
        embeddings, LayerNorms, BatchNorms, the ResNet's convolutions or the logit scale)."""
        weights: list[torch.Tensor] = [self.text_projection]
        if isinstance(self.visual, VisionTransformer):
            weights += [self.visual.conv1.weight, self.visual.proj]
        for module in self.modules():
            if isinstance(module, Linear):
                weights += [p for p in (module.weight, module.bias) if p is not None]
            elif isinstance(module, MultiheadSelfAttention):
                weights += [module.in_proj_weight, module.in_proj_bias]
        return weights

    def store_matmul_weights(self, dtype: torch.dtype) -> int:
        """Keep the `matmul_weights` in `dtype` (autocast's compute dtype), so that autocast uses them as they
        are instead of casting every one at every call. Under autocast the features are the same, since autocast
        rounds the weights to that dtype anyway; outside it the towers compute in fp32 from the rounded weights.
        Frozen weights only. Returns how many tensors changed."""
        weights = self.matmul_weights()
        trained = [p for p in weights if p.requires_grad]
        if trained:
            raise ValueError(
                f"{len(trained)} matmul weights of the CLIP are trained: only a frozen backbone can be stored in "
                f"{dtype} (trained tensors stay fp32, the optimiser's master copy)"
            )
        changed = [p for p in weights if p.dtype != dtype]
        for param in changed:
            param.data = param.data.to(dtype)
        return len(changed)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits image->text and text->image, as OpenAI's CLIP."""
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * image @ text.t()
        return logits, logits.t()


def _init_transformer(transformer: Transformer) -> None:
    width, layers = transformer.width, transformer.layers
    proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.resblocks:
        assert isinstance(block, ResidualAttentionBlock)
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        c_fc, c_proj = block.mlp.c_fc, block.mlp.c_proj
        assert isinstance(c_fc, nn.Linear) and isinstance(c_proj, nn.Linear)
        nn.init.normal_(c_fc.weight, std=fc_std)
        nn.init.normal_(c_proj.weight, std=proj_std)


# --------------------------------------------------------------------------------------------------------
# Architecture inference from shapes
# --------------------------------------------------------------------------------------------------------


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return len(indices)


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"state dict has no {key!r}: not an OpenAI-layout CLIP state dict")
    return state_dict[key]


def _infer_arch(state_dict: Mapping[str, torch.Tensor], name: str) -> ArchConfig:
    embed_dim = int(_require(state_dict, "text_projection").shape[1])
    text_width = int(_require(state_dict, "ln_final.weight").shape[0])
    text = TextConfig(
        context_length=int(_require(state_dict, "positional_embedding").shape[0]),
        vocab_size=int(_require(state_dict, "token_embedding.weight").shape[0]),
        width=text_width,
        heads=max(1, text_width // 64),
        layers=_count_blocks(state_dict, "transformer.resblocks."),
    )
    if "visual.proj" in state_dict:
        conv = _require(state_dict, "visual.conv1.weight")
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=patch * grid,
            width=width,
            layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
            heads=max(1, width // 64),
            patch_size=patch,
        )
    else:
        width = int(_require(state_dict, "visual.layer1.0.conv1.weight").shape[0])
        stages = tuple(_count_blocks(state_dict, f"visual.layer{stage}.") for stage in range(1, 5))
        grid = round((_require(state_dict, "visual.attnpool.positional_embedding").shape[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=grid * 32,
            width=width,
            heads=width * 32 // 64,
            resnet_layers=stages,  # type: ignore[arg-type]
        )
    return ArchConfig(name=name, embed_dim=embed_dim, vision=vision, text=text)
