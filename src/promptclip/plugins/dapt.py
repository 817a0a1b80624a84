"""DAPT, decouple before align (T-PAMI 2025), as a plug-in over any learner of the contract.

A training step with a foreground mask `m` (1 = object) encodes three views of each image in one batched pass
of the inner learner (3B images): the whole image `x`, the foreground `x*m` and the background `x*(1-m)`. The
masking happens on the normalised pixels, as the official code does: masked pixels become 0, which is CLIP's
mean colour (`fill: black` uses the normalised value of black instead, as the paper's figure draws it).
The loss is the inner learner's own loss on the whole images plus:

* `dapt_pull_push` (L_v): triplet margin loss with the whole-image feature as anchor, the foreground feature as
  positive and the background feature as negative, both with stop-gradient (only the whole-image branch
  learns from it); Euclidean distance, margin 1.5, weight 0.8;
* `dapt_fg` (L_f): cross-entropy of the (stop-gradient) foreground features against the class texts, so only
  the class prompts learn from it; weight 0.1;
* `dapt_bg` (L_b): cross-entropy of the background features against hand-written background classes (the 25
  names of the official code, "a clean origami {}.") encoded through the learner's prompts, with the arg-max
  background class as pseudo-label (there is no ground truth); weight 0.5.

Schedule `official` (default, the released code): L_v alone in epochs 0..switch_epoch-1, then L_f + L_b;
`joint` (the paper's description): all three in every epoch. The epoch is tracked by `on_epoch_start`, which
the engine also calls after a resume.

Masks: `mask_source: data` (DAPT-S) reads `batch["mask"]` (the dataset's mask store: a segmenter's mask files,
or the synthetic world's exact masks); `mask_source: gradcam` (DAPT-G) computes Grad-CAM masks of the
ground-truth class from the learner itself on the step's own (augmented) images, with the prompts of the start
of the epoch (`gradcam_refresh: epoch`, the official refresh) or of the current step.

Transductive learners (PromptKD) train on unlabelled images of every class: for them the foreground term and
Grad-CAM use the learner's own prediction on the whole image instead of the label (`labels`).

In eval mode, or without autograd (and, for DAPT-S, without a mask) the plug-in is the inner learner: test
time needs no masks. docs/dapt.md lists every difference from the official code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from promptclip.clip.tokenizer import tokenize
from promptclip.clip.transforms import CLIP_MEAN, CLIP_STD
from promptclip.data.masks import MaskConfig
from promptclip.methods.base import Batch, LearnerOutput, PromptModel, RunNeeds
from promptclip.plugins.base import PluginContext, PluginModel
from promptclip.plugins.gradcam import DEFAULT_THRESHOLD, gradcam_layer, gradcam_masks
from promptclip.registry import PLUGINS

logger = logging.getLogger("promptclip.dapt")

#: The 25 background classes of the official code (taken there from CLIP-ES).
BACKGROUND_CLASSES: tuple[str, ...] = (
    "ground",
    "land",
    "grass",
    "tree",
    "building",
    "wall",
    "sky",
    "lake",
    "water",
    "river",
    "sea",
    "railway",
    "railroad",
    "keyboard",
    "helmet",
    "cloud",
    "house",
    "mountain",
    "ocean",
    "road",
    "rock",
    "street",
    "valley",
    "bridge",
    "sign",
)

#: Seven table-top names the official code also encodes; by its slicing they end up as extra columns of the
#: class classifier on every dataset. Not used by default; add them to `background_classes` if wanted.
TABLE_BACKGROUND_CLASSES: tuple[str, ...] = ("table", "forks", "tablecloth", "hands", "spoon", "glasses", "dishes")

BACKGROUND_TEMPLATE = "a clean origami {}."

PULL_PUSH, FOREGROUND, BACKGROUND = "dapt_pull_push", "dapt_fg", "dapt_bg"


@dataclass
class DAPTConfig:
    mask_source: Literal["data", "gradcam"] = "data"
    """`data` (DAPT-S): the dataset's masks (`batch["mask"]`); `gradcam` (DAPT-G): Grad-CAM of the learner."""
    schedule: Literal["official", "joint"] = "official"
    """`official`: pull-push alone before `switch_epoch`, then the two alignment terms; `joint`: all three."""
    switch_epoch: int = 7
    """First 0-based epoch of the alignment terms under the official schedule (the code's `epoch > 6`)."""
    pull_push_weight: float = 0.8
    foreground_weight: float = 0.1
    background_weight: float = 0.5
    margin: float = 1.5
    """Margin of the pull-push triplet loss (Euclidean distances of unit vectors, so at most 2)."""
    background_classes: list[str] = field(default_factory=lambda: list(BACKGROUND_CLASSES))
    background_template: str = BACKGROUND_TEMPLATE
    """Sentence of a background class when the learner encodes sentences (see `background_text`)."""
    background_text: Literal["auto", "sentences", "classnames", "frozen"] = "auto"
    """How background texts are encoded. `sentences`: `background_template` sentences through the learner's
    deep text prompts (layer 0 reads the sentence's own words, deeper layers the learned prompts, as the
    official code does; MaPLe, IVLP, PromptSRC); `classnames`: the background names as class names through
    the learner's prompts (CoOp-style context; PromptKD's teacher); `frozen`: the sentences through frozen
    CLIP; `auto`: `sentences` when the learner can, else `classnames`."""
    fill: Literal["mean", "black"] = "mean"
    """Masked-out pixels: `mean` = 0 in normalised space (CLIP's mean colour, the official code); `black`."""
    gradcam_threshold: float = DEFAULT_THRESHOLD
    gradcam_refresh: Literal["epoch", "step"] = "epoch"
    """Grad-CAM with the prompts of the start of the epoch (official refresh) or of the current step."""
    labels: Literal["auto", "ground_truth", "predicted"] = "auto"
    """Class of the foreground term and of Grad-CAM: the label, or the learner's own prediction on the whole
    image (no label used); `auto`: predicted for transductive learners (PromptKD), which train on unlabelled
    images of every class, the label otherwise."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """How mask files are found and read for datasets on disk (`mask_source: data`)."""


@dataclass
class DAPTOutput(LearnerOutput):
    """The whole-image output of the inner learner, plus the foreground and background views."""

    foreground_features: torch.Tensor | None = None
    background_features: torch.Tensor | None = None
    foreground_text_features: torch.Tensor | None = None
    """Class features for the foreground view ([C, D], or [B, C, D] for image-conditioned learners)."""


@PLUGINS.register("dapt")
class DAPT(PluginModel):
    """Decouple before align: foreground/background views, their alignment and a pull-push term."""

    name = "dapt"
    Config = DAPTConfig

    def __init__(self, inner: PromptModel, cfg: DAPTConfig, context: PluginContext | None = None) -> None:
        check_config(cfg)
        if cfg.mask_source == "gradcam":
            gradcam_layer(inner.clip)  # refuse a ResNet image tower now, not at the first step
        super().__init__(inner, cfg, context)
        self.epoch = 0
        self._cam_prompts: dict[str, torch.Tensor] | None = None
        self._frozen_background: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._warned_no_mask = False

    # -- masks ---------------------------------------------------------------------------------------------
    @classmethod
    def needs(cls, cfg: DAPTConfig, run: Any) -> RunNeeds:
        """DAPT-S reads the dataset's foreground masks (checked before training); DAPT-G makes its own."""
        return RunNeeds(masks=cfg.mask if cfg.mask_source == "data" else None)

    # -- schedule ------------------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self.epoch = int(epoch)
        if self.cfg.mask_source == "gradcam" and self.cfg.gradcam_refresh == "epoch":
            self._cam_prompts = {k: v.detach().clone() for k, v in self.inner.trainable_state().items()}

    def active_terms(self, epoch: int | None = None) -> tuple[str, ...]:
        """The DAPT loss terms of `epoch` (default: the current one) with a non-zero weight."""
        cfg = self.cfg
        epoch = self.epoch if epoch is None else epoch
        if cfg.schedule == "joint":
            terms: tuple[str, ...] = (PULL_PUSH, FOREGROUND, BACKGROUND)
        elif epoch < cfg.switch_epoch:
            terms = (PULL_PUSH,)
        else:
            terms = (FOREGROUND, BACKGROUND)
        weights = {
            PULL_PUSH: cfg.pull_push_weight,
            FOREGROUND: cfg.foreground_weight,
            BACKGROUND: cfg.background_weight,
        }
        return tuple(term for term in terms if weights[term] != 0)

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> LearnerOutput:
        mask = self.step_mask(batch)
        if mask is None:
            return self.inner(batch)
        images = batch["image"]
        count = images.shape[0]
        views = torch.cat([images, self.foreground(images, mask), self.background(images, mask)])
        output = self.inner({"image": views})
        whole, fg, bg = (output.image_features[i * count : (i + 1) * count] for i in range(3))
        text = output.text_features
        per_image = text.dim() == 3
        return DAPTOutput(
            logits=output.logits[:count],
            image_features=whole,
            text_features=text[:count] if per_image else text,
            foreground_features=fg,
            background_features=bg,
            foreground_text_features=text[count : 2 * count] if per_image else text,
        )

    @property
    def uses_labels(self) -> bool:
        """Whether the foreground term and Grad-CAM read the labels (else the whole image's prediction)."""
        if self.cfg.labels == "auto":
            return not self.inner.transductive
        return self.cfg.labels == "ground_truth"

    def step_mask(self, batch: Batch) -> torch.Tensor | None:
        """The foreground mask [B, 1, H, W] of a training step, or None when this forward is not one."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        if self.uses_labels and "label" not in batch:
            return None
        images = batch["image"]
        if self.cfg.mask_source == "gradcam":
            labels = batch["label"] if self.uses_labels else None  # None: Grad-CAM of the predicted class
            with self._prompts_for_gradcam():
                return gradcam_masks(self.inner, images, labels, self.cfg.gradcam_threshold).to(images.dtype)
        mask = batch.get("mask")
        if mask is None:
            if not self._warned_no_mask:
                logger.warning(
                    "dapt: a training batch without 'mask'; the step is the inner learner's alone. Attach the "
                    "dataset's masks (promptclip.data.masks.attach_masks) or use mask_source gradcam"
                )
                self._warned_no_mask = True
            return None
        return fit_mask(mask, images)

    def foreground(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._masked(images, mask)

    def background(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._masked(images, 1 - mask)

    def _masked(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.cfg.fill == "mean":
            return images * keep
        return images * keep + black_pixels(images) * (1 - keep)

    @contextmanager
    def _prompts_for_gradcam(self) -> Iterator[None]:
        """Run Grad-CAM with the prompts saved at the start of the epoch (refresh `epoch`), then put the
        current ones back; with refresh `step`, or before any epoch started, the current prompts."""
        saved = self._cam_prompts
        if saved is None or self.cfg.gradcam_refresh == "step":
            yield
            return
        live = self.inner.trainable_state()
        current = {k: v.clone() for k, v in live.items()}
        with torch.no_grad():
            for key, tensor in live.items():
                tensor.copy_(saved[key])
        self.inner.invalidate_cache()
        try:
            yield
        finally:
            with torch.no_grad():
                for key, tensor in live.items():
                    tensor.copy_(current[key])
            self.inner.invalidate_cache()

    # -- loss ----------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        losses = self.inner.loss(batch, output)
        if not isinstance(output, DAPTOutput) or output.foreground_features is None:
            return losses
        assert output.background_features is not None and output.foreground_text_features is not None
        cfg = self.cfg
        active = self.active_terms()
        if PULL_PUSH in active:
            losses[PULL_PUSH] = cfg.pull_push_weight * pull_push_loss(
                output.image_features, output.foreground_features, output.background_features, cfg.margin
            )
        if FOREGROUND in active:
            logits = self.foreground_logits(output.foreground_features.detach(), output.foreground_text_features)
            target = batch["label"] if self.uses_labels else output.logits.detach().argmax(dim=-1)
            losses[FOREGROUND] = cfg.foreground_weight * F.cross_entropy(logits, target)
        if BACKGROUND in active:
            logits = self.logit_scale * output.background_features.float() @ self.background_text_features().t()
            losses[BACKGROUND] = cfg.background_weight * pseudo_label_loss(logits)
        return losses

    def foreground_logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        features = features.float()
        if text.dim() == 3:
            return self.logit_scale * torch.einsum("bd,bcd->bc", features, text.float())
        return self.logit_scale * features @ text.float().t()

    # -- background texts ----------------------------------------------------------------------------------
    def background_sentences(self) -> list[str]:
        return [self.cfg.background_template.format(name) for name in self.cfg.background_classes]

    def background_text_mode(self) -> str:
        mode = self.cfg.background_text
        if mode == "auto":
            return "sentences" if self.inner.encodes_sentences else "classnames"
        return mode

    def background_text_features(self) -> torch.Tensor:
        """[K, D] normalised features of the background classes (through the learner's prompts unless
        `background_text` is `frozen`); re-encoded at every step because the prompts change."""
        mode = self.background_text_mode()
        if mode == "frozen":
            return self._frozen_background_features()
        if mode == "sentences":
            if not self.inner.encodes_sentences:
                raise ValueError(
                    f"dapt: background_text 'sentences' needs a learner with deep text prompts; "
                    f"{self.inner.name} has none (use 'classnames' or 'frozen')"
                )
            return self.inner.encode_sentences(self.background_sentences()).float()
        try:
            return self.inner.encode_classnames(list(self.cfg.background_classes)).float()
        except ValueError as err:
            raise ValueError(
                f"dapt: {self.inner.name} cannot encode the background classes as class names ({err}); "
                "set plugins.dapt.background_text frozen"
            ) from None

    def _frozen_background_features(self) -> torch.Tensor:
        device = self.clip.token_embedding.weight.device
        key = (tuple(self.background_sentences()), device)
        if self._frozen_background is None or self._frozen_background[0] != key:
            tokens = tokenize(self.background_sentences(), context_length=self.clip.context_length).to(device)
            with torch.no_grad():
                features = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            self._frozen_background = (key, features)
        return self._frozen_background[1]


# ---------------------------------------------------------------------------------------------------------
# The terms, as functions
# ---------------------------------------------------------------------------------------------------------


def pull_push_loss(
    whole: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, margin: float
) -> torch.Tensor:
    """Mean over the batch of max(0, |whole - sg(fg)| - |whole - sg(bg)| + margin) (Euclidean distances):
    the whole-image feature is pulled towards its foreground and pushed from its background; only the
    whole-image branch receives gradient."""
    return F.triplet_margin_loss(
        whole.float(), foreground.detach().float(), background.detach().float(), margin=margin, p=2, eps=1e-6
    )


def pseudo_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `logits` against their own arg-max (no gradient through the choice)."""
    return F.cross_entropy(logits, logits.detach().argmax(dim=-1))


def fit_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A [B, 1, H, W] mask in {0, 1} on the images' grid, device and dtype (nearest resize if needed)."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[0] != images.shape[0] or mask.shape[1] != 1:
        raise ValueError(
            f"dapt: batch['mask'] must be [B, 1, H, W] for images {tuple(images.shape)}, got {tuple(mask.shape)}"
        )
    mask = mask.to(images.device, torch.float32)
    if mask.shape[-2:] != images.shape[-2:]:
        mask = F.interpolate(mask, size=images.shape[-2:], mode="nearest")
    return (mask > 0.5).to(images.dtype)


def black_pixels(images: torch.Tensor) -> torch.Tensor:
    """The normalised value of a black pixel, shaped to broadcast over [B, 3, H, W]."""
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype)
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype)
    return (-mean / std).view(1, 3, 1, 1)


def check_config(cfg: DAPTConfig) -> None:
    """Refuse values that cannot work, naming the field."""
    problems = []
    if cfg.switch_epoch < 0:
        problems.append(f"switch_epoch must be >= 0, got {cfg.switch_epoch}")
    for name in ("pull_push_weight", "foreground_weight", "background_weight", "margin"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.gradcam_threshold <= 1.0:
        problems.append(f"gradcam_threshold must be in [0, 1], got {cfg.gradcam_threshold}")
    if not cfg.background_classes and cfg.background_weight:
        problems.append("background_classes is empty but background_weight is not 0")
    if "{}" not in cfg.background_template:
        problems.append(f"background_template {cfg.background_template!r} has no {{}} for the class name")
    if problems:
        raise ValueError("plugins.dapt: " + "; ".join(problems))
