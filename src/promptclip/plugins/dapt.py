"""DAPT, decouple before align (T-PAMI 2025), as a plug-in over any learner of the contract.

A training step with a foreground mask `m` (1 = object) encodes three views of each image: the whole image
`x`, the foreground `x*m` and the background `x*(1-m)`. The masking happens on the normalised pixels, as the
official code does: masked pixels become 0, which is CLIP's mean colour (`fill: black` uses the normalised
value of black instead, as the paper's figure draws it). The loss is the inner learner's own loss on the whole
images plus:

* `dapt_pull_push` (L_v): triplet margin loss with the whole-image feature as anchor, the foreground feature as
  positive and the background feature as negative, both with stop-gradient (only the whole-image branch
  learns from it); Euclidean distance, margin 1.5, weight 0.8;
* `dapt_fg` (L_f): cross-entropy of the (stop-gradient) foreground features against the class texts, so only
  the class prompts learn from it; weight 0.1;
* `dapt_bg` (L_b): cross-entropy of the background features against hand-written background classes (the 25
  names of the official code, "a clean origami {}.") encoded through the learner's prompts, with the arg-max
  background class as pseudo-label (there is no ground truth); weight 0.5.

The views the active terms read only as stop-gradient targets (the foreground always, unless an
image-conditioned learner aligns it with its own class features; the background while L_b is off) are encoded
without an autograd graph, in one pass after the whole image's; the views that need a graph share the
whole-image pass, and with it the class features. Learners with batch statistics in training (PromptKD's
projector BatchNorm) keep all three views in one batch, so the statistics cover every view once per step.

Schedule `official` (default, the released code): L_v alone in epochs 0..switch_epoch-1, then L_f + L_b;
`joint` (the paper's description): all three in every epoch. The epoch is tracked by `on_epoch_start`, which
the engine also calls after a resume.

`compat: released` reproduces the released code's training step where it differs from the default: its text
rows are the classes, the 25 background names and 7 table-top names, sliced so that the first 7 background
rows (ground ... sky) are extra columns of the class classifier (L_cls, L_f) and L_b runs over the other 18
names plus the 7 table-top ones; its Grad-CAM divides by the batch's maximum and upsamples with
`align_corners=True`.

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
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from promptclip.clip.tokenizer import tokenize
from promptclip.clip.transforms import CLIP_MEAN, CLIP_STD
from promptclip.data.masks import MaskConfig
from promptclip.methods.base import Batch, LearnerOutput, PromptModel, RunNeeds, scaled_cosine_logits
from promptclip.plugins.base import PluginContext, PluginModel
from promptclip.plugins.gradcam import (
    DEFAULT_STYLE,
    DEFAULT_THRESHOLD,
    RELEASED_STYLE,
    CamStyle,
    gradcam_layer,
    gradcam_masks,
)
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

#: Seven table-top names the official code encodes after the 25 background classes. Its text rows are the
#: classes, the 25, these 7, and it slices them with the length of the 25 (`[:-25]` / `[-25:]`): the class
#: classifier gets the classes plus the first 7 background names (ground ... sky), and the background term runs
#: over the other 18 background names plus these 7. The default uses `background_classes` for the background
#: term and the classes alone in the classifier; `compat: released` reproduces the slicing.
TABLE_BACKGROUND_CLASSES: tuple[str, ...] = ("table", "forks", "tablecloth", "hands", "spoon", "glasses", "dishes")

BACKGROUND_TEMPLATE = "a clean origami {}."

PULL_PUSH, FOREGROUND, BACKGROUND = "dapt_pull_push", "dapt_fg", "dapt_bg"
FOREGROUND_VIEW, BACKGROUND_VIEW = "foreground", "background"

Compat = Literal["default", "released"]
COMPAT_VALUES: tuple[str, ...] = ("default", "released")


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
    compat: Compat = "default"
    """`default`: the classifier holds the classes only and L_b runs over `background_classes`, Grad-CAM maps
    are normalised per image on the patch centres; `released`: the released code's training step (7 extra
    classifier columns, L_b over the rest of its slicing, Grad-CAM over the batch maximum with
    `align_corners=True`), for learners trained by plain cross-entropy. docs/dapt.md has the details."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """How mask files are found and read for datasets on disk (`mask_source: data`)."""


@dataclass
class DAPTOutput(LearnerOutput):
    """The whole-image output of the inner learner, plus the foreground and background views (None for a view
    no active term reads) and, under `compat: released`, the background texts of the step."""

    foreground_features: torch.Tensor | None = None
    background_features: torch.Tensor | None = None
    foreground_text_features: torch.Tensor | None = None
    """Class features for the foreground view ([C, D], or [B, C, D] for image-conditioned learners)."""
    extra_class_features: torch.Tensor | None = None
    """`compat: released`: the background texts that are extra columns of the class classifier ([7, D])."""
    background_text_features: torch.Tensor | None = None
    """`compat: released`: the background texts of L_b ([K, D]); None: encoded by `loss`."""


@PLUGINS.register("dapt")
class DAPT(PluginModel):
    """Decouple before align: foreground/background views, their alignment and a pull-push term."""

    name = "dapt"
    Config = DAPTConfig

    def __init__(self, inner: PromptModel, cfg: DAPTConfig, context: PluginContext | None = None) -> None:
        check_config(cfg)
        if cfg.mask_source == "gradcam":
            gradcam_layer(inner.clip)  # refuse a ResNet image tower now, not at the first step
        if cfg.compat == "released":
            check_released_learner(inner)
        super().__init__(inner, cfg, context)
        self.epoch = 0
        self._cam_prompts: dict[str, torch.Tensor] | None = None
        self._frozen_background: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._warned_no_mask = False
        self._batch_norms = [m for m in inner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

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
        views = self.views(images, mask)
        in_graph = self.views_in_graph(tuple(views))
        output = self.inner({"image": torch.cat([images, *(views[name] for name in in_graph)])})
        features = dict(zip(("whole", *in_graph), output.image_features.split(count), strict=True))
        text = output.text_features
        per_image = text.dim() == 3
        texts = dict(zip(("whole", *in_graph), text.split(count), strict=True)) if per_image else {}
        targets = [name for name in views if name not in in_graph]
        if targets:
            with self.target_pass():
                computed = self.inner.image_features(torch.cat([views[name] for name in targets]))
            features.update(zip(targets, computed.split(count), strict=True))
        whole = features["whole"]
        result = DAPTOutput(
            logits=output.logits[:count],
            image_features=whole,
            text_features=texts["whole"] if per_image else text,
            foreground_features=features.get(FOREGROUND_VIEW),
            background_features=features.get(BACKGROUND_VIEW),
            foreground_text_features=texts.get(FOREGROUND_VIEW) if per_image else text,
        )
        if self.cfg.compat == "released":
            self._add_released_columns(result)
        return result

    def views(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The masked views the active terms read: the foreground for the pull-push and foreground terms, the
        background for the pull-push and background terms."""
        active = self.active_terms()
        views = {}
        if PULL_PUSH in active or FOREGROUND in active:
            views[FOREGROUND_VIEW] = self.foreground(images, mask)
        if PULL_PUSH in active or BACKGROUND in active:
            views[BACKGROUND_VIEW] = self.background(images, mask)
        return views

    def views_in_graph(self, views: tuple[str, ...]) -> tuple[str, ...]:
        """The views that must keep their autograd graph, so they share the whole-image pass: the background
        while L_b is on and the image tower has trainable prompts (L_b reaches them through z_b), the
        foreground while L_f is on and the class features are conditioned on it (CoCoOp). The others are
        stop-gradient targets. A learner with batch statistics in training keeps every view in the one batch."""
        if self.has_batch_statistics():
            return views
        active = self.active_terms()
        graph = set()
        if BACKGROUND in active and self.inner.has_visual_prompts:
            graph.add(BACKGROUND_VIEW)
        if FOREGROUND in active and self.inner.image_conditioned_text:
            graph.add(FOREGROUND_VIEW)
        return tuple(name for name in views if name in graph)

    def target_pass(self) -> AbstractContextManager[Any]:
        """Where the stop-gradient views are encoded: without autograd (their graph would never be used)."""
        return torch.no_grad()

    def has_batch_statistics(self) -> bool:
        """Whether a layer of the inner learner normalises with the statistics of its batch right now."""
        return any(norm.training for norm in self._batch_norms)

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
                masks = gradcam_masks(self.inner, images, labels, self.cfg.gradcam_threshold, self.cam_style)
            return masks.to(images.dtype)
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

    @property
    def cam_style(self) -> CamStyle:
        return RELEASED_STYLE if self.cfg.compat == "released" else DEFAULT_STYLE

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

    # -- compat: released ----------------------------------------------------------------------------------
    def _add_released_columns(self, output: DAPTOutput) -> None:
        """Encode the step's background texts once (as the released code does in every forward), append the
        extra class columns to the whole-image logits and keep both sets for the loss."""
        extra_names, background_names = released_background_split(self.cfg.background_classes)
        texts = self.background_text_features([*extra_names, *background_names])
        extra, background = texts[: len(extra_names)], texts[len(extra_names) :]
        extra_logits = scaled_cosine_logits(self.logit_scale, output.image_features, extra)
        output.logits = torch.cat([output.logits.float(), extra_logits], dim=1)
        output.extra_class_features = extra
        output.background_text_features = background

    # -- loss ----------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        losses = self.inner.loss(batch, output)
        if not isinstance(output, DAPTOutput):
            return losses
        cfg = self.cfg
        active = self.active_terms()
        if PULL_PUSH in active:
            assert output.foreground_features is not None and output.background_features is not None
            losses[PULL_PUSH] = cfg.pull_push_weight * pull_push_loss(
                output.image_features, output.foreground_features, output.background_features, cfg.margin
            )
        if FOREGROUND in active:
            assert output.foreground_features is not None and output.foreground_text_features is not None
            text = output.foreground_text_features
            if output.extra_class_features is not None:
                text = torch.cat([text.float(), output.extra_class_features])
            logits = self.foreground_logits(output.foreground_features.detach(), text)
            target = batch["label"] if self.uses_labels else output.logits.detach().argmax(dim=-1)
            losses[FOREGROUND] = cfg.foreground_weight * F.cross_entropy(logits, target)
        if BACKGROUND in active:
            assert output.background_features is not None
            background_text = output.background_text_features
            if background_text is None:
                background_text = self.background_text_features()
            logits = self.background_logits(output.background_features, background_text)
            losses[BACKGROUND] = cfg.background_weight * pseudo_label_loss(logits)
        return losses

    def foreground_logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits of foreground features against class features ([C, D] or per image
        [B, C, D]), in fp32 even under autocast, as the class logits."""
        if text.dim() == 2:
            return scaled_cosine_logits(self.logit_scale, features, text)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.logit_scale * torch.einsum("bd,bcd->bc", features.float(), text.float())

    def background_logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits of background features against the background texts, in fp32."""
        return scaled_cosine_logits(self.logit_scale, features, text)

    # -- background texts ----------------------------------------------------------------------------------
    def background_sentences(self, names: Sequence[str] | None = None) -> list[str]:
        names = self.cfg.background_classes if names is None else names
        return [self.cfg.background_template.format(name) for name in names]

    def background_text_mode(self) -> str:
        mode = self.cfg.background_text
        if mode == "auto":
            return "sentences" if self.inner.encodes_sentences else "classnames"
        return mode

    def background_text_features(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """[K, D] normalised features of the background classes `names` (default: `background_classes`),
        through the learner's prompts unless `background_text` is `frozen`; re-encoded at every step because
        the prompts change."""
        names = list(self.cfg.background_classes if names is None else names)
        mode = self.background_text_mode()
        if mode == "frozen":
            return self._frozen_background_features(self.background_sentences(names))
        if mode == "sentences":
            if not self.inner.encodes_sentences:
                raise ValueError(
                    f"dapt: background_text 'sentences' needs a learner with deep text prompts; "
                    f"{self.inner.name} has none (use 'classnames' or 'frozen')"
                )
            return self.inner.encode_sentences(self.background_sentences(names)).float()
        try:
            return self.inner.encode_classnames(names).float()
        except ValueError as err:
            raise ValueError(
                f"dapt: {self.inner.name} cannot encode the background classes as class names ({err}); "
                "set plugins.dapt.background_text frozen"
            ) from None

    def _frozen_background_features(self, sentences: list[str]) -> torch.Tensor:
        device = self.clip.token_embedding.weight.device
        key = (tuple(sentences), device)
        if self._frozen_background is None or self._frozen_background[0] != key:
            tokens = tokenize(sentences, context_length=self.clip.context_length).to(device)
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


def released_background_split(background_classes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(extra class columns, background classes of L_b) as the released code slices its text rows: classes,
    `background_classes`, the table-top names; the last len(background_classes) rows are L_b's, the rows
    between the classes and those are extra classifier columns. For the 25 official names: (ground ... sky),
    (the other 18 + the 7 table-top names)."""
    rows = [*background_classes, *TABLE_BACKGROUND_CLASSES]
    extra = len(rows) - len(background_classes)
    return rows[:extra], rows[extra:]


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
    if cfg.compat not in COMPAT_VALUES:
        problems.append(f"compat must be one of {', '.join(COMPAT_VALUES)}, got {cfg.compat!r}")
    if problems:
        raise ValueError("plugins.dapt: " + "; ".join(problems))


def check_released_learner(inner: PromptModel) -> None:
    """`compat: released` widens the class logits by the extra background columns; refuse a learner whose own
    loss or class features need exactly the class columns (its loss is not plain cross-entropy, or its class
    features depend on the image)."""
    if type(inner).loss is PromptModel.loss and not inner.image_conditioned_text:
        return
    raise ValueError(
        f"plugins.dapt.compat: 'released' reproduces the released MaPLe + DAPT step, whose class logits carry "
        f"{len(TABLE_BACKGROUND_CLASSES)} extra background columns; {inner.name} "
        + ("conditions its class features on the image" if inner.image_conditioned_text else "has a loss of its own")
        + " that needs exactly the class columns. Use compat 'default' with it, or a learner trained by plain "
        "cross-entropy (maple, ivlp, vpt, deep_lang, coop)"
    )
