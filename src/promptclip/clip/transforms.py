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

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """A uint8 ``[3, H, W]`` tensor of the image's 8-bit RGB values (converted to RGB first if needed)."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A float32 ``[3, H, W]`` tensor in [0, 1] (the image is converted to RGB first if needed)."""
    return unit_float(pil_to_uint8(image))


def unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1]: one rounding of v / 255, the same on every device."""
    return pixels.to(torch.float32).div_(255.0)


def normalize_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised float32 pixels from uint8 ``[..., 3, H, W]`` (bitwise what the float path gives)."""
    return normalize(unit_float(pixels))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP-normalise ``[..., 3, H, W]`` pixels in [0, 1] with CLIP's per-channel mean and std."""
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"normalize expects pixels shaped [..., 3, H, W], got {tuple(pixels.shape)}")
    mean, std = _mean_and_std(pixels.dtype, pixels.device)
    return (pixels - mean) / std


@functools.cache
def _mean_and_std(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std as ``[3, 1, 1]`` tensors, made once per device: a copy from the host at every batch
    would make the host wait for the GPU's queue."""
    mean = torch.tensor(CLIP_MEAN, dtype=dtype, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=dtype, device=device).view(3, 1, 1)
    return mean, std


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
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

    def resize_and_crop(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        """Short side to ``image_size`` with `resample`, then the centre crop (an image or a mask)."""
        new_width, new_height = resized_short_side(image.width, image.height, self.image_size)
        resized = image.resize((new_width, new_height), resample)
        left = center_crop_offset(new_width, self.image_size)
        top = center_crop_offset(new_height, self.image_size)
        return resized.crop((left, top, left + self.image_size, top + self.image_size))

    def crop(self, image: Image.Image) -> Image.Image:
        """The resized and centre-cropped RGB image (8 bits per channel), before the conversion to a tensor."""
        return self.resize_and_crop(to_rgb(image), Image.Resampling.BICUBIC)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalize(pil_to_tensor(self.crop(image)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


class PairedEvalTransform(EvalTransform):
    """EvalTransform for an (image, mask) pair; the mask is resized with nearest neighbour."""

    def __call__(  # type: ignore[override]
        self, image: Image.Image, mask: Image.Image
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_mask_size(image.size, mask.size)
        pixels = super().__call__(image)
        mask_crop = self.resize_and_crop(mask, Image.Resampling.NEAREST)
        return pixels, mask_to_tensor(mask_crop)


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


@dataclass(frozen=True)
class Augmentation:
    """A run's training augmentation: random resized crops of area `scale`, flipped with probability `flip_p`,
    or none (`random_crops` false: the evaluation crop, the same pixels every time)."""

    random_crops: bool = True
    scale: tuple[float, float] = DEFAULT_SCALE
    flip_p: float = 0.5

    def transform(self, image_size: int) -> TrainTransform | EvalTransform:
        """The transform that makes this augmentation's pictures (see `augmented_picture`)."""
        if not self.random_crops:
            return EvalTransform(image_size)
        return TrainTransform(image_size, scale=self.scale, flip_p=self.flip_p)


FIELD_AUGMENTATION = Augmentation()  # the field's random resized crop (8-100% of the area) and flip


def augmented_picture(
    transform: TrainTransform | EvalTransform, image: Image.Image, generator: torch.Generator | None
) -> Image.Image:
    """The 8-bit picture `transform` makes of `image`: a random crop and flip drawn from `generator`, or the
    evaluation crop."""
    if isinstance(transform, TrainTransform):
        return transform.augment(image, generator)
    return transform.crop(image)


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

    def draw(self, width: int, height: int, generator: torch.Generator | None) -> tuple[CropBox, bool]:
        """The crop box, then the flip: one draw order shared by the image-only and the paired transforms."""
        box = sample_crop_box(width, height, self.scale, self.ratio, generator)
        return box, _draw_flip(self.flip_p, generator)

    def apply(self, image: Image.Image, box: CropBox, flip: bool, resample: Image.Resampling) -> Image.Image:
        """Crop `box`, resize to ``image_size`` with `resample`, flip if drawn (an image or a mask)."""
        top, left, crop_height, crop_width = box
        out = image.crop((left, top, left + crop_width, top + crop_height))
        out = out.resize((self.image_size, self.image_size), resample)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out

    def augment(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """The cropped, resized and flipped RGB image (8 bits per channel), before the conversion to a tensor:
        what may run apart from the normalisation (in a worker process, with the tensor step on the device)."""
        image = to_rgb(image)
        box, flip = self.draw(image.width, image.height, generator)
        return self.apply(image, box, flip, Image.Resampling.BICUBIC)

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
        box, flip = self.draw(image.width, image.height, generator)
        pixels = normalize(pil_to_tensor(self.apply(image, box, flip, Image.Resampling.BICUBIC)))
        return pixels, mask_to_tensor(self.apply(mask, box, flip, Image.Resampling.NEAREST))


def _nearest_indices(start: int, length: int, size: int, device: torch.device) -> torch.Tensor:
    """Source indices PIL's nearest-neighbour resize reads: output pixel centres, found by adding the step
    length / size to half a step in double precision, one pixel after another, and truncating."""
    return start + _nearest_positions_on(length, size, device)


@functools.lru_cache(maxsize=4096)  # crop lengths vary with the drawn boxes
def _nearest_positions_on(length: int, size: int, device: torch.device) -> torch.Tensor:
    """`_pil_nearest_positions` as a tensor on `device`, copied there once per (length, size)."""
    return torch.tensor(_pil_nearest_positions(length, size), device=device, dtype=torch.long)


@functools.lru_cache(maxsize=4096)
def _pil_nearest_positions(length: int, size: int) -> tuple[int, ...]:
    step = length / size
    centre, positions = step * 0.5, []
    for _ in range(size):  # a running sum, as PIL's: its rounding decides centres lying exactly on a boundary
        positions.append(min(int(centre), length - 1))
        centre += step
    return tuple(positions)


# ---------------------------------------------------------------------------------------------------------
# The same geometry on tensors (any device): PIL's bicubic resize, rounding included
# ---------------------------------------------------------------------------------------------------------


def resize_like_pil(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of ``[C, H, W]`` pixels on the 0..255 scale (uint8 or float) to ``(height, width)`` as
    PIL resizes an 8-bit image: one pass per axis whose size changes, each rounded to 8 bits, in PIL's order.

    torch's antialiased bicubic kernel has PIL's support and weights (a = -0.5), so the result differs from
    PIL's only where PIL's 22-bit fixed-point weights round a value lying within about 1e-3 of a half level
    the other way: one level, on well under 1% of the pixels. Returns float32 integer values in [0, 255].
    """
    out = pixels.to(torch.float32)[None]
    in_height, in_width = out.shape[-2:]
    passes = [(in_height, width), (height, width)]  # horizontal, then vertical
    if _pil_may_go_vertical_first() and in_height - height > max(0, 2 * (in_width - width)):
        passes = [(height, in_width), (height, width)]
    for size in passes:
        if tuple(out.shape[-2:]) != size:  # PIL skips a pass whose size does not change
            out = F.interpolate(out, size=size, mode="bicubic", align_corners=False, antialias=True)
            out = _rounded(out)
    return out[0]


@functools.cache
def _pil_may_go_vertical_first() -> bool:
    """Whether the installed PIL runs the vertical pass first when the height shrinks by more than twice as
    many pixels as the width (recent versions do, to make the second pass cheaper; older ones always start
    horizontally): told apart once by resizing a small noise image both ways."""
    noise = np.random.default_rng(0).integers(0, 256, (40, 12, 3), dtype=np.uint8)
    reference = torch.from_numpy(np.array(Image.fromarray(noise).resize((10, 10), Image.Resampling.BICUBIC)))
    pixels = torch.from_numpy(noise).permute(2, 0, 1).to(torch.float32)[None]
    errors = []
    for passes in ([(40, 10), (10, 10)], [(10, 12), (10, 10)]):  # horizontal first, vertical first
        out = pixels
        for size in passes:
            out = _rounded(F.interpolate(out, size=size, mode="bicubic", align_corners=False, antialias=True))
        errors.append(float((out[0].permute(1, 2, 0) - reference.float()).abs().max()))
    return errors[1] < errors[0]


def _rounded(values: torch.Tensor) -> torch.Tensor:
    """PIL's 8-bit store: round half up, then clip to 0..255."""
    return values.add_(0.5).floor_().clamp_(0.0, 255.0)


def nearest_resize(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's nearest-neighbour resize of a ``[H, W]`` tensor (any dtype)."""
    rows = _nearest_indices(0, mask.shape[-2], height, mask.device)
    cols = _nearest_indices(0, mask.shape[-1], width, mask.device)
    return mask[rows[:, None], cols[None, :]]


def crop_resize_flip(
    pixels: torch.Tensor, box: CropBox, flip: bool, size: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TrainTransform's crop, bicubic resize and flip of ``[3, H, W]`` uint8 pixels on any device: float32
    in [0, 255] with PIL's rounding (see `resize_like_pil`); ``mask`` ``[H, W]`` cropped, resized with nearest
    neighbour and flipped the same way."""
    top, left, crop_height, crop_width = box
    out = resize_like_pil(pixels[:, top : top + crop_height, left : left + crop_width], size, size)
    out_mask = None
    if mask is not None:
        out_mask = nearest_resize(mask[top : top + crop_height, left : left + crop_width], size, size)
    if flip:
        out = out.flip(-1)
        out_mask = out_mask.flip(-1) if out_mask is not None else None
    return out, out_mask


def eval_crop(
    pixels: torch.Tensor, size: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """EvalTransform's geometry on ``[3, H, W]`` uint8 pixels on any device (short side resized bicubically to
    ``size``, centre crop): float32 in [0, 255] with PIL's rounding; ``mask`` resized with nearest neighbour."""
    height, width = pixels.shape[-2:]
    new_width, new_height = resized_short_side(width, height, size)
    top, left = center_crop_offset(new_height, size), center_crop_offset(new_width, size)
    out = resize_like_pil(pixels, new_height, new_width)[:, top : top + size, left : left + size]
    out_mask = None
    if mask is not None:
        out_mask = nearest_resize(mask, new_height, new_width)[top : top + size, left : left + size]
    return out, out_mask


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

    ``pixels`` is ``[3, H, W]``: uint8, or float in [0, 1]. Returns float32 ``[3, size, size]`` in [0, 1],
    not normalised (apply ``normalize`` afterwards), resized as PIL resizes (see `resize_like_pil`: equal to
    the PIL path's pixels but for one level on rare rounding ties). ``mask`` (``[H, W]``, any dtype) is
    cropped, resized with nearest neighbour and flipped the same way, keeping its dtype.
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
    if pixels.dtype != torch.uint8:
        pixels = pixels.to(torch.float32).mul(255.0).round_().clamp_(0.0, 255.0)
    box = sample_crop_box(width, height, scale, ratio, generator)
    flip = _draw_flip(flip_p, generator)
    out, out_mask = crop_resize_flip(pixels, box, flip, size, mask)
    return out.div_(255.0), out_mask
