"""The registered datasets. Importing this package registers every dataset in `promptclip.registry.DATASETS`.

Entry points: `build_dataset(name, root, **options)` -> `DatasetSplits`; `Datum`; `DatasetError`;
`dataset_display_name` and `dataset_identity`, what a run calls its data before reading them.
"""

from promptclip.data.datasets import (  # noqa: F401  (imported for their registrations)
    actions,
    custom,
    fine_grained,
    imagenet,
    objects,
    satellite,
    scenes,
    synthetic_world,
    textures,
)
from promptclip.data.datasets.base import (
    SPLIT_NAMES,
    DatasetBuilder,
    DatasetError,
    DatasetSplits,
    Datum,
    ExpectedLayout,
    build_dataset,
    builder_options,
    dataset_display_name,
    dataset_identity,
    make_builder,
    read_split_file,
    write_split_file,
)

__all__ = [
    "SPLIT_NAMES",
    "DatasetBuilder",
    "DatasetError",
    "DatasetSplits",
    "Datum",
    "ExpectedLayout",
    "build_dataset",
    "builder_options",
    "dataset_display_name",
    "dataset_identity",
    "make_builder",
    "read_split_file",
    "write_split_file",
]
