"""File and folder helpers of the dataset readers: text and MATLAB files, class folders, image names, and
seeded per-class splits of data that come without a split file."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from promptclip.data.datasets.core import DatasetError, Datum


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file in the same folder, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def join_posix(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part and part.strip("/"))


def list_visible(folder: Path) -> list[str]:
    """Sorted entry names of a folder, hidden entries (dot files) left out, as the field lists folders."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def scan_class_folders(
    dataset_dir: Path,
    image_dir: str,
    ignored: Iterable[str] = (),
    renames: dict[str, str] | None = None,
) -> tuple[list[Datum], list[str]]:
    """Every image of a folder-per-class tree, labelled by the sorted folder names (the field's rule).

    `ignored` folders are left out before labelling; `renames` maps a folder name to its class name.
    """
    top = dataset_dir / image_dir if image_dir else dataset_dir
    skip = set(ignored)
    folders = [name for name in list_visible(top) if name not in skip and (top / name).is_dir()]
    renames = renames or {}
    data: list[Datum] = []
    for label, folder in enumerate(folders):
        classname = renames.get(folder, folder)
        for name in list_visible(top / folder):
            if is_image_name(name):
                data.append(Datum(join_posix(image_dir, folder, name), label, classname))
    return data, [renames.get(folder, folder) for folder in folders]


def read_text_lines(path: Path, fix: str) -> list[str]:
    """The stripped, non-empty lines of a text file of the dataset; a missing file is a `DatasetError`."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing; {fix}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_mat(path: Path, fix: str) -> dict[str, Any]:
    """Read a MATLAB .mat file (needs scipy, used only to build a split from raw annotation files)."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing; {fix}")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DatasetError(
            f"reading {path} needs scipy (`pip install scipy`); or download the dataset's split file"
        ) from None
    return loadmat(str(path))


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def split_per_class(
    data: Sequence[Datum],
    fractions: tuple[float, float, float],
    rng: random.Random,
) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """Shuffle each class (in order of first appearance) and cut it into train/val/test by `fractions`.

    Rounding follows the field (`round(n * p)` for train and val, the rest to test); tiny classes keep one
    image for training first, then one for test, then one for val.
    """
    by_label: dict[int, list[Datum]] = {}
    for datum in data:
        by_label.setdefault(datum.label, []).append(datum)
    train: list[Datum] = []
    val: list[Datum] = []
    test: list[Datum] = []
    for items in by_label.values():
        items = list(items)
        rng.shuffle(items)
        n_train, n_val = _split_counts(len(items), fractions)
        train += items[:n_train]
        val += items[n_train : n_train + n_val]
        test += items[n_train + n_val :]
    return train, val, test


def _split_counts(total: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    p_train, p_val, p_test = fractions
    n_train = min(total, max(1, round(total * p_train)))
    n_val = min(total - n_train, round(total * p_val))
    if p_test > 0 and total - n_train - n_val == 0 and n_val > 0 and total >= 3:
        n_val -= 1  # keep one image for test before keeping one for val
    if p_test > 0 and total == 2:
        n_train, n_val = 1, 0
    return n_train, n_val


def split_trainval(
    trainval: Sequence[Datum], val_fraction: float, rng: random.Random
) -> tuple[list[Datum], list[Datum]]:
    """The field's train/val division of an official trainval list.

    Per label, in order of first appearance: shuffle, the first round(n * p) go to val, the rest to train.
    """
    by_label: dict[int, list[Datum]] = {}
    for datum in trainval:
        by_label.setdefault(datum.label, []).append(datum)
    train: list[Datum] = []
    val: list[Datum] = []
    for items in by_label.values():
        items = list(items)
        rng.shuffle(items)
        n_val = round(len(items) * val_fraction)
        val += items[:n_val]
        train += items[n_val:]
    return train, val
