"""DTD, the Describable Textures Dataset (`dtd/images/<texture>/*.jpg` + `split_zhou_DescribableTextures.json`)."""

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
from promptclip.data.datasets.objects import FIFTY_TWENTY_THIRTY


@register
class DTD(SplitFileDataset):
    """DTD: 47 texture classes, template '{} texture.'"""

    name: ClassVar[str] = "dtd"
    dataset_dir: ClassVar[str] = "dtd"
    image_dir: ClassVar[str] = "images"
    split_file: ClassVar[str] = "split_zhou_DescribableTextures.json"
    template: ClassVar[str] = "{} texture."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(47, {"train": 2820, "val": 1128, "test": 1692})
    official_mask_layout: ClassVar[str] = "last2"

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        data, names = scan_class_folders(dataset_dir, self.image_dir)
        train, val, test = split_per_class(data, FIFTY_TWENTY_THIRTY, rng)
        return RawSplits(train, val, test, names, source=f"folders split 50/20/30, seed {self.split_seed}")
