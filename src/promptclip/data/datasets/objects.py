"""Caltech-101 (CoOp layout: `caltech-101/101_ObjectCategories/<category>/*.jpg` + `split_zhou_Caltech101.json`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import ClassVar

from promptclip.data.datasets.base import (
    ExpectedLayout,
    RawSplits,
    SplitFileDataset,
    register,
    scan_class_folders,
    split_per_class,
)

# The field leaves out the two background/face-duplicate categories and singularises four folder names.
CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

# The field's per-class fractions when it builds a split from a folder tree.
FIFTY_TWENTY_THIRTY = (0.5, 0.2, 0.3)


@register
class Caltech101(SplitFileDataset):
    """Caltech-101: 100 object classes, template 'a photo of a {}.'"""

    name: ClassVar[str] = "caltech101"
    dataset_dir: ClassVar[str] = "caltech-101"
    image_dir: ClassVar[str] = "101_ObjectCategories"
    split_file: ClassVar[str] = "split_zhou_Caltech101.json"
    template: ClassVar[str] = "a photo of a {}."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(100, {"train": 4128, "val": 1649, "test": 2465})
    official_mask_layout: ClassVar[str] = "last2"

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        data, names = scan_class_folders(dataset_dir, self.image_dir, CALTECH_IGNORED, CALTECH_RENAMES)
        train, val, test = split_per_class(data, FIFTY_TWENTY_THIRTY, rng)
        return RawSplits(train, val, test, names, source=f"folders split 50/20/30, seed {self.split_seed}")
