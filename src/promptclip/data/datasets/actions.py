"""UCF101 middle frames (`ucf101/UCF-101-midframes/<Action_Name>/*.jpg` + `split_zhou_UCF101.json`)."""

from __future__ import annotations

import random
import re
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


def split_camel_case(action: str) -> str:
    """`ApplyEyeMakeup` -> `Apply_Eye_Makeup`: the field's folder and class name of a UCF101 action."""
    return "_".join(re.findall(r"[A-Z][^A-Z]*", action))


@register
class UCF101(SplitFileDataset):
    """UCF101: 101 action classes (middle frames), template 'a photo of a person doing {}.'"""

    name: ClassVar[str] = "ucf101"
    dataset_dir: ClassVar[str] = "ucf101"
    image_dir: ClassVar[str] = "UCF-101-midframes"
    split_file: ClassVar[str] = "split_zhou_UCF101.json"
    template: ClassVar[str] = "a photo of a person doing {}."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(101, {"train": 7639, "val": 1898, "test": 3783})
    official_mask_layout: ClassVar[str] = "last2"

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        fix = "unpack UCF101's ucfTrainTestlist/ folder into the dataset folder"
        lists = dataset_dir / "ucfTrainTestlist"
        label_of: dict[str, int] = {}
        for line in read_text_lines(lists / "classInd.txt", fix):
            number, action = line.split()[:2]
            label_of[action] = int(number) - 1
        trainval = self._read_list(lists / "trainlist01.txt", label_of, fix)
        test = self._read_list(lists / "testlist01.txt", label_of, fix)
        train, val = split_trainval(trainval, 0.2, rng)
        names = [split_camel_case(action) for action, _ in sorted(label_of.items(), key=lambda item: item[1])]
        return RawSplits(train, val, test, names, source=f"trainlist01/testlist01, seed {self.split_seed}")

    def _read_list(self, path: Path, label_of: dict[str, int], fix: str) -> list[Datum]:
        data = []
        for line in read_text_lines(path, fix):
            action, video = line.split()[0].split("/")
            if action not in label_of:
                raise DatasetError(f"{path}: action {action!r} is not listed in classInd.txt")
            folder = split_camel_case(action)
            frame = video.replace(".avi", ".jpg")
            data.append(Datum(join_posix(self.image_dir, folder, frame), label_of[action], folder))
        return data
