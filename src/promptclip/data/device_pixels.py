"""Batches whose pixel work finishes on the device, so the host does less per image.

A loader's `pixels` setting says how far the host takes an image:

* ``float`` (the default on a CPU): decode, crop, resize, flip, convert and normalise; batches carry float32
  ``[B, 3, S, S]``.
* ``uint8`` (the default on a GPU): decode, crop, resize and flip; batches carry the 8-bit crops, a quarter of
  the bytes to copy, and the device converts and normalises them: bitwise the float path's values (the same
  IEEE float32 operations on every device).
* ``decoded``: decode only; batches carry each decoded image at its own size (a list of uint8 ``[3, H, W]``)
  and, for random crops, the drawn box and flip (``crop``: ``[B, 5]`` top, left, height, width, flip); the
  device crops, resizes (`promptclip.clip.transforms.resize_like_pil`), flips and normalises. The pixels equal
  the host path's but for one 8-bit level where PIL's fixed-point weights round a tie the other way.

`finish_batch` turns either form into the batch a learner reads: float32 CLIP-normalised images (and float
masks ``[B, 1, S, S]`` in {0, 1}) on the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import default_collate

from promptclip.clip.transforms import crop_resize_flip, eval_crop, normalize, normalize_uint8

PixelFormat = Literal["float", "uint8", "decoded"]
PIXEL_FORMATS: tuple[str, ...] = ("float", "uint8", "decoded")
CROP_KEY = "crop"
"""Batch key of the drawn crop boxes and flips of ``decoded`` training batches."""
_PER_IMAGE_KEYS = ("image", "mask")  # sizes differ between decoded images: kept as lists


def collate_decoded(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate items of decoded images of different sizes: images and masks as lists, the rest as usual."""
    batch = default_collate([{k: v for k, v in item.items() if k not in _PER_IMAGE_KEYS} for item in items])
    for key in _PER_IMAGE_KEYS:
        if key in items[0]:
            batch[key] = [item[key] for item in items]
    return batch


def move_to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors (and lists of tensors) of a batch on `device`, copied without blocking where pinned."""
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            moved[key] = [tensor.to(device, non_blocking=True) for tensor in value]
        else:
            moved[key] = value
    return moved


def finish_batch(batch: Mapping[str, Any], image_size: int, device: torch.device | None = None) -> dict[str, Any]:
    """A batch of any pixel format as a learner reads it, on `device` (default: where it is)."""
    out = dict(batch)
    crops = out.pop(CROP_KEY, None)  # read on the host: boxes on the device would cost a sync per image
    out = move_to(out, device) if device is not None else out
    images = out["image"]
    if isinstance(images, list):
        masks = out.get("mask")
        finished = [
            _finish_decoded(image, image_size, None if crops is None else crops[row], masks[row] if masks else None)
            for row, image in enumerate(images)
        ]
        out["image"] = normalize(torch.stack([pixels for pixels, _ in finished]).div_(255.0))
        if masks:
            cropped = [mask for _, mask in finished if mask is not None]
            out["mask"] = torch.stack(cropped).ge(128).to(torch.float32).unsqueeze(1)
    elif images.dtype == torch.uint8:
        out["image"] = normalize_uint8(images)
    return out


def _finish_decoded(
    image: torch.Tensor, size: int, crop: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if crop is None:
        return eval_crop(image, size, mask)
    top, left, height, width, flip = (int(value) for value in crop.tolist())
    return crop_resize_flip(image, (top, left, height, width), bool(flip), size, mask)
