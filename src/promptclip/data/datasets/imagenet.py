"""ImageNet and its four distribution-shift test sets (V2, Sketch, A, R).

All five look class names up in ImageNet's `classnames.txt` (lines `<wnid> <clean name>`, the CLIP names),
which each dataset folder holds a copy of (or which is found in the sibling `imagenet/` folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from promptclip.data.datasets.base import (
    DatasetBuilder,
    DatasetError,
    Datum,
    ExpectedLayout,
    RawSplits,
    RequiredFile,
    is_image_name,
    join_posix,
    list_visible,
    read_text_lines,
    register,
)

CLASSNAMES_FILE = "classnames.txt"


def read_imagenet_classnames(path: Path) -> dict[str, str]:
    """wnid -> class name, in file order (the file lists the 1000 wnids sorted)."""
    fix = "copy ImageNet's classnames.txt (see docs/datasets.md) into the dataset folder"
    names: dict[str, str] = {}
    for line in read_text_lines(path, fix):
        wnid, _, name = line.partition(" ")
        if not name:
            raise DatasetError(f"{path}: line {line!r} is not `<wnid> <class name>`")
        names[wnid] = name.strip()
    return names


def list_class_folders(top: Path) -> list[str]:
    """The sorted sub-folders of `top` (files such as README.txt are left out)."""
    return [name for name in list_visible(top) if (top / name).is_dir()]


def images_of_folders(image_dir: str, top: Path, folders: list[str], names: list[str]) -> list[Datum]:
    """Every image below `top/<folder>`, labelled by the folder's position in `folders`."""
    data = []
    for label, folder in enumerate(folders):
        for image in list_visible(top / folder):
            if is_image_name(image):
                data.append(Datum(join_posix(image_dir, folder, image), label, names[label]))
    return data


class ImageNetFamily(DatasetBuilder):
    """Shared reading of `classnames.txt` for ImageNet and its variants."""

    template: ClassVar[str] = "a photo of a {}."

    def classnames_file(self, dataset_dir: Path) -> Path:
        own = dataset_dir / CLASSNAMES_FILE
        sibling = dataset_dir.parent / "imagenet" / CLASSNAMES_FILE
        return own if own.is_file() or not sibling.is_file() else sibling

    def names_for(self, wnids: list[str], table: dict[str, str], where: Path) -> list[str]:
        unknown = [wnid for wnid in wnids if wnid not in table]
        if unknown:
            raise DatasetError(
                f"{len(unknown)} class folders of {where} are not in {CLASSNAMES_FILE} (e.g. {unknown[:5]}); "
                "use the 1000-class classnames.txt of ImageNet"
            )
        return [table[wnid] for wnid in wnids]


@register
class ImageNet(ImageNetFamily):
    """ImageNet-1k: 1000 classes (val used as test, no val split), template 'a photo of a {}.'"""

    name: ClassVar[str] = "imagenet"
    dataset_dir: ClassVar[str] = "imagenet"
    image_dir: ClassVar[str] = "images"
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(1000, {"train": 1281167, "val": 0, "test": 50000})
    official_mask_layout: ClassVar[str] = "mirror"

    def required_files(self) -> list[RequiredFile]:
        fix = "put the ILSVRC-2012 train and val images in images/train/<wnid>/ and images/val/<wnid>/"
        return [
            RequiredFile("images/train", "training images", fix, is_dir=True),
            RequiredFile("images/val", "validation images (the test split)", fix, is_dir=True),
            RequiredFile(CLASSNAMES_FILE, "class names", "copy classnames.txt (see docs/datasets.md) here"),
        ]

    def read(self, dataset_dir: Path) -> RawSplits:
        table = read_imagenet_classnames(self.classnames_file(dataset_dir))
        top = dataset_dir / self.image_dir
        train_folders = list_class_folders(top / "train")
        test_folders = list_class_folders(top / "val")
        if train_folders != test_folders:
            only = sorted(set(train_folders) ^ set(test_folders))
            raise DatasetError(
                f"{top}/train and {top}/val hold different class folders (e.g. {only[:5]}); "
                "both need the same wnid folders"
            )
        names = self.names_for(train_folders, table, top / "train")
        train = images_of_folders(join_posix(self.image_dir, "train"), top / "train", train_folders, names)
        test = images_of_folders(join_posix(self.image_dir, "val"), top / "val", test_folders, names)
        # The field evaluates on val and reuses it as "val"; a separate val split does not exist.
        return RawSplits(train, [], test, names, source="folders images/train, images/val")


@register
class ImageNetV2(ImageNetFamily):
    """ImageNet-V2 (matched frequency): 1000 classes, test only, template 'a photo of a {}.'"""

    name: ClassVar[str] = "imagenetv2"
    dataset_dir: ClassVar[str] = "imagenetv2"
    image_dir: ClassVar[str] = "imagenetv2-matched-frequency-format-val"
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(1000, {"train": 0, "val": 0, "test": 10000})

    def read(self, dataset_dir: Path) -> RawSplits:
        table = read_imagenet_classnames(self.classnames_file(dataset_dir))
        names = list(table.values())  # folder i holds class i of the (sorted-wnid) classnames.txt order
        top = dataset_dir / self.image_dir
        folders = [name for name in list_class_folders(top) if name.isdigit()]
        out_of_range = [name for name in folders if int(name) >= len(names)]
        if out_of_range:
            raise DatasetError(f"{top}: folders {out_of_range[:5]} exceed the {len(names)} classes of classnames")
        test = []
        for folder in sorted(folders, key=int):
            label = int(folder)
            for image in list_visible(top / folder):
                if is_image_name(image):
                    test.append(Datum(join_posix(self.image_dir, folder, image), label, names[label]))
        return RawSplits([], [], test, names, source="numeric folders 0..999")


class WnidFolderTestSet(ImageNetFamily):
    """A test-only ImageNet variant laid out as `<image_dir>/<wnid>/*`, labelled by sorted folder order."""

    def read(self, dataset_dir: Path) -> RawSplits:
        table = read_imagenet_classnames(self.classnames_file(dataset_dir))
        top = dataset_dir / self.image_dir
        folders = list_class_folders(top)
        names = self.names_for(folders, table, top)
        test = images_of_folders(self.image_dir, top, folders, names)
        return RawSplits([], [], test, names, source=f"{len(folders)} wnid folders")


@register
class ImageNetSketch(WnidFolderTestSet):
    """ImageNet-Sketch: 1000 classes, test only, template 'a photo of a {}.'"""

    name: ClassVar[str] = "imagenet_sketch"
    dataset_dir: ClassVar[str] = "imagenet-sketch"
    image_dir: ClassVar[str] = "images"
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(1000, {"train": 0, "val": 0, "test": 50889})


@register
class ImageNetA(WnidFolderTestSet):
    """ImageNet-A: 200-class subset (its wnid folders, sorted), test only, template 'a photo of a {}.'"""

    name: ClassVar[str] = "imagenet_a"
    dataset_dir: ClassVar[str] = "imagenet-adversarial"
    image_dir: ClassVar[str] = "imagenet-a"
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(200, {"train": 0, "val": 0, "test": 7500})


@register
class ImageNetR(WnidFolderTestSet):
    """ImageNet-R: 200-class subset (its wnid folders, sorted), test only, template 'a photo of a {}.'"""

    name: ClassVar[str] = "imagenet_r"
    dataset_dir: ClassVar[str] = "imagenet-rendition"
    image_dir: ClassVar[str] = "imagenet-r"
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(200, {"train": 0, "val": 0, "test": 30000})
