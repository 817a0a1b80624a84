"""PromptSRC (Khattak et al., ICCV 2023): IVLP prompts regularised towards frozen CLIP.

Loss = cross-entropy + the self-regulating terms:

* `scl_text`: 25 x L1 between the normalised prompted text features and the frozen "textual diversity"
  features (frozen CLIP text features averaged over the 60 ImageNet templates, then normalised);
* `scl_image`: 10 x L1 between the normalised prompted and frozen image features;
* `scl_logits`: 1 x KL(p_frozen || p_prompted), summed and divided by the number of logits.

Gaussian prompt aggregation (GPA): after each epoch e (1-based) the trainable tensors are added to a running
sum with weight g(e) = N(e; mean, std), normalised over the epochs to sum to 1; after the last epoch the sum
replaces the prompts. The running sum is not part of the saved prompt; `training_state()` /
`load_training_state()` hand it to the training checkpoint, so a resumed run aggregates exactly as an
uninterrupted one (and a resumed run that lost it stops with an error instead of aggregating wrongly).

The frozen text ensemble is encoded once per class set; the frozen image features come from the same CLIP
run without prompts (no second copy of the image tower).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import tokenize
from promptclip.methods.base import Batch, LearnerOutput, scaled_cosine_logits
from promptclip.methods.ivlp import IVLP, IVLPConfig
from promptclip.methods.templates import IMAGENET_TEMPLATES
from promptclip.registry import METHODS

GPA_PREFIX = "gpa_sum."
GPA_EPOCHS = "gpa_epochs"


@dataclass
class PromptSRCConfig(IVLPConfig):
    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    depth_text: int = 9
    depth_vision: int = 9
    text_loss_weight: float = 25.0
    """Weight of the L1 distance of the text features to the frozen template ensemble."""
    image_loss_weight: float = 10.0
    """Weight of the L1 distance of the image features to the frozen image features."""
    logits_loss_weight: float = 1.0
    """Weight of KL(frozen logits || prompted logits)."""
    gpa: bool = True
    """Gaussian prompt aggregation over epochs."""
    gpa_mean: float = 15.0
    """Epoch (1-based) of the peak aggregation weight: 15 base-to-novel, 6 cross-dataset, 30 or 45 few-shot."""
    gpa_std: float = 1.0
    """Spread of the aggregation weights in epochs: 1 base-to-novel, 10 cross-dataset, 30 or 5 few-shot."""


def gaussian_weights(epochs: int, mean: float, std: float) -> torch.Tensor:
    """g(e) for e = 1..epochs, proportional to N(e; mean, std) and summing to 1 (float64).

    Computed as a softmax of the log-density, which is the normalised density exactly but never divides 0 by
    0 when every epoch lies far in the tails."""
    if epochs < 1:
        raise ValueError(f"GPA needs at least one epoch, got {epochs}")
    if std <= 0:
        raise ValueError(f"gpa_std must be > 0, got {std}")
    epoch = torch.arange(1, epochs + 1, dtype=torch.float64)
    return torch.softmax(-0.5 * ((epoch - mean) / std) ** 2, dim=0)


class GaussianPromptAggregation(nn.Module):
    """Running weighted sum of a fixed set of tensors and the number of epochs added so far.

    The sums are non-persistent buffers: they follow the learner across devices but stay out of saved prompts
    (after the last epoch they equal the prompts); `state()` / `load_state()` carry them through checkpoints."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        self.epochs_added = 0
        for name, tensor in tensors.items():
            self.register_buffer(self._buffer(name), torch.zeros_like(tensor.detach()), persistent=False)

    @staticmethod
    def _buffer(name: str) -> str:
        return name.replace(".", "__")

    def sums(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, self._buffer(name)) for name in self.names}

    @torch.no_grad()
    def add(self, tensors: Mapping[str, torch.Tensor], weight: float, restart: bool = False) -> None:
        if restart:
            self.epochs_added = 0
        for name, total in self.sums().items():
            if restart:
                total.zero_()
            total.add_(tensors[name].detach().to(total.dtype), alpha=weight)
        self.epochs_added += 1

    @torch.no_grad()
    def write_into(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, total in self.sums().items():
            tensors[name].copy_(total)

    def state(self) -> dict[str, torch.Tensor]:
        state = {f"{GPA_PREFIX}{name}": total.detach().clone() for name, total in self.sums().items()}
        state[GPA_EPOCHS] = torch.tensor(self.epochs_added)
        return state

    @torch.no_grad()
    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [key for key in (GPA_EPOCHS, *(GPA_PREFIX + n for n in self.names)) if key not in state]
        if missing:
            raise ValueError(f"Gaussian prompt aggregation state lacks {missing[:3]}")
        for name, total in self.sums().items():
            total.copy_(state[GPA_PREFIX + name].to(total.device, total.dtype))
        self.epochs_added = int(state[GPA_EPOCHS])


@METHODS.register("promptsrc")
class PromptSRC(IVLP):
    """PromptSRC: IVLP 4+4 tokens at depth 9 plus self-regulating losses and Gaussian prompt aggregation."""

    name = "promptsrc"
    Config = PromptSRCConfig

    def __init__(
        self, clip: CLIP, classnames: Sequence[str], cfg: PromptSRCConfig, template: str = "a photo of a {}."
    ) -> None:
        super().__init__(clip, classnames, cfg, template)
        self._frozen_text: tuple[tuple[str, ...], torch.Tensor] | None = None
        self.gpa: GaussianPromptAggregation | None = None
        if cfg.gpa:
            gaussian_weights(1, cfg.gpa_mean, cfg.gpa_std)  # refuse a bad std now, not after the first epoch
            self.gpa = GaussianPromptAggregation(self.trainable_parameters())

    # -- frozen targets ------------------------------------------------------------------------------------
    def frozen_text_features(self) -> torch.Tensor:
        """Normalised frozen-CLIP ensemble over the 60 templates for the current classes, encoded once."""
        key = tuple(self.classnames)
        device = self.clip.token_embedding.weight.device
        if self._frozen_text is None or self._frozen_text[0] != key or self._frozen_text[1].device != device:
            self._frozen_text = (key, template_ensemble(self.clip, self.classnames, IMAGENET_TEMPLATES))
        return self._frozen_text[1]

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised features of the same CLIP without prompts."""
        with torch.no_grad():
            return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def set_classnames(self, names: Sequence[str]) -> None:
        super().set_classnames(names)
        self._frozen_text = None

    # -- loss --------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        losses = super().loss(batch, output)
        cfg = self.cfg
        if cfg.text_loss_weight or cfg.logits_loss_weight:
            frozen_text = self.frozen_text_features()
            if output.text_features.shape != frozen_text.shape:
                raise ValueError(
                    f"promptsrc: {output.text_features.shape[0]} text features for {len(self.classnames)} classes; "
                    "the output must come from this learner's own class set"
                )
            if cfg.text_loss_weight:
                losses["scl_text"] = cfg.text_loss_weight * F.l1_loss(output.text_features, frozen_text)
        if cfg.image_loss_weight or cfg.logits_loss_weight:
            frozen_image = self.frozen_image_features(batch["image"])
            if cfg.image_loss_weight:
                losses["scl_image"] = cfg.image_loss_weight * F.l1_loss(output.image_features, frozen_image)
            if cfg.logits_loss_weight:
                frozen_logits = scaled_cosine_logits(self.logit_scale, frozen_image, frozen_text)
                losses["scl_logits"] = cfg.logits_loss_weight * mean_kl(frozen_logits, output.logits.float())
        return losses

    # -- Gaussian prompt aggregation -------------------------------------------------------------------------
    def gpa_weights(self, epochs: int) -> torch.Tensor:
        return gaussian_weights(epochs, self.cfg.gpa_mean, self.cfg.gpa_std)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Add this epoch's prompts to the Gaussian-weighted sum; after the last epoch, load the sum."""
        if self.gpa is None:
            return
        if not 0 <= epoch < epochs:
            raise ValueError(f"epoch {epoch} is outside 0..{epochs - 1}")
        if epoch > 0 and self.gpa.epochs_added != epoch:
            raise RuntimeError(
                f"promptsrc: Gaussian prompt aggregation holds {self.gpa.epochs_added} epochs at the end of epoch "
                f"{epoch + 1}; a resumed run must restore it with load_training_state(training_state()) from "
                "the checkpoint (or set method_cfg.gpa false)"
            )
        params = self.trainable_parameters()
        self.gpa.add(params, float(self.gpa_weights(epochs)[epoch]), restart=epoch == 0)
        if epoch == epochs - 1:
            self.gpa.write_into(params)
            self.invalidate_cache()

    def training_state(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs besides the prompts: the running GPA sum and its epoch count."""
        return self.gpa.state() if self.gpa is not None else {}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.gpa is not None:
            self.gpa.load_state(state)


def mean_kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(target/T) || softmax(logits/T)) x T^2, summed and divided by the number of logits (the
    reduction of the PromptSRC and PromptKD code, not batchmean)."""
    log_p = F.log_softmax(logits / temperature, dim=-1)
    log_target = F.log_softmax(target_logits.detach() / temperature, dim=-1)
    total = F.kl_div(log_p, log_target, reduction="sum", log_target=True)
    return total * temperature**2 / logits.numel()


def template_ensemble(
    clip: CLIP, classnames: Sequence[str], templates: Sequence[str], chunk_size: int = 256
) -> torch.Tensor:
    """Frozen text features [C, D]: the raw features averaged over `templates`, then normalised (PromptSRC's
    recipe; per-template features are not normalised before the mean). Runs in fp32 outside autocast."""
    device = clip.token_embedding.weight.device
    total: torch.Tensor | None = None
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        for template in templates:
            texts = [template.format(name) for name in classnames]
            tokens = tokenize(texts, context_length=clip.context_length, names=classnames)
            features = torch.cat(
                [
                    clip.encode_text(tokens[i : i + chunk_size].to(device)).float()
                    for i in range(0, len(tokens), chunk_size)
                ]
            )
            total = features if total is None else total + features
    assert total is not None
    return F.normalize(total / len(templates), dim=-1)
