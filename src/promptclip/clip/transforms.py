"""Image transforms for CLIP, on PIL images and on tensors, without torchvision.

Evaluation: bicubic resize of the short side, centre crop, scale to [0, 1], CLIP normalisation. Training:
random resized crop (bicubic) and a horizontal flip. Paired transforms give an (image, mask) pair the very
same crop and flip, the mask resized with nearest neighbour so its values stay labels. Every random draw
comes from the ``generator`` argument, so a seeded generator reproduces the same crops.

The geometry follows torchvision's transforms, which OpenAI's CLIP preprocessing and the prompt-tuning
literature use: the short side becomes ``int(size * long / short)`` on the long side, the centre-crop offset
is ``round(excess / 2)``, and the random crop is the usual ten tries of area and log-ratio sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from promptclip.clip.pixels import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10

CropBox = tuple[int, int, int, int]  # (top, left, height, width)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A float32 ``[3, H, W]`` tensor in [0, 1] (the image is converted to RGB first if needed)."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP-normalise ``[..., 3, H, W]`` pixels in [0, 1] with CLIP's per-channel mean and std."""
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"normalize expects pixels shaped [..., 3, H, W], got {tuple(pixels.shape)}")
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    return (pixels - mean) / std


def _mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """The raw values of a single-channel mask as a ``[H, W]`` uint8 tensor (no palette decoding)."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(
            f"mask must be a single-channel image (mode 'L', 'P', '1' or 'I'), got mode {mask.mode!r}; "
            "convert it with mask.convert('L') or save the labels as a palette or grey-scale PNG"
        )
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255 or not np.all(np.equal(np.mod(array, 1), 0))):
            raise ValueError(
                f"mask values must be integers in [0, 255], got a {mask.mode!r} mask with values in "
                f"[{array.min()}, {array.max()}]"
            )
        array = array.astype(np.uint8)
    return torch.from_numpy(array.copy())


def _check_mask_size(image_size: tuple[int, int], mask_size: tuple[int, int]) -> None:
    if image_size != mask_size:
        raise ValueError(
            f"mask size {mask_size[0]}x{mask_size[1]} (width x height) differs from image size "
            f"{image_size[0]}x{image_size[1]}; a mask must be pixel-aligned with its image"
        )


def _check_positive_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def _check_positive_range(name: str, bounds: Sequence[float]) -> tuple[float, float]:
    low, high = (float(value) for value in bounds)
    if not 0.0 < low <= high:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {tuple(bounds)}")
    return low, high


def resized_short_side(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to ``size``; the long side is truncated, not rounded."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_offset(length: int, crop: int) -> int:
    """Offset of a centred crop along one axis, rounded like torchvision (half to even)."""
    return round((length - crop) / 2.0)


class EvalTransform:
    """Bicubic resize of the short side to ``image_size``, centre crop, [0, 1] tensor, CLIP normalisation."""

    def __init__(self, image_size: int) -> None:
        self.image_size = _check_positive_size(image_size)

    def _resize_and_crop(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        new_width, new_height = resized_short_side(image.width, image.height, self.image_size)
        resized = image.resize((new_width, new_height), resample)
        left = center_crop_offset(new_width, self.image_size)
        top = center_crop_offset(new_height, self.image_size)
        return resized.crop((left, top, left + self.image_size, top + self.image_size))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        cropped = self._resize_and_crop(to_rgb(image), Image.Resampling.BICUBIC)
        return normalize(pil_to_tensor(cropped))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


class PairedEvalTransform(EvalTransform):
    """EvalTransform for an (image, mask) pair; the mask is resized with nearest neighbour."""

    def __call__(  # type: ignore[override]
        self, image: Image.Image, mask: Image.Image
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_mask_size(image.size, mask.size)
        pixels = super().__call__(image)
        mask_crop = self._resize_and_crop(mask, Image.Resampling.NEAREST)
        return pixels, _mask_to_tensor(mask_crop)


def sample_crop_box(
    width: int,
    height: int,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
) -> CropBox:
    """A random crop ``(top, left, height, width)`` covering a ``scale`` fraction of the image area with a
    width/height ratio in ``ratio`` (sampled uniformly in log space).

    Ten tries; if none fits inside the image, the largest centred crop whose ratio is clamped to ``ratio``.
    """
    area = width * height
    log_low, log_high = torch.log(torch.tensor([float(ratio[0]), float(ratio[1])])).tolist()
    for _ in range(_CROP_TRIES):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_low, log_high, generator=generator).item())
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator).item())
            return top, left, crop_height, crop_width
    return _centre_crop_box_within_ratio(width, height, ratio)


def _centre_crop_box_within_ratio(width: int, height: int, ratio: Sequence[float]) -> CropBox:
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif image_ratio > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _draw_flip(flip_p: float, generator: torch.Generator | None) -> bool:
    return torch.rand(1, generator=generator).item() < flip_p


class TrainTransform:
    """Random resized crop to ``image_size`` (bicubic), horizontal flip with ``flip_p``, CLIP normalisation."""

    def __init__(
        self,
        image_size: int,
        scale: Sequence[float] = DEFAULT_SCALE,
        ratio: Sequence[float] = DEFAULT_RATIO,
        flip_p: float = 0.5,
    ) -> None:
        self.image_size = _check_positive_size(image_size)
        self.scale = _check_positive_range("scale", scale)
        self.ratio = _check_positive_range("ratio", ratio)
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p}")
        self.flip_p = float(flip_p)

    def _sample(self, width: int, height: int, generator: torch.Generator | None) -> tuple[CropBox, bool]:
        """The crop box, then the flip: one draw order shared by the image-only and the paired transforms."""
        box = sample_crop_box(width, height, self.scale, self.ratio, generator)
        return box, _draw_flip(self.flip_p, generator)

    def _apply(self, image: Image.Image, box: CropBox, flip: bool, resample: Image.Resampling) -> Image.Image:
        top, left, crop_height, crop_width = box
        out = image.crop((left, top, left + crop_width, top + crop_height))
        out = out.resize((self.image_size, self.image_size), resample)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out

    def augment(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """The cropped, resized and flipped RGB image (8 bits per channel), before the conversion to a tensor:
        what may run apart from the normalisation (in a worker process, with the tensor step on the device)."""
        image = to_rgb(image)
        box, flip = self._sample(image.width, image.height, generator)
        return self._apply(image, box, flip, Image.Resampling.BICUBIC)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return normalize(pil_to_tensor(self.augment(image, generator)))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
            f"flip_p={self.flip_p})"
        )


class PairedTrainTransform(TrainTransform):
    """TrainTransform that gives a mask the image's crop and flip; returns the mask as ``[S, S]`` uint8."""

    def __call__(  # type: ignore[override]
        self, image: Image.Image, mask: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_mask_size(image.size, mask.size)
        image = to_rgb(image)
        box, flip = self._sample(image.width, image.height, generator)
        pixels = normalize(pil_to_tensor(self._apply(image, box, flip, Image.Resampling.BICUBIC)))
        return pixels, _mask_to_tensor(self._apply(mask, box, flip, Image.Resampling.NEAREST))


def _nearest_indices(start: int, length: int, size: int, device: torch.device) -> torch.Tensor:
    """Source indices sampled at output pixel centres, as PIL's nearest-neighbour resize does."""
    centres = (torch.arange(size, device=device, dtype=torch.float64) + 0.5) * (length / size)
    return start + centres.floor().long().clamp_(max=length - 1)


def random_resized_crop_tensor(
    pixels: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
    flip_p: float = 0.5,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random resized crop and flip of an image already in memory, with the same draws as TrainTransform.

    ``pixels`` is ``[3, H, W]``: float in [0, 1] or uint8. Returns float32 ``[3, size, size]`` in [0, 1],
    not normalised (apply ``normalize`` afterwards), resized bicubically with antialiasing and clamped to
    [0, 1] as the PIL path's uint8 output is. ``mask`` (``[H, W]``, any dtype) is cropped, resized with
    nearest neighbour and flipped the same way, keeping its dtype.
    """
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        raise ValueError(f"pixels must be shaped [3, H, W], got {tuple(pixels.shape)}")
    size = _check_positive_size(size)
    scale = _check_positive_range("scale", scale)
    ratio = _check_positive_range("ratio", ratio)
    height, width = pixels.shape[-2:]
    if mask is not None and tuple(mask.shape) != (height, width):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} differs from the image's (height, width) {(height, width)}; "
            "a mask must be pixel-aligned with its image"
        )
    if pixels.dtype == torch.uint8:
        pixels = pixels.to(torch.float32) / 255.0
    top, left, crop_height, crop_width = sample_crop_box(width, height, scale, ratio, generator)
    flip = _draw_flip(flip_p, generator)

    crop = pixels[:, top : top + crop_height, left : left + crop_width].to(torch.float32)
    resized = F.interpolate(crop[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    out = resized[0].clamp_(0.0, 1.0)
    out_mask = None
    if mask is not None:
        rows = _nearest_indices(top, crop_height, size, mask.device)
        cols = _nearest_indices(left, crop_width, size, mask.device)
        out_mask = mask[rows[:, None], cols[None, :]]
    if flip:
        out = out.flip(-1)
        out_mask = out_mask.flip(-1) if out_mask is not None else None
    return out, out_mask
