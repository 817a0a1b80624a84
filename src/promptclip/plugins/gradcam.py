"""Grad-CAM heat maps and foreground masks of any learner with a ViT image tower.

The recipe of DAPT-G: activations and gradients of the last block's pre-attention LayerNorm
(`visual.transformer.resblocks[-1].ln_1`), patch tokens only (the class token and any prompt tokens are left
out), channel weights = the gradients averaged over the patches, CAM = ReLU(sum over channels of activation x
weight), reshaped to the patch grid, upsampled bilinearly to the image size, divided by its own maximum (per
image), and thresholded at 0.5 for a mask.

The upsampling puts each grid value at the centre of its patch (`align_corners=False`), so a CAM cell lands on
the pixels its patch covers; the official code's `align_corners=True` stretches the grid to the image corners,
shifting the map by up to half a patch towards the borders, and it divides every map by the largest value of
the whole batch. `RELEASED_STYLE` reproduces both (DAPT's `compat: released`).

The score is the logit of the given label (the ground truth in training; the predicted class when no label is
given), computed by the learner's own `forward`, so the learner's prompts shape the map. The layer is read
through a forward hook that turns its output into a leaf tensor: the gradient is taken with respect to that
leaf only, no parameter receives a gradient, and the backbone needs no change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from promptclip.clip.model import CLIP

DEFAULT_THRESHOLD = 0.5
NORMALISE_EPS = 1e-6


@dataclass(frozen=True)
class CamStyle:
    """How the patch-grid CAM becomes a heat map in [0, 1]."""

    align_corners: bool = False
    """Bilinear upsampling with grid values at the patch centres (False) or stretched to the image corners."""
    normalise: Literal["image", "batch"] = "image"
    """Divide each map by its own maximum, or every map by the maximum of the whole batch."""


DEFAULT_STYLE = CamStyle()
RELEASED_STYLE = CamStyle(align_corners=True, normalise="batch")
"""The official DAPT code's (`trainers/util.py`)."""


def gradcam_layer(clip: CLIP) -> nn.Module:
    """The module whose output Grad-CAM reads: the last image block's pre-attention LayerNorm."""
    if not clip.config.vision.is_vit:
        raise ValueError(
            f"Grad-CAM reads the patch tokens of a ViT image tower; {clip.config.name} has a ResNet image tower "
            "(use mask files from a segmenter instead: DAPT mask_source 'data')"
        )
    visual: Any = clip.visual
    return visual.transformer.resblocks[-1].ln_1


def patch_grid(clip: CLIP) -> int:
    """Patches per side of the image tower's input."""
    visual: Any = clip.visual
    return int(visual.image_size // visual.patch_size)


class _LayerCapture:
    """Forward hook that replaces the first output of a layer by a leaf tensor that requires grad."""

    def __init__(self) -> None:
        self.activation: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.activation is not None:  # a second image-tower pass in the same forward is not the one scored
            return None
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf
        return leaf


@contextmanager
def _captured(layer: nn.Module) -> Iterator[_LayerCapture]:
    capture = _LayerCapture()
    handle = layer.register_forward_hook(capture)
    try:
        yield capture
    finally:
        handle.remove()


@contextmanager
def _eval_mode(learner: nn.Module) -> Iterator[None]:
    was_training = learner.training
    learner.eval()
    try:
        yield
    finally:
        learner.train(was_training)


def gradcam_grid(
    learner: Any, images: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CAM on the patch grid [B, g, g] before normalisation, the labels scored [B]).

    `learner` is any learner of the contract (its `forward` gives the logits); it is run in eval mode with
    autograd on and returned to its previous mode.
    """
    clip: CLIP = learner.clip
    layer = gradcam_layer(clip)
    grid = patch_grid(clip)
    with _eval_mode(learner), torch.enable_grad(), _captured(layer) as capture:
        logits = learner({"image": images}).logits.float()
        if labels is None:
            labels = logits.argmax(dim=-1)
        labels = labels.to(logits.device, torch.long)
        if capture.activation is None:
            raise RuntimeError("Grad-CAM: the learner's forward did not run the image tower's last block")
        score = logits.gather(1, labels[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, capture.activation)
    patches = slice(1, 1 + grid * grid)  # token order: [class, patches, prompts]
    activation = capture.activation.detach()[:, patches].float()
    gradient = gradient[:, patches].float()
    weights = gradient.mean(dim=1, keepdim=True)  # one weight per channel and image
    cam = F.relu((activation * weights).sum(dim=-1))
    return cam.view(-1, grid, grid), labels.detach()


def upsample_cam(cam: torch.Tensor, size: tuple[int, int], style: CamStyle = DEFAULT_STYLE) -> torch.Tensor:
    """[B, g, g] patch-grid CAM -> [B, 1, H, W] in [0, 1]: bilinear upsampling, then each map over its own
    maximum (or, `style.normalise` "batch", over the batch's)."""
    heat = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=style.align_corners)
    peak = heat.amax(dim=(-2, -1), keepdim=True) if style.normalise == "image" else heat.amax()
    return heat / (peak + NORMALISE_EPS)


def gradcam(
    learner: Any, images: torch.Tensor, labels: torch.Tensor | None = None, style: CamStyle = DEFAULT_STYLE
) -> torch.Tensor:
    """Grad-CAM heat maps [B, 1, H, W] in [0, 1] of `labels` (default: the predicted classes)."""
    cam, _ = gradcam_grid(learner, images, labels)
    return upsample_cam(cam, (images.shape[-2], images.shape[-1]), style)


def heat_to_mask(heat: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Binary float masks {0, 1} (1 = foreground) of heat maps in [0, 1]."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"Grad-CAM threshold must be in [0, 1], got {threshold}")
    return (heat >= threshold).to(torch.float32)


def gradcam_masks(
    learner: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    style: CamStyle = DEFAULT_STYLE,
) -> torch.Tensor:
    """Foreground masks [B, 1, H, W] in {0, 1}: Grad-CAM of `labels` thresholded at `threshold`."""
    return heat_to_mask(gradcam(learner, images, labels, style), threshold)
