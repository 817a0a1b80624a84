"""Image styles of the synthetic world: corruptions applied to a whole data set, as a domain gap.

A style changes how an image looks, never what it shows: the object, its mask and its caption stay the same.
Pretraining shows each style on a small fraction of its images, so a downstream task rendered entirely in one
style sits outside what the model knows well, the way a satellite or sketch data set sits outside a web
crawl. Every style is a pure function of the image, the strength and a seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["STYLES", "STYLE_RANGES", "apply_style", "check_style"]

#: Strength ranges: pixelate = block side in pixels, noise = Gaussian std as a fraction of 255,
#: faded = fraction of contrast removed (toward mid-grey).
STYLE_RANGES: dict[str, tuple[float, float]] = {
    "pixelate": (2.0, 8.0),
    "noise": (0.05, 0.5),
    "faded": (0.2, 0.9),
}

STYLES: tuple[str, ...] = ("none", *STYLE_RANGES)


def check_style(style: str, strength: float) -> None:
    """Raise ValueError naming the allowed values when ``style`` or ``strength`` is not usable."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of: {', '.join(STYLES)}")
    if style == "none":
        return
    low, high = STYLE_RANGES[style]
    if not low <= float(strength) <= high:
        hint = " (give style_strength with the style)" if float(strength) == 0 else ""
        raise ValueError(f"style {style!r}: strength must be in [{low:g}, {high:g}], got {strength}{hint}")


def _pixelate(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    block = round(strength)
    n = image.shape[0]
    cells = -(-n // block)
    padded = np.pad(image.astype(np.float32), ((0, cells * block - n), (0, cells * block - n), (0, 0)), mode="edge")
    means = padded.reshape(cells, block, cells, block, 3).mean(axis=(1, 3))
    return np.repeat(np.repeat(means, block, axis=0), block, axis=1)[:n, :n]


def _noise(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return image.astype(np.float32) + rng.normal(0.0, 255.0 * strength, image.shape).astype(np.float32)


def _faded(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return 128.0 + (image.astype(np.float32) - 128.0) * (1.0 - strength)


_STYLE_PAINTERS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "pixelate": _pixelate,
    "noise": _noise,
    "faded": _faded,
}


def apply_style(image: np.ndarray, style: str, strength: float, seed: int) -> np.ndarray:
    """``image`` (uint8 [H, W, 3]) in ``style`` at ``strength``; "none" returns it unchanged."""
    check_style(style, strength)
    if style == "none":
        return image
    rng = np.random.default_rng([int(seed), 4409])
    styled = _STYLE_PAINTERS[style](image, float(strength), rng)
    return np.clip(np.rint(styled), 0.0, 255.0).astype(np.uint8)
