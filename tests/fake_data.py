"""Tiny fake dataset trees that mimic the real layouts, shared by the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, colour: tuple[int, int, int] = (120, 60, 30), size: tuple[int, int] = (8, 8)) -> Path:
    """A small solid image; the format follows the extension (PNG, JPEG, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_array_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_split_json(path: Path, train: list, val: list, test: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": train, "val": val, "test": test}), encoding="utf-8")
    return path


def class_folder_tree(top: Path, classes: list[str], per_class: int, ext: str = ".jpg") -> None:
    """`top/<class>/img_<i><ext>` for every class."""
    for index, name in enumerate(classes):
        for i in range(per_class):
            write_image(top / name / f"img_{i:03d}{ext}", colour=(index * 20 % 256, i * 10 % 256, 90))


def caltech_with_split(root: Path, classes: list[str], per_split: tuple[int, int, int]) -> Path:
    """`root/caltech-101/` with images and a split file holding `per_split` images per class and split.

    The split lists interleave the classes in reverse label order (..., b, a, ..., b, a), so that grouping
    by "order of first appearance" differs from grouping by sorted label.
    """
    dataset = root / "caltech-101"
    rows: dict[str, list] = {"train": [], "val": [], "test": []}
    for split, count in zip(("train", "val", "test"), per_split, strict=True):
        for i in range(count):
            for label, name in reversed(list(enumerate(classes))):
                relative = f"{name}/{split}_{i:03d}.jpg"
                write_image(dataset / "101_ObjectCategories" / relative, colour=(label * 30 % 256, i, 5))
                rows[split].append([relative, label, name])
    write_split_json(dataset / "split_zhou_Caltech101.json", rows["train"], rows["val"], rows["test"])
    return dataset
