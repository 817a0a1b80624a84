"""EuroSAT RGB (`eurosat/2750/<class>/*.jpg` + `split_zhou_EuroSAT.json`)."""

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

# The field's readable names for the ten EuroSAT folders.
EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


@register
class EuroSAT(SplitFileDataset):
    """EuroSAT: 10 land-use classes, template 'a centered satellite photo of {}.'"""

    name: ClassVar[str] = "eurosat"
    dataset_dir: ClassVar[str] = "eurosat"
    image_dir: ClassVar[str] = "2750"
    split_file: ClassVar[str] = "split_zhou_EuroSAT.json"
    template: ClassVar[str] = "a centered satellite photo of {}."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout(10, {"train": 13500, "val": 5400, "test": 8100})
    official_mask_layout: ClassVar[str] = "last2"

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        data, names = scan_class_folders(dataset_dir, self.image_dir, renames=EUROSAT_RENAMES)
        train, val, test = split_per_class(data, FIFTY_TWENTY_THIRTY, rng)
        return RawSplits(train, val, test, names, source=f"folders split 50/20/30, seed {self.split_seed}")
