"""Image tiles for the mask and Grad-CAM pictures: squashed tiles, mask and heat-map overlays, captions and
sheets of tiles, written as PNG (numpy and PIL only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TILE = 128
GAP = 4
CAPTION = 14
FOREGROUND_TINT = np.array([255, 40, 40], dtype=np.float32)


def fit_tile(image: Image.Image, size: int = TILE, resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """The image squashed to a square tile (masks use nearest neighbour so they stay binary)."""
    return np.asarray(image.resize((size, size), resample))


def mask_overlay(image: Image.Image, mask: Image.Image, size: int = TILE) -> np.ndarray:
    """The image with its foreground tinted red and its background dimmed, [size, size, 3] uint8."""
    pixels = fit_tile(image.convert("RGB"), size).astype(np.float32)
    foreground = fit_tile(mask.convert("L"), size, Image.Resampling.NEAREST)[..., None] >= 128
    tinted = 0.55 * pixels + 0.45 * FOREGROUND_TINT
    dimmed = 0.35 * pixels
    return np.where(foreground, tinted, dimmed).clip(0, 255).astype(np.uint8)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """A blue-green-yellow-red colour map of values in [0, 1] -> [..., 3] uint8 (no matplotlib needed)."""
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[20, 30, 140], [30, 170, 120], [250, 220, 40], [220, 30, 30]], dtype=np.float32)
    value = np.clip(heat, 0.0, 1.0)
    channels = [np.interp(value, stops, colours[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def heat_overlay(pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An RGB uint8 image blended with the colour map of `heat` (same height and width)."""
    blended = (1 - alpha) * pixels.astype(np.float32) + alpha * heat_colours(heat).astype(np.float32)
    return blended.clip(0, 255).astype(np.uint8)


def captioned(tile: np.ndarray, caption: str) -> np.ndarray:
    """A tile with a caption line above it."""
    canvas = Image.new("RGB", (tile.shape[1], tile.shape[0] + CAPTION), "white")
    canvas.paste(Image.fromarray(tile), (0, CAPTION))
    ImageDraw.Draw(canvas).text((2, 1), caption[: max(tile.shape[1] // 6, 8)], fill=(0, 0, 0))
    return np.asarray(canvas)


def grid_image(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Tiles of equal size laid out in rows, with white gaps."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    sheet = np.full((len(rows) * (height + GAP) - GAP, columns * (width + GAP) - GAP, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top, left = r * (height + GAP), c * (width + GAP)
            sheet[top : top + height, left : left + width] = tile
    return sheet


def mask_sheet(pairs: Sequence[tuple[Image.Image, Image.Image, str]], per_row: int = 4) -> np.ndarray:
    """(image, mask, caption) triples -> one sheet of image | overlay pairs, `per_row` pairs per row."""
    tiles = []
    for image, mask, caption in pairs:
        tiles.append(captioned(fit_tile(image.convert("RGB")), caption))
        tiles.append(captioned(mask_overlay(image, mask), "mask"))
    width = 2 * per_row
    return grid_image([tiles[i : i + width] for i in range(0, len(tiles), width)])


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array (grey [H, W] or RGB [H, W, 3]) as PNG, atomically."""
    from promptclip.io import atomic_write_with

    image = Image.fromarray(array)

    def save(temporary: Path) -> None:
        image.save(temporary, format="PNG")

    atomic_write_with(path, save)
