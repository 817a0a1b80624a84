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

import dataclasses
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
DEFAULT_MAX_EMPTY_OR_FULL = 0.1  # MaskConfig.max_empty_or_full


class MaskError(DatasetError):
    """Masks are missing or unreadable; the message says how many, which, where it looked and the fixes."""


@dataclass(frozen=True)
class MaskConfig:
    """How to find and read masks (see the module docstring for the rules and encodings).

    `mask_dir` is absolute, or relative to the dataset folder; None means `<dataset dir>/mask`.
    `fallback` decides what a missing mask does: "error" (default) stops with the list of missing masks,
    "full" uses an all-foreground mask, "skip" drops those images from the training split. It also decides
    what an empty mask (no foreground) or a full one (no background) does, see `max_empty_or_full`.
    """

    rule: MaskRule = "mirror"
    mask_dir: str | None = None
    encoding: MaskEncoding = "auto"
    fallback: MaskFallback = "error"
    ignore_as: IgnoreAs = "background"
    max_empty_or_full: float = DEFAULT_MAX_EMPTY_OR_FULL
    """With fallback "error": the largest fraction of the training masks that may be empty or full (they are
    used as they are: a segmenter may find nothing in an image); more stops the run with the files listed.
    With fallback "full" every empty mask becomes an all-foreground one; with "skip" the images of empty and
    full masks leave the training split."""

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
        limit = self.max_empty_or_full
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0.0 <= limit <= 1.0:
            raise MaskError(f"mask max_empty_or_full {limit!r} must be a fraction in [0, 1], e.g. 0.1")


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
    full_for: frozenset[str] = frozenset()
    """Image paths whose (empty) masks are read as all-foreground: the "full" fallback (`screen_masks`)."""
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
        """The binary mask of `datum`; None when it is missing, or empty, and the fallback is "full"."""
        if datum.path in self.full_for:
            return None
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
    datum: Datum
    problem: str | None = None  # unreadable, or a shape that cannot be its image's
    has_pixels: bool = False  # any non-zero value
    foreground: float = 0.0  # the fraction of foreground pixels under the configured encoding


@dataclass(frozen=True)
class MaskSummary:
    """What the training masks hold: how many were read, which are empty (no foreground pixel) or full (no
    background pixel), and the mean fraction of foreground pixels."""

    total: int
    empty: tuple[tuple[Datum, Path], ...] = ()
    full: tuple[tuple[Datum, Path], ...] = ()
    mean_foreground: float = 0.0

    @property
    def empty_or_full(self) -> int:
        return len(self.empty) + len(self.full)

    def describe(self) -> str:
        return (
            f"{self.total} masks: {len(self.empty)} empty (no foreground), {len(self.full)} full (no background), "
            f"mean foreground {100 * self.mean_foreground:.1f}%"
        )

    def too_many(self, limit: float) -> bool:
        """More empty and full masks than the fraction `limit` of all of them."""
        return self.empty_or_full > limit * self.total

    def listed(self, limit: int = LIST_LIMIT) -> str:
        lines = [f"{path} (empty)" for _, path in self.empty] + [f"{path} (full)" for _, path in self.full]
        more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
        return "\n  ".join(lines[:limit]) + more


def mask_summary(splits: DatasetSplits, data: Sequence[Datum] | None = None, workers: int = 8) -> MaskSummary:
    """Decode the mask of every image of `data` (default: the training split) and refuse masks that cannot be
    used: unreadable files, masks of another shape than their image (made for another image, cropped or
    rotated), and an encoding that reads most masks as empty although they have non-zero pixels (e.g. 0/255
    masks read as label indices, where 255 means "ignore"). Raises `MaskError` listing the files and the fix;
    returns what the masks hold (empty and full masks are counted here, judged by `check_mask_files`)."""
    store = splits.masks
    if not isinstance(store, FileMaskStore):
        return MaskSummary(0)  # rendered data bring exact masks
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
    emptied = [f for f in with_pixels if f.foreground == 0.0]
    if with_pixels and 2 * len(emptied) > len(with_pixels):
        config = store.config
        shown = "\n  ".join(str(f.path) for f in emptied[:5])
        raise MaskError(
            f"{len(emptied)} of {len(with_pixels)} training masks have non-zero pixels but no foreground under "
            f"mask encoding {config.encoding!r} (ignore_as {config.ignore_as!r}), e.g.:\n  {shown}\n"
            "fix: choose the encoding of these files (--mask-encoding binary for 0/255 masks, index for label-id "
            "masks where 255 means ignore, auto to decide per mask); see promptclip.data.masks"
        )
    return MaskSummary(
        total=len(facts),
        empty=tuple((f.datum, f.path) for f in facts if f.foreground == 0.0),
        full=tuple((f.datum, f.path) for f in facts if f.foreground == 1.0),
        mean_foreground=float(np.mean([f.foreground for f in facts])) if facts else 0.0,
    )


def check_mask_files(splits: DatasetSplits, data: Sequence[Datum] | None = None, workers: int = 8) -> MaskSummary:
    """Before training, decode every training mask (`mask_summary`: unreadable masks, masks of another shape
    and an encoding that empties them are refused), and with fallback "error" refuse more empty or full masks
    than `max_empty_or_full` allows, listing them: DAPT would train on black foreground views (or black
    backgrounds). Returns the summary."""
    summary = mask_summary(splits, data, workers)
    store = splits.masks
    if isinstance(store, FileMaskStore) and store.config.fallback == "error":
        limit = store.config.max_empty_or_full
        if summary.too_many(limit):
            raise MaskError(
                f"{summary.empty_or_full} of {summary.total} training masks are empty ({len(summary.empty)}, no "
                f"foreground) or full ({len(summary.full)}, no background), more than max_empty_or_full {limit:g} "
                f"allows ({store.description}); DAPT would train on black foreground or background views:\n  "
                f"{summary.listed()}\n"
                "fix: regenerate these masks (or check the mask rule, folder and encoding); or, on purpose, mask "
                "fallback full (empty masks become all-foreground) or skip (those images leave the training "
                "split), or a larger max_empty_or_full (in a run: --opts plugins.dapt.mask.fallback full, "
                "plugins.dapt.mask.max_empty_or_full 0.5)"
            )
    return summary


def screen_masks(splits: DatasetSplits, workers: int = 8) -> tuple[DatasetSplits, MaskSummary]:
    """`check_mask_files` on the training split, then the mask fallback for empty and full masks: "full"
    reads every empty mask as all-foreground, "skip" leaves the images of empty and full masks out of the
    training split; "error" keeps the few that `max_empty_or_full` allows. Each case is a warning with the
    counts; the summary goes into `info["mask_summary"]`."""
    summary = check_mask_files(splits, workers=workers)
    store = splits.masks
    if not isinstance(store, FileMaskStore):
        return splits, summary
    info = {**splits.info, "mask_summary": summary.describe()}
    fallback = store.config.fallback
    changes: dict[str, object] = {}
    if fallback == "full" and summary.empty:
        store = dataclasses.replace(store, full_for=store.full_for | {datum.path for datum, _ in summary.empty})
        changes["masks"] = store
        info["masks_empty_as_full_train"] = len(summary.empty)
        logger.warning(
            "%d of %d training masks are empty (no foreground), read as all-foreground (mask fallback full), e.g. %s",
            len(summary.empty),
            summary.total,
            summary.empty[0][1],
        )
    elif fallback == "skip" and summary.empty_or_full:
        dropped = {datum.path for datum, _ in (*summary.empty, *summary.full)}
        changes["train"] = [datum for datum in splits.train if datum.path not in dropped]
        info["masks_empty_or_full_skipped_train"] = len(dropped)
        logger.warning(
            "%d of %d training images left out: their masks are empty (%d) or full (%d) (mask fallback skip)",
            len(dropped),
            len(splits.train),
            len(summary.empty),
            len(summary.full),
        )
    elif summary.empty_or_full:
        logger.warning(
            "%d of %d training masks are empty (%d) or full (%d), within max_empty_or_full %g; they are used as "
            "they are (black foreground or background views), e.g. %s",
            summary.empty_or_full,
            summary.total,
            len(summary.empty),
            len(summary.full),
            store.config.max_empty_or_full,
            (summary.empty or summary.full)[0][1],
        )
    return splits.replace(info=info, **changes), summary


def _mask_facts(splits: DatasetSplits, store: FileMaskStore, datum: Datum) -> _MaskFacts | None:
    path = store.find(datum)
    if path is None:
        return None  # missing masks are handled by attach_masks (error, full or skip)
    try:
        with Image.open(path) as image:
            image.load()
            values, mask_size = mask_values(image), image.size
    except Exception as err:  # PIL raises many kinds of errors for broken files
        return _MaskFacts(path, datum, f"cannot be read ({type(err).__name__}: {err})")
    try:
        with Image.open(splits.image_path(datum)) as image:
            image_size = image.size
    except Exception:  # an unreadable image is reported by the image check, not here
        image_size = mask_size
    if mask_size != image_size and not _same_shape(mask_size, image_size):
        return _MaskFacts(
            path,
            datum,
            f"{mask_size[0]}x{mask_size[1]} pixels, but its image {datum.path} is {image_size[0]}x{image_size[1]} "
            "(another shape)",
        )
    foreground = foreground_of(values, store.config.encoding, store.config.ignore_as)
    return _MaskFacts(path, datum, has_pixels=bool(values.any()), foreground=float(foreground.mean()))


def _same_shape(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - b[0] * a[1]) <= ASPECT_TOLERANCE * b[0] * a[1]
