"""Fine-grained datasets: Oxford Pets, Stanford Cars, Oxford Flowers, Food-101 and FGVC-Aircraft."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import ClassVar

from promptclip.data.datasets.base import (
    DatasetBuilder,
    DatasetError,
    Datum,
    ExpectedLayout,
    RawSplits,
    RequiredFile,
    SplitFileDataset,
    join_posix,
    load_mat,
    read_text_lines,
    register,
    scan_class_folders,
    split_per_class,
    split_trainval,
)
from promptclip.data.datasets.objects import FIFTY_TWENTY_THIRTY


def pet_breed(image_name: str) -> str:
    """`Great_Pyrenees_101` -> `great_pyrenees`: the breed is the file name without its number, lower-cased."""
    return "_".join(image_name.split("_")[:-1]).lower()


def car_classname(name: str) -> str:
    """`Tesla Model S Sedan 2012` -> `2012 Tesla Model S Sedan`: the field moves the year to the front."""
    words = name.split(" ")
    return " ".join([words[-1], *words[:-1]])


@register
class OxfordPets(SplitFileDataset):
    """Oxford-IIIT Pets: 37 breeds, template 'a photo of a {}, a type of pet.'"""

    name: ClassVar[str] = "oxford_pets"
    dataset_dir: ClassVar[str] = "oxford_pets"
    image_dir: ClassVar[str] = "images"
    split_file: ClassVar[str] = "split_zhou_OxfordPets.json"
    template: ClassVar[str] = "a photo of a {}, a type of pet."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(37, {"train": 2944, "val": 736, "test": 3669})
    official_mask_layout: ClassVar[str] = "basename"

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        trainval = self._read_list(dataset_dir / "annotations" / "trainval.txt")
        test = self._read_list(dataset_dir / "annotations" / "test.txt")
        train, val = split_trainval(trainval, 0.2, rng)
        return RawSplits(train, val, test, source=f"annotations trainval/test, seed {self.split_seed}")

    def _read_list(self, path: Path) -> list[Datum]:
        data = []
        fix = "unpack annotations.tar.gz into the dataset folder (it holds annotations/trainval.txt and test.txt)"
        for line in read_text_lines(path, fix):
            if line.startswith("#"):
                continue
            image, class_id = line.split()[:2]
            data.append(Datum(join_posix(self.image_dir, image + ".jpg"), int(class_id) - 1, pet_breed(image)))
        return data


@register
class StanfordCars(SplitFileDataset):
    """Stanford Cars: 196 car models, template 'a photo of a {}.'"""

    name: ClassVar[str] = "stanford_cars"
    dataset_dir: ClassVar[str] = "stanford_cars"
    image_dir: ClassVar[str] = ""  # split-file paths start at the dataset folder (cars_train/..., cars_test/...)
    split_file: ClassVar[str] = "split_zhou_StanfordCars.json"
    template: ClassVar[str] = "a photo of a {}."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(196, {"train": 6509, "val": 1635, "test": 8041})
    official_mask_layout: ClassVar[str] = "basename"

    def required_files(self) -> list[RequiredFile]:
        fix = "unpack cars_train.tgz and cars_test.tgz into the dataset folder"
        folders = [RequiredFile(name, "image folder", fix, is_dir=True) for name in ("cars_train", "cars_test")]
        return folders + super().required_files()

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        fix = "unpack car_devkit.tgz (devkit/) and put cars_test_annos_withlabels.mat in the dataset folder"
        meta = load_mat(dataset_dir / "devkit" / "cars_meta.mat", fix)["class_names"][0]
        names = [car_classname(str(entry[0])) for entry in meta]
        trainval = self._read_annotations(dataset_dir / "devkit" / "cars_train_annos.mat", "cars_train", names, fix)
        test = self._read_annotations(dataset_dir / "cars_test_annos_withlabels.mat", "cars_test", names, fix)
        train, val = split_trainval(trainval, 0.2, rng)
        return RawSplits(train, val, test, names, source=f"devkit annotations, seed {self.split_seed}")

    @staticmethod
    def _read_annotations(path: Path, folder: str, names: list[str], fix: str) -> list[Datum]:
        data = []
        for entry in load_mat(path, fix)["annotations"][0]:
            label = int(entry["class"][0, 0]) - 1
            data.append(Datum(join_posix(folder, str(entry["fname"][0])), label, names[label]))
        return data


@register
class OxfordFlowers(SplitFileDataset):
    """Oxford Flowers-102: 102 flower species, template 'a photo of a {}, a type of flower.'"""

    name: ClassVar[str] = "oxford_flowers"
    dataset_dir: ClassVar[str] = "oxford_flowers"
    image_dir: ClassVar[str] = "jpg"
    split_file: ClassVar[str] = "split_zhou_OxfordFlowers.json"
    template: ClassVar[str] = "a photo of a {}, a type of flower."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(102, {"train": 4093, "val": 1633, "test": 2463})
    official_mask_layout: ClassVar[str] = "basename"

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        fix = "put imagelabels.mat and cat_to_name.json (see docs/datasets.md) in the dataset folder"
        labels = load_mat(dataset_dir / "imagelabels.mat", fix)["labels"][0]
        names_file = dataset_dir / "cat_to_name.json"
        if not names_file.is_file():
            raise DatasetError(f"{names_file} is missing; {fix}")
        name_of = json.loads(names_file.read_text(encoding="utf-8"))
        data = []
        for index, label in enumerate(labels):
            image = join_posix(self.image_dir, f"image_{index + 1:05d}.jpg")
            data.append(Datum(image, int(label) - 1, name_of[str(int(label))]))
        train, val, test = split_per_class(data, FIFTY_TWENTY_THIRTY, rng)
        names = [name_of[str(label)] for label in range(1, len(name_of) + 1)]
        return RawSplits(train, val, test, names, source=f"imagelabels.mat split 50/20/30, seed {self.split_seed}")


@register
class Food101(SplitFileDataset):
    """Food-101: 101 dishes, template 'a photo of {}, a type of food.'"""

    name: ClassVar[str] = "food101"
    dataset_dir: ClassVar[str] = "food-101"
    image_dir: ClassVar[str] = "images"
    split_file: ClassVar[str] = "split_zhou_Food101.json"
    template: ClassVar[str] = "a photo of {}, a type of food."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(101, {"train": 50500, "val": 20200, "test": 30300})
    official_mask_layout: ClassVar[str] = "last2"

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        data, names = scan_class_folders(dataset_dir, self.image_dir)
        train, val, test = split_per_class(data, FIFTY_TWENTY_THIRTY, rng)
        return RawSplits(train, val, test, names, source=f"folders split 50/20/30, seed {self.split_seed}")


@register
class FGVCAircraft(DatasetBuilder):
    """FGVC-Aircraft: 100 aircraft variants, template 'a photo of a {}, a type of aircraft.'"""

    name: ClassVar[str] = "fgvc_aircraft"
    dataset_dir: ClassVar[str] = "fgvc_aircraft"
    image_dir: ClassVar[str] = "images"
    template: ClassVar[str] = "a photo of a {}, a type of aircraft."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(100, {"train": 3334, "val": 3333, "test": 3333})
    official_mask_layout: ClassVar[str] = "basename"
    # The field reads the official variant lists directly; there is no split_zhou file for this dataset.
    LIST_FILES: ClassVar[dict[str, str]] = {
        "train": "images_variant_train.txt",
        "val": "images_variant_val.txt",
        "test": "images_variant_test.txt",
    }

    def required_files(self) -> list[RequiredFile]:
        fix = "move the `data/` folder of fgvc-aircraft-2013b.tar.gz to <root>/fgvc_aircraft/"
        lists = ["variants.txt", *self.LIST_FILES.values()]
        return super().required_files() + [RequiredFile(name, "official list file", fix) for name in lists]

    def read(self, dataset_dir: Path) -> RawSplits:
        fix = "move the `data/` folder of fgvc-aircraft-2013b.tar.gz to <root>/fgvc_aircraft/"
        names = read_text_lines(dataset_dir / "variants.txt", fix)
        label_of = {name: label for label, name in enumerate(names)}
        splits = {}
        for split, list_name in self.LIST_FILES.items():
            path = dataset_dir / list_name
            splits[split] = [self._parse_line(path, line, label_of) for line in read_text_lines(path, fix)]
        return RawSplits(splits["train"], splits["val"], splits["test"], names, source="images_variant_*.txt")

    def _parse_line(self, path: Path, line: str, label_of: dict[str, int]) -> Datum:
        image, _, variant = line.partition(" ")
        if variant not in label_of:
            raise DatasetError(f"{path}: variant {variant!r} of image {image} is not listed in variants.txt")
        return Datum(join_posix(self.image_dir, image + ".jpg"), label_of[variant], variant)
