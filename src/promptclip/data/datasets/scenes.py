"""SUN397 (`sun397/SUN397/<letter>/<scene>[/<kind>]/*.jpg` + `split_zhou_SUN397.json`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import ClassVar

from promptclip.data.datasets.base import (
    DatasetError,
    Datum,
    ExpectedLayout,
    RawSplits,
    SplitFileDataset,
    join_posix,
    read_text_lines,
    register,
    split_trainval,
)


def sun397_classname(category: str) -> str:
    """`c/church/indoor` -> `indoor church`: drop the letter folder, put qualifiers (indoor/outdoor) first."""
    return " ".join(category.strip("/").split("/")[1:][::-1])


@register
class SUN397(SplitFileDataset):
    """SUN397: 397 scene classes, template 'a photo of a {}.'"""

    name: ClassVar[str] = "sun397"
    dataset_dir: ClassVar[str] = "sun397"
    image_dir: ClassVar[str] = "SUN397"
    split_file: ClassVar[str] = "split_zhou_SUN397.json"
    template: ClassVar[str] = "a photo of a {}."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(397, {"train": 15880, "val": 3970, "test": 19850})
    official_mask_layout: ClassVar[str] = "mirror"

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        fix = "put SUN397's ClassName.txt, Training_01.txt and Testing_01.txt (Partitions) in the dataset folder"
        categories = [line.lstrip("/") for line in read_text_lines(dataset_dir / "ClassName.txt", fix)]
        label_of = {category: label for label, category in enumerate(categories)}
        trainval = self._read_list(dataset_dir / "Training_01.txt", label_of, fix)
        test = self._read_list(dataset_dir / "Testing_01.txt", label_of, fix)
        train, val = split_trainval(trainval, 0.2, rng)
        names = [sun397_classname(category) for category in categories]
        return RawSplits(train, val, test, names, source=f"Training_01/Testing_01, seed {self.split_seed}")

    def _read_list(self, path: Path, label_of: dict[str, int], fix: str) -> list[Datum]:
        data = []
        for line in read_text_lines(path, fix):
            relative = line.lstrip("/")
            category = relative.rsplit("/", 1)[0]
            if category not in label_of:
                raise DatasetError(f"{path}: {line!r} is in class {category!r}, which ClassName.txt does not list")
            data.append(Datum(join_posix(self.image_dir, relative), label_of[category], sun397_classname(category)))
        return data
