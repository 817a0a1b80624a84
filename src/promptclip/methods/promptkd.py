"""PromptKD (Li et al., CVPR 2024): distil a prompted teacher CLIP into a student with visual prompts.

The student is a CLIP (ViT-B/16 in the paper) with deep vision prompts (4 tokens, depth 9; depth 3 for
cross-dataset) and a projector from its embedding width to the teacher's (Conv1x1 -> BatchNorm -> ReLU ->
Conv1x1, as in the reference). It has no text branch: its classifier is the teacher's text features.

The teacher is any saved prompt (`teacher_prompt`, a `save_pretrained` folder; the paper's is PromptSRC on
ViT-L/14) on `teacher_arch`, or zero-shot CLIP when none is given. It is frozen: its parameters never
require gradients, its outputs are computed without autograd, and its text features are encoded once per
class set.

Loss: kd_weight x KL(softmax(teacher / T) || softmax(student / T)) x T^2 / numel (T = 1, weight 1000; 200
for Aircraft, Flowers and DTD), plus an optional cross-entropy (weight 0 in the paper).

PromptKD is transductive: it is trained on the unlabelled training images of *all* classes, including the
ones later evaluated as "new". `transductive` (class attribute and config flag) marks it so runs and reports
keep it apart from inductive methods.

Without random augmentation the teacher would see the same pixels at every epoch: its image features are kept
(`TeacherFeatureCache`, `teacher_cache_mb`) and the teacher's image tower runs in the first epoch only.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptclip.clip.model import CLIP
from promptclip.config import ConfigError
from promptclip.data.loader import PIXELS_KEY
from promptclip.methods.base import Batch, LearnerOutput, PromptModel, RunNeeds, scaled_cosine_logits
from promptclip.methods.ivlp import PromptLayout, TowerPrompts, check_layout, random_prompt
from promptclip.methods.ivlp import convert_official_state as convert_official_prompts
from promptclip.methods.promptsrc import mean_kl
from promptclip.registry import METHODS

RANDOM_WEIGHTS = "random"
TEACHER_TEXT_CACHE_SIZE = 4

logger = logging.getLogger("promptclip.promptkd")


@dataclass
class PromptKDConfig:
    n_ctx_vision: int = 4
    """Student vision prompt tokens per layer."""
    depth_vision: int = 9
    """Student image-tower layers that receive fresh prompts (9 base-to-novel, 3 cross-dataset)."""
    teacher_arch: str = "ViT-L-14"
    """Teacher CLIP: an architecture name or a weights file (see `promptclip list archs`); empty: the student's
    own CLIP (shared, not copied)."""
    teacher_weights: str | None = None
    """Teacher weights file when `teacher_arch` is a name ("random": seeded random weights, for tests)."""
    teacher_prompt: str = ""
    """Saved prompt folder of the teacher (`save_pretrained`; PromptSRC in the paper); empty: zero-shot."""
    kd_weight: float = 1000.0
    """Weight of the distillation loss (the paper uses 200 for Aircraft, Flowers and DTD)."""
    temperature: float = 1.0
    ce_weight: float = 0.0
    """Weight of a cross-entropy on the labels; 0 in the paper (labels are not used)."""
    transductive: bool = True
    """Train on the unlabelled training images of all classes (the paper's protocol)."""
    teacher_cache_mb: int = 1024
    """Memory (on the training device) for the frozen teacher's image features of training images whose
    pixels repeat at every epoch (`data.augment: none`): the teacher's image tower then runs in the first epoch
    only. When full, later images are encoded at every epoch (said once in the log); 0 keeps none. Changes
    the float rounding only (a kept feature was encoded beside other images), so it is not part of a run's
    identity."""

    def __post_init__(self) -> None:
        if self.teacher_cache_mb < 0:
            raise ConfigError(
                f"method_cfg.teacher_cache_mb: {self.teacher_cache_mb} must be 0 (keep no teacher features) or "
                "more (e.g. --opts method_cfg.teacher_cache_mb 1024)"
            )


class TeacherFeatureCache:
    """The frozen teacher's image features of training images whose pixels repeat at every epoch, by their
    pixel key (`promptclip.data.loader.PIXELS_KEY`), within `max_bytes` of memory.

    The features are derived data: never saved, and dropped whenever what they were computed with changes
    (`follow`). When full, no more are added; the ones kept stay valid.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.rows: dict[int, torch.Tensor] = {}
        self.nbytes = 0
        self.hits = 0
        """Images whose features came from the cache."""
        self.misses = 0
        """Images the teacher encoded while the cache was in use."""
        self.full = False
        self._settings: tuple[Any, ...] | None = None
        self._tensors: list[tuple[weakref.ref[torch.Tensor], int, int]] = []

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def clear(self) -> None:
        self.rows = {}
        self.nbytes = 0
        self.full = False
        self._settings = None
        self._tensors = []

    def follow(self, tensors: Sequence[torch.Tensor], settings: tuple[Any, ...]) -> None:
        """Keep the features only while the teacher's `tensors` are the same objects, at the same version and
        storage, and the compute `settings` (device, dtype, autocast) are equal; else start empty."""
        if settings == self._settings and self._same_tensors(tensors):
            return
        self.clear()
        self._settings = settings
        self._tensors = [(weakref.ref(t), t._version, t.data_ptr()) for t in tensors]

    def _same_tensors(self, tensors: Sequence[torch.Tensor]) -> bool:
        # Weak references: a tensor freed and another one made at the same address never passes for it.
        return len(tensors) == len(self._tensors) and all(
            ref() is t and version == t._version and pointer == t.data_ptr()
            for (ref, version, pointer), t in zip(self._tensors, tensors, strict=True)
        )

    def get(self, keys: Sequence[int]) -> torch.Tensor | None:
        """The features [B, D] of `keys`, or None unless every one is kept."""
        rows = self.rows
        if not keys or any(key not in rows for key in keys):
            return None
        self.hits += len(keys)
        return torch.stack([rows[key] for key in keys])

    def put(self, keys: Sequence[int], features: torch.Tensor) -> None:
        """Keep the rows of `features` [B, D] under `keys`, unless they do not fit."""
        self.misses += len(keys)
        new = [row for row, key in enumerate(keys) if key not in self.rows]
        if not new or self.full:
            return
        features = features.detach()
        # A whole batch is kept as views of its rows; a few new rows are copied out, since a view of one row
        # would hold the storage of its whole batch.
        whole = len(new) == len(keys)
        cost = features.untyped_storage().nbytes() if whole else len(new) * features[0].nbytes
        if self.nbytes + cost > self.max_bytes:
            self.full = True
            logger.warning(
                "promptkd: the teacher's image features of %d images fill method_cfg.teacher_cache_mb (%d MB); "
                "the teacher encodes the others at every epoch (raise it to keep them all)",
                len(self.rows),
                self.max_bytes // 2**20,
            )
            return
        self.nbytes += cost
        for row in new:
            self.rows[keys[row]] = features[row] if whole else features[row].clone()


class FeatureProjector(nn.Module):
    """Conv1x1 -> BatchNorm -> ReLU -> Conv1x1 on [B, D] features, mapping the student's embedding width to
    the teacher's. The BatchNorm statistics are trained state (see `extra_state_buffers`); they use and
    update batch statistics only in training steps, so a forward without autograd in training mode gives the
    evaluation output."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.bn = nn.BatchNorm2d(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(features[:, :, None, None])
        if self.training and torch.is_grad_enabled() and hidden.shape[0] > 1:
            hidden = self.bn(hidden)  # a training step: batch statistics, running statistics updated
        else:
            # Evaluation, a forward without autograd (which cannot be a training step), or a single sample
            # (no batch statistics): the running statistics, left untouched.
            bn = self.bn
            hidden = F.batch_norm(hidden, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return self.conv2(F.relu(hidden)).flatten(1)


@METHODS.register("promptkd")
class PromptKD(PromptModel):
    """PromptKD: student visual prompts + projector distilled from a frozen prompted teacher (transductive)."""

    name = "promptkd"
    Config = PromptKDConfig
    has_visual_prompts = True
    # The method's protocol is transductive; an instance follows its config flag.
    transductive: bool = True

    @classmethod
    def needs(cls, cfg: PromptKDConfig, run: Any) -> RunNeeds:
        return RunNeeds(transductive=cfg.transductive)

    def __init__(
        self,
        clip: CLIP,
        classnames: Sequence[str],
        cfg: PromptKDConfig,
        template: str = "a photo of a {}.",
        teacher: PromptModel | None = None,
    ) -> None:
        super().__init__(clip, classnames, cfg, template)
        self.transductive = cfg.transductive
        check_layout(PromptLayout(0, 0, cfg.n_ctx_vision, cfg.depth_vision), clip, self.name)
        if cfg.n_ctx_vision == 0:
            raise ValueError("promptkd: the student needs vision prompts; set n_ctx_vision and depth_vision > 0")
        if cfg.temperature <= 0:
            raise ValueError(f"promptkd: temperature must be > 0, got {cfg.temperature}")
        self.teacher_cache = TeacherFeatureCache(cfg.teacher_cache_mb * 2**20)
        device = clip.token_embedding.weight.device
        self.vision = TowerPrompts(
            random_prompt((cfg.n_ctx_vision, clip.config.vision.width), device), cfg.depth_vision
        )
        teacher = teacher if teacher is not None else self._load_teacher(device)
        if teacher.clip.image_size != clip.image_size:
            raise ValueError(
                f"promptkd: teacher {teacher.clip.config.name} reads {teacher.clip.image_size} px images, the "
                f"student {clip.config.name} {clip.image_size} px; both see the same batch, pick matching models"
            )
        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = teacher
        self.projector = FeatureProjector(clip.config.embed_dim, teacher.clip.config.embed_dim).to(device)
        self._teacher_text: dict[tuple[object, ...], torch.Tensor] = {}

    def _load_teacher(self, device: torch.device) -> PromptModel:
        from promptclip.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig

        cfg = self.cfg
        teacher_clip = (
            load_teacher_clip(cfg.teacher_arch, cfg.teacher_weights, device) if cfg.teacher_arch else self.clip
        )
        if cfg.teacher_prompt:
            return PromptModel.from_pretrained(teacher_clip, cfg.teacher_prompt, classnames=self.classnames)
        return ZeroShotCLIP(teacher_clip, self.classnames, ZeroShotConfig(), template=self.template)

    # -- text side: the teacher's ----------------------------------------------------------------------------
    def encode_classnames(self, names: Sequence[str]) -> torch.Tensor:
        return self.teacher_text_features(names)

    def text_features(self) -> torch.Tensor:
        return self.teacher_text_features(self.classnames)

    def teacher_text_features(self, names: Sequence[str]) -> torch.Tensor:
        """The teacher's normalised text features for `names`, encoded once per class set and reused while
        the teacher's prompt tensors stay the same objects at the same version."""
        prompt_tensors = [p for n, p in self.teacher.named_parameters() if not n.startswith("clip.")]
        if any(p.requires_grad for p in prompt_tensors):  # a wrapper trains the teacher's prompts: no cache
            return self.teacher.encode_classnames(list(names)).float()
        device = self.projector.conv1.weight.device
        key = (tuple(names), device, *((id(p), p._version) for p in prompt_tensors))
        cached = self._teacher_text.get(key)
        if cached is None:
            with torch.no_grad():
                cached = self.teacher.encode_classnames(list(names)).float().to(device)
            if len(self._teacher_text) >= TEACHER_TEXT_CACHE_SIZE:
                self._teacher_text.pop(next(iter(self._teacher_text)))
            self._teacher_text[key] = cached
        return cached

    # -- image side: the student's -------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.clip.encode_image(images, self.vision.ctx, self.vision.deep_prompts())
        return F.normalize(self.projector(features.float()).float(), dim=-1)

    def teacher_logits(self, images: torch.Tensor, pixel_keys: Sequence[int] | None = None) -> torch.Tensor:
        """The frozen teacher's logits over the current classes (no autograd); `pixel_keys`: see
        `teacher_image_features`."""
        with torch.no_grad():
            image = self.teacher_image_features(images, pixel_keys)
            return scaled_cosine_logits(self.teacher.logit_scale, image, self.teacher_text_features(self.classnames))

    def teacher_image_features(self, images: torch.Tensor, pixel_keys: Sequence[int] | None = None) -> torch.Tensor:
        """The teacher's normalised image features (call without autograd). In training, with the loader's
        pixel keys of `images` (`PIXELS_KEY`: their pixels repeat at every epoch), they come from the teacher
        cache when every image of the batch is kept; otherwise the teacher encodes the batch and its features
        are kept."""
        cache = self._usable_teacher_cache(images) if pixel_keys is not None else None
        if cache is None:
            return self.teacher.image_features(images)
        assert pixel_keys is not None
        if len(pixel_keys) != images.shape[0]:
            raise ValueError(
                f"promptkd: the batch has {len(pixel_keys)} '{PIXELS_KEY}' entries for {images.shape[0]} images; "
                f"code that changes a batch's images must drop '{PIXELS_KEY}'"
            )
        kept = cache.get(pixel_keys)
        if kept is not None:
            return kept
        features = self.teacher.image_features(images)
        cache.put(pixel_keys, features)
        return features

    def _usable_teacher_cache(self, images: torch.Tensor) -> TeacherFeatureCache | None:
        """The teacher cache, valid for the teacher's current tensors; None outside training, when it is off,
        or while a wrapper trains some of the teacher's tensors (their features change at every step)."""
        cache = self.teacher_cache
        if not (cache.enabled and self.training):
            return None
        tensors = [*self.teacher.parameters(), *self.teacher.buffers()]
        if any(t.requires_grad for t in tensors):
            cache.clear()
            return None
        device = images.device.type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        cache.follow(tensors, (images.device, images.dtype, autocast))
        return cache

    # -- loss --------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        student = output.logits.float()
        teacher = self.teacher_logits(batch["image"], batch.get(PIXELS_KEY))
        losses = {"kd": cfg.kd_weight * mean_kl(teacher, student, cfg.temperature)}
        if cfg.ce_weight:
            losses["ce"] = cfg.ce_weight * F.cross_entropy(student, batch["label"])
        return losses

    # -- state -------------------------------------------------------------------------------------------
    def extra_state_buffers(self) -> dict[str, torch.Tensor]:
        return {f"projector.bn.{name}": buffer for name, buffer in self.projector.bn.named_buffers()}

    def train(self, mode: bool = True) -> PromptKD:
        super().train(mode)
        self.teacher.eval()  # the teacher never switches to training behaviour
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["teacher_cache"] = TeacherFeatureCache(self.teacher_cache.max_bytes)  # a copy starts empty
        return state


def load_teacher_clip(arch: str, weights: str | None, device: torch.device | str = "cpu") -> CLIP:
    """The teacher's CLIP (`teacher_arch`, `teacher_weights`). Random weights are drawn from seed 0 apart from
    the global generators: the same random teacher comes back on every load (save/load round trips)."""
    from promptclip.clip.weights import load_clip

    if weights != RANDOM_WEIGHTS:
        return load_clip(arch, weights=weights, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_clip(arch, weights=RANDOM_WEIGHTS, device=device)


# The reference projector is `VPT_image_trans.conv1`, an nn.Sequential(Conv2d, BatchNorm2d, ReLU, Conv2d).
_OFFICIAL_PROJECTOR = {"0": "conv1", "1": "bn", "3": "conv2"}


def convert_official_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our student tensors (fp32; BatchNorm's counter stays integer) from the state dict saved by the original
    PromptKD trainer: the vision prompts (`image_encoder.VPT`, `image_encoder.transformer.resblocks.<j>.
    VPT_shallow`) and the projector `VPT_image_trans.conv1.{0,1,3}`, BatchNorm statistics included."""
    prompts = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
    converted = convert_official_prompts(prompts) if prompts else {}
    for key, tensor in state.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[:2] == ["VPT_image_trans", "conv1"] and parts[2] in _OFFICIAL_PROJECTOR:
            value = tensor.detach().clone()
            converted[f"projector.{_OFFICIAL_PROJECTOR[parts[2]]}.{parts[3]}"] = (
                value if parts[3] == "num_batches_tracked" else value.float()
            )
    if "vision.ctx" not in converted or "projector.conv1.weight" not in converted:
        raise ValueError("no PromptKD student tensors in this state dict (image_encoder.VPT, VPT_image_trans.*)")
    return converted
