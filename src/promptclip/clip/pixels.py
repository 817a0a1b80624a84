"""How a decoded image of any PIL mode becomes the 8-bit RGB image CLIP reads: one rule for every reader.

`to_rgb(image)` maps each mode to RGB with values 0..255:

- ``RGB``: as it is. ``L`` (grey): the grey value in all three channels. ``1`` (bilevel): 0 or 255.
- ``P`` (palette) without transparency: the palette colours. ``CMYK``: R = (255 - C)(255 - K) / 255, the
  same for G (M) and B (Y), without colour management (an embedded ICC profile is not applied).
  ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: PIL's conversion.
- Images with transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, and ``P`` with a
  transparent palette entry) are composited on a **white** background (`ALPHA_BACKGROUND`): a pixel of
  colour c and alpha a becomes round((c * a + 255 * (255 - a)) / 255). Transparent pixels therefore read as
  white, whatever colour the file stores under them (often black). CLIP's own preprocessing drops alpha
  instead and shows that hidden colour.
- 16- and 32-bit integer grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``): scaled by the image's bit
  depth, v -> round(v * 255 / (2**bits - 1)). The bit depth is the one a TIFF file declares
  (BitsPerSample, e.g. 12); otherwise 16 for the ``I;16`` modes (16-bit PNG and TIFF; PNG stores samples
  scaled to the full 16 bits whatever their significant bits), and for ``I`` 16 when every value lies in
  0..65535 (16-bit PGM, 16-bit PNG read by older PIL versions), else 31 (the largest value a signed 32-bit
  ``I`` pixel holds; a declared 32 counts as 31 too). Negative values become 0. PIL's own conversion clips
  these values at 255 instead: a 16-bit photograph comes out almost entirely white.
- 32-bit float grey (``F``): values in [0, 1] (every finite value) are scaled by 255; otherwise the values are
  taken to be on the 0..255 scale and clipped to it. NaN becomes 0. PIL's own conversion would clip a
  [0, 1] image to black.

Nothing here depends on torch, so the dataset readers can use it without importing it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ALPHA_BACKGROUND = (255, 255, 255)
"""The colour transparent pixels are composited on (white)."""

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_TIFF_BITS_PER_SAMPLE = 258


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, by the rules of the module docstring (every PIL mode)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return _grey(_scale_integers(np.asarray(image), _bit_depth(image)))
    if mode == "F":
        return _grey(_scale_floats(np.asarray(image, dtype=np.float64)))
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _on_background(image.convert("RGBA"))
    return image.convert("RGB")


def _bit_depth(image: Image.Image) -> int:
    declared = _declared_bits(image)
    if declared is not None:
        return declared
    if image.mode in SIXTEEN_BIT_MODES:
        return 16
    values = np.asarray(image)
    return 16 if values.size == 0 or (int(values.min()) >= 0 and int(values.max()) <= 0xFFFF) else 31


def _declared_bits(image: Image.Image) -> int | None:
    """The bits per sample a TIFF file declares (None for other formats, or a value that makes no sense)."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None
    try:
        value = tags.get(_TIFF_BITS_PER_SAMPLE)
        bits = int(value[0] if isinstance(value, tuple) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return min(bits, 31) if 1 <= bits <= 32 else None  # mode I is signed: 2**31 - 1 is its largest value


def _scale_integers(values: np.ndarray, bits: int) -> np.ndarray:
    top = float(2**bits - 1)
    scaled = np.clip(values.astype(np.float64), 0.0, top) * (255.0 / top)
    return np.floor(scaled + 0.5).astype(np.uint8)


def _scale_floats(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(values[..., None], 3, axis=-1))


def _on_background(rgba: Image.Image) -> Image.Image:
    pixels = np.asarray(rgba, dtype=np.uint32)
    colour, alpha = pixels[..., :3], pixels[..., 3:]
    background = np.asarray(ALPHA_BACKGROUND, dtype=np.uint32)
    # round((c * a + bg * (255 - a)) / 255), in integers: adding half the divisor rounds half up.
    blended = (colour * alpha + background * (255 - alpha) + 127) // 255
    return Image.fromarray(blended.astype(np.uint8))
