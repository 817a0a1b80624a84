"""Foreground masks for DAPT: where each image's mask file is, how its pixel values are read, what to do
when one is missing.

A mask store maps a `Datum` to a mask file by a rule:

- ``mirror`` (default): ``<mask dir>/`` mirrors the image's path below the dataset's image folder, e.g.
  ``food-101/images/pizza/1.jpg`` -> ``food-101/mask/pizza/1.<any extension>``.
- ``last2``: ``<mask dir>/<class folder>/<file>`` (the image path's last two parts).
- ``basename``: ``<mask dir>/<file>`` (the file name only).
- ``dapt``: the layout of the official DAPT code for this dataset (one of the three above; see
  docs/datasets.md), so SEEM masks downloaded for that code work unchanged.

The mask directory defaults to ``<dataset dir>/mask``; a mask may have any image extension (the image's own
extension is preferred, then PNG).

Encodings (decoded at full resolution, before any crop, into a binary 0/255 image):

- ``binary``: foreground where the value is >= 128 (0/255 masks, and JPEG-compressed or soft grey masks).
- ``index``: label-index masks: 0 is background, 255 is "ignore", every other value is a foreground label.
  This is the official DAPT rule. Ignore pixels count as background unless ``ignore_as="foreground"``.
- ``auto`` (default), per mask: ``index`` when the mask has values in 1..127 and none in 128..254 (small
  label ids), otherwise ``binary``. A label-index mask that only uses ids >= 128 is read as binary, which
  differs only in how its 255 pixels count: choose ``index`` explicitly for such masks.

Single-channel masks (grey or palette PNG: the palette indices are the labels) are read as they are;
colour masks are read from their red channel, as the official code does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image

from promptclip.data.datasets.base import DatasetError, DatasetSplits, Datum, SplitName

logger = logging.getLogger("promptclip.data")

MaskRule = Literal["mirror", "last2", "basename", "dapt"]
MaskEncoding = Literal["auto", "binary", "index"]
MaskFallback = Literal["error", "full", "skip"]
IgnoreAs = Literal["background", "foreground"]

DEFAULT_MASK_DIR = "mask"
FOREGROUND = 255
LIST_LIMIT = 20  # how many missing masks an error message names


class MaskError(DatasetError):
    """Masks are missing or unreadable; the message says how many, which, where it looked and the fixes."""


@dataclass(frozen=True)
class MaskConfig:
    """How to find and read masks (see the module docstring for the rules and encodings).

    `mask_dir` is absolute, or relative to the dataset folder; None means `<dataset dir>/mask`.
    `fallback` decides what a missing mask does: "error" (default) stops with the list of missing masks,
    "full" uses an all-foreground mask, "skip" drops those images from the training split.
    """

    rule: MaskRule = "mirror"
    mask_dir: str | None = None
    encoding: MaskEncoding = "auto"
    fallback: MaskFallback = "error"
    ignore_as: IgnoreAs = "background"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("rule", MaskRule),
            ("encoding", MaskEncoding),
            ("fallback", MaskFallback),
            ("ignore_as", IgnoreAs),
        ):
            value = getattr(self, name)
            if value not in get_args(allowed):
                raise MaskError(f"mask {name} {value!r} is unknown; choose one of: {', '.join(get_args(allowed))}")


def mask_values(image: Image.Image) -> np.ndarray:
    """The raw uint8 values of a mask image (palette indices, grey levels, or the red channel of colour)."""
    if image.mode == "1":
        return np.where(np.asarray(image), FOREGROUND, 0).astype(np.uint8)
    if image.mode in ("L", "P"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.clip(np.asarray(image), 0, 255).astype(np.uint8)
    if image.mode == "LA":
        return np.asarray(image, dtype=np.uint8)[..., 0]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)[..., 0]


def detect_encoding(values: np.ndarray) -> Literal["binary", "index"]:
    """`index` for small label ids (values in 1..127, none in 128..254), else `binary` (see module doc)."""
    present = np.bincount(values.ravel(), minlength=256) > 0
    has_small_ids = bool(present[1:128].any())
    has_high_grey = bool(present[128:255].any())
    return "index" if has_small_ids and not has_high_grey else "binary"


def foreground_of(values: np.ndarray, encoding: MaskEncoding, ignore_as: IgnoreAs = "background") -> np.ndarray:
    """Boolean foreground of raw mask values under `encoding`."""
    if encoding == "auto":
        encoding = detect_encoding(values)
    if encoding == "binary":
        return values >= 128
    foreground = (values != 0) & (values != 255)
    return foreground | (values == 255) if ignore_as == "foreground" else foreground


def decode_mask(image: Image.Image, encoding: MaskEncoding = "auto", ignore_as: IgnoreAs = "background") -> Image.Image:
    """A mask file's image -> binary mask (mode "L", 0 background, 255 foreground), same size."""
    foreground = foreground_of(mask_values(image), encoding, ignore_as)
    return Image.fromarray(np.where(foreground, FOREGROUND, 0).astype(np.uint8), mode="L")


def align_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a binary mask to the image size (width, height) with nearest neighbour, so it stays binary."""
    return mask if mask.size == size else mask.resize(size, Image.Resampling.NEAREST)


def full_mask(size: tuple[int, int]) -> Image.Image:
    """An all-foreground mask (the "full" fallback)."""
    return Image.new("L", size, FOREGROUND)


@dataclass
class FileMaskStore:
    """Mask files on disk found by a rule (see the module docstring)."""

    dataset_dir: Path
    image_dir: str
    config: MaskConfig = field(default_factory=MaskConfig)
    official_layout: str = "mirror"
    _listing: dict[Path, dict[str, list[str]]] = field(default_factory=dict, repr=False)

    @property
    def mask_dir(self) -> Path:
        given = Path(self.config.mask_dir).expanduser() if self.config.mask_dir else Path(DEFAULT_MASK_DIR)
        return given if given.is_absolute() else self.dataset_dir / given

    @property
    def layout(self) -> str:
        return self.official_layout if self.config.rule == "dapt" else self.config.rule

    @property
    def description(self) -> str:
        return f"mask files in {self.mask_dir} (rule {self.config.rule}: {self.layout}, {self.config.encoding})"

    def relative_mask_path(self, datum: Datum) -> str:
        """The mask's path below the mask folder, with the image's extension."""
        parts = datum.path.split("/")
        if self.layout == "basename":
            return parts[-1]
        if self.layout == "last2":
            return "/".join(parts[-2:])
        prefix = self.image_dir.strip("/") + "/" if self.image_dir else ""
        return datum.path[len(prefix) :] if prefix and datum.path.startswith(prefix) else datum.path

    def find(self, datum: Datum) -> Path | None:
        """The mask file of `datum` (any extension; the image's own first, then PNG), or None."""
        relative = Path(self.relative_mask_path(datum))
        folder = self.mask_dir / relative.parent
        names = self._names_by_stem(folder).get(relative.stem)
        if not names:
            return None
        preferred = sorted(
            names, key=lambda name: (Path(name).suffix != relative.suffix, Path(name).suffix.lower() != ".png", name)
        )
        return folder / preferred[0]

    def _names_by_stem(self, folder: Path) -> dict[str, list[str]]:
        # One listing per folder instead of one stat per candidate extension per image.
        if folder not in self._listing:
            table: dict[str, list[str]] = {}
            try:
                entries = os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                entries = []
            for name in entries:
                if not name.startswith("."):
                    table.setdefault(Path(name).stem, []).append(name)
            self._listing[folder] = table
        return self._listing[folder]

    def missing(self, data: Sequence[Datum]) -> list[Datum]:
        return [datum for datum in data if self.find(datum) is None]

    def load(self, datum: Datum) -> Image.Image | None:
        """The binary mask of `datum`; None when it is missing and the fallback is "full"."""
        path = self.find(datum)
        if path is None:
            if self.config.fallback == "full":
                return None
            expected = self.mask_dir / self.relative_mask_path(datum)
            raise MaskError(
                f"no mask for {datum.path}: looked for {expected.with_suffix('.*')}; {fixes_for_missing(self.config)}"
            )
        try:
            with Image.open(path) as image:
                image.load()
                return decode_mask(image, self.config.encoding, self.config.ignore_as)
        except OSError as err:
            raise MaskError(f"mask {path} cannot be read ({err}); replace or delete the file") from None


def fixes_for_missing(config: MaskConfig) -> str:
    others = [rule for rule in get_args(MaskRule) if rule != config.rule]
    return (
        "fix: put the masks there, point --mask-dir at them, choose another rule "
        f"(--mask-rule {'|'.join(others)}), or train without them on purpose with --mask-fallback full|skip"
    )


def attach_masks(
    splits: DatasetSplits,
    config: MaskConfig | None = None,
    check: tuple[SplitName, ...] = ("train",),
) -> DatasetSplits:
    """`splits` with a mask store attached, after checking that every image of the `check` splits has a mask.

    Missing masks raise a `MaskError` that says how many and which, unless `config.fallback` is "full"
    (all-foreground masks for them) or "skip" (they leave the checked splits); both are logged and counted
    in `info`. Datasets without files (the synthetic ones) keep their exact masks from the renderer.
    """
    config = config or MaskConfig()
    if splits.root is None:
        if splits.masks is None:
            raise MaskError(f"dataset {splits.name!r} has no files and no masks of its own")
        return splits
    store = FileMaskStore(splits.root, splits.image_dir, config, splits.official_mask_layout)
    changes: dict[str, list[Datum]] = {}
    info = dict(splits.info)
    for split in check:
        data = splits.split(split)
        absent = store.missing(data)
        if not absent:
            continue
        if config.fallback == "error":
            raise MaskError(missing_masks_message(store, split, absent, len(data)))
        info[f"masks_{config.fallback}_{split}"] = len(absent)
        logger.warning(
            "%d of %d %s images have no mask in %s; fallback %r",
            len(absent),
            len(data),
            split,
            store.mask_dir,
            config.fallback,
        )
        if config.fallback == "skip":
            dropped = set(absent)
            changes[split] = [datum for datum in data if datum not in dropped]
    info["masks"] = store.description
    return splits.replace(masks=store, info=info, **changes)


def missing_masks_message(store: FileMaskStore, split: str, absent: list[Datum], total: int) -> str:
    listed = "\n".join(
        f"  {store.mask_dir / store.relative_mask_path(datum)} (image {datum.path})" for datum in absent[:LIST_LIMIT]
    )
    more = f"\n  ... and {len(absent) - LIST_LIMIT} more" if len(absent) > LIST_LIMIT else ""
    return (
        f"{len(absent)} of {total} {split} images have no mask ({store.description}); missing:\n"
        f"{listed}{more}\n{fixes_for_missing(store.config)}"
    )


# A mask may be stored at another resolution than its image (it is resized to it), but not another shape.
ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class _MaskFacts:
    path: Path
    problem: str | None = None  # unreadable, or a shape that cannot be its image's
    has_pixels: bool = False  # any non-zero value
    has_foreground: bool = False  # any foreground under the configured encoding


def check_mask_files(splits: DatasetSplits, data: Sequence[Datum] | None = None, workers: int = 8) -> None:
    """Before training, decode the mask of every image of `data` (default: the training split) and refuse
    masks that cannot be used: unreadable files, masks of another shape than their image (made for another
    image, cropped or rotated), and an encoding that reads most masks as empty although they have non-zero
    pixels (e.g. 0/255 masks read as label indices, where 255 means "ignore"). Raises `MaskError` listing the
    files and the fix. Single masks with no foreground at all are allowed (a segmenter can find nothing)."""
    store = splits.masks
    if not isinstance(store, FileMaskStore):
        return  # rendered data bring exact masks
    data = splits.train if data is None else data
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        facts = [f for f in pool.map(lambda datum: _mask_facts(splits, store, datum), data) if f is not None]
    broken = [f"{f.path}: {f.problem}" for f in facts if f.problem]
    if broken:
        shown = "\n  ".join(broken[:LIST_LIMIT])
        more = f"\n  ... and {len(broken) - LIST_LIMIT} more" if len(broken) > LIST_LIMIT else ""
        raise MaskError(
            f"{len(broken)} of {len(facts)} training masks cannot be used ({store.description}):\n  {shown}{more}\n"
            "fix: regenerate or replace these masks so that each covers its image (the same size, or the same "
            "shape at another resolution); if they belong to other images, check the mask rule and folder "
            "(--mask-rule / --mask-dir, or the mask settings of the plug-in that reads them)"
        )
    with_pixels = [f for f in facts if f.has_pixels]
    empty = [f for f in with_pixels if not f.has_foreground]
    if with_pixels and 2 * len(empty) > len(with_pixels):
        config = store.config
        shown = "\n  ".join(str(f.path) for f in empty[:5])
        raise MaskError(
            f"{len(empty)} of {len(with_pixels)} training masks have non-zero pixels but no foreground under mask "
            f"encoding {config.encoding!r} (ignore_as {config.ignore_as!r}), e.g.:\n  {shown}\n"
            "fix: choose the encoding of these files (--mask-encoding binary for 0/255 masks, index for label-id "
            "masks where 255 means ignore, auto to decide per mask); see promptclip.data.masks"
        )


def _mask_facts(splits: DatasetSplits, store: FileMaskStore, datum: Datum) -> _MaskFacts | None:
    path = store.find(datum)
    if path is None:
        return None  # missing masks are handled by attach_masks (error, full or skip)
    try:
        with Image.open(path) as image:
            image.load()
            values, mask_size = mask_values(image), image.size
    except Exception as err:  # PIL raises many kinds of errors for broken files
        return _MaskFacts(path, f"cannot be read ({type(err).__name__}: {err})")
    try:
        with Image.open(splits.image_path(datum)) as image:
            image_size = image.size
    except Exception:  # an unreadable image is reported by the image check, not here
        image_size = mask_size
    if mask_size != image_size and not _same_shape(mask_size, image_size):
        return _MaskFacts(
            path,
            f"{mask_size[0]}x{mask_size[1]} pixels, but its image {datum.path} is {image_size[0]}x{image_size[1]} "
            "(another shape)",
        )
    foreground = foreground_of(values, store.config.encoding, store.config.ignore_as)
    return _MaskFacts(path, has_pixels=bool(values.any()), has_foreground=bool(foreground.any()))


def _same_shape(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - b[0] * a[1]) <= ASPECT_TOLERANCE * b[0] * a[1]
