"""The dataset abstraction shared by every dataset: `Datum`, `DatasetSplits` and the builder base class.

A dataset is read into a `DatasetSplits`: three lists of `Datum` (train, val, test) whose paths are relative to
the dataset folder, the class names that go into prompts, the dataset's prompt template, and the sources that
turn a `Datum` into pixels (files on disk, or the renderer for synthetic data) and, optionally, into a mask.

Builders (one class per dataset, registered in `promptclip.registry.DATASETS`) know the folder layout of one
dataset. `build_dataset(name, root, **options)` is the single entry point.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal, Protocol

from PIL import Image

from promptclip.classnames import prompt_names
from promptclip.clip.pixels import to_rgb
from promptclip.data.datasets.core import DatasetError, Datum
from promptclip.data.datasets.files import (  # noqa: F401  (re-exported: readers import them from base)
    IMAGE_EXTENSIONS,
    _split_counts,
    is_image_name,
    join_posix,
    list_visible,
    load_mat,
    read_text_lines,
    scan_class_folders,
    split_per_class,
    split_trainval,
    write_text_atomic,
)
from promptclip.data.datasets.labels import (
    check_distinct_names,
    check_labels,
    classnames_from_data,
)
from promptclip.registry import DATASETS

SplitName = Literal["train", "val", "test"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "val", "test")

# Where the field's split files are published (CoOp's DATASETS.md links each `split_zhou_*.json`).
SPLIT_FILES_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class ExpectedLayout:
    """What a complete copy of a dataset holds, for `promptclip data check`."""

    num_classes: int | None = None
    sizes: dict[str, int] | None = None


class ImageReader(Protocol):
    def load_image(self, datum: Datum) -> Image.Image: ...


class MaskSource(Protocol):
    """Anything that maps a `Datum` to a binary mask image (mode "L", 0 = background, 255 = foreground)."""

    description: str

    def load(self, datum: Datum) -> Image.Image | None: ...

    def missing(self, data: Sequence[Datum]) -> list[Datum]: ...


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file fully and return it as 8-bit RGB, whatever its mode (16-bit and float grey
    scaled, transparency composited on white: `promptclip.clip.pixels.to_rgb`)."""
    with Image.open(path) as image:
        image.load()
        rgb = to_rgb(image)  # while the file is open: a TIFF's declared bit depth is read from its tags
        return rgb.copy() if rgb is image else rgb


@dataclass(frozen=True)
class FileImageReader:
    """Reads `root / datum.path` from disk."""

    root: Path

    def load_image(self, datum: Datum) -> Image.Image:
        return open_rgb(resolve_inside(self.root, datum.path))


def path_escapes_root(relative: str) -> bool:
    """True when a dataset-relative path is absolute or climbs above the dataset folder."""
    if not relative:
        return True
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", relative):
        return True
    depth = 0
    for part in pure.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def resolve_inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing paths that leave `root` (a split file must not point outside the data)."""
    if path_escapes_root(relative):
        raise DatasetError(
            f"image path {relative!r} leaves the dataset folder {root}; split files must hold paths relative "
            "to the dataset folder. Fix the entry (run `promptclip data check` to list all of them)."
        )
    return root / relative


@dataclass
class DatasetSplits:
    """A dataset read into train/val/test lists, with what is needed to load and prompt it.

    `classnames[i]` is the prompt-ready name of label `i` (underscores turned into spaces, as the field's
    trainers do). `image_dir` is the folder below `root` that holds the images: mask rules mirror image paths
    below it. `name` is the registered dataset (what `--dataset` takes); `display_name` is what the data go
    by in run folders and reports: the same for the field's datasets, the user's own name for own data
    (see `dataset_display_name`).
    """

    name: str
    root: Path | None
    classnames: list[str]
    template: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    image_dir: str = ""
    reader: ImageReader | None = None
    masks: MaskSource | None = None
    expected: ExpectedLayout = field(default_factory=ExpectedLayout)
    official_mask_layout: str = "mirror"
    info: dict[str, Any] = field(default_factory=dict)
    display_name: str = ""

    def __post_init__(self) -> None:
        if not self.display_name:
            self.display_name = self.name

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, which: SplitName) -> list[Datum]:
        if which not in SPLIT_NAMES:
            raise ValueError(f"unknown split {which!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, which)

    def sizes(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLIT_NAMES}

    def replace(self, **changes: Any) -> DatasetSplits:
        """A copy with some fields changed (the `info` dict is copied, never shared)."""
        changes.setdefault("info", dict(self.info))
        return dataclasses.replace(self, **changes)

    def image_path(self, datum: Datum) -> Path:
        if self.root is None:
            raise DatasetError(f"dataset {self.name!r} has no folder on disk; {datum.path!r} is a virtual id")
        return resolve_inside(self.root, datum.path)

    def load_image(self, datum: Datum) -> Image.Image:
        """The RGB image of `datum`."""
        if self.reader is not None:
            return self.reader.load_image(datum)
        return open_rgb(self.image_path(datum))

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def load_mask(self, datum: Datum) -> Image.Image | None:
        """The binary mask of `datum` (mode "L", 0/255), or None without a mask source or with fallback "full"."""
        return None if self.masks is None else self.masks.load(datum)

    def prompts(self) -> list[str]:
        """The hand-crafted prompt of every class (the template filled with each class name)."""
        return [self.template.format(name) for name in self.classnames]


def read_split_file(path: Path, image_dir: str) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """Read a field split file: `{"train"|"val"|"test": [[path below image_dir, label, classname], ...]}`."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path} is not valid JSON ({err}); download the file again from {SPLIT_FILES_URL}"
        ) from None
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: expected an object with keys train/val/test, got {type(content).__name__}")
    splits = []
    for name in SPLIT_NAMES:
        rows = content.get(name)
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: key {name!r} is missing or not a list of [path, label, classname]")
        splits.append([_split_row_to_datum(path, name, i, row, image_dir) for i, row in enumerate(rows)])
    return splits[0], splits[1], splits[2]


def _split_row_to_datum(path: Path, split: str, index: int, row: Any, image_dir: str) -> Datum:
    if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[2], str)):
        raise DatasetError(f"{path}: {split}[{index}] = {row!r} is not [relative path, label, classname]")
    try:
        label = int(row[1])
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: {split}[{index}] has label {row[1]!r}, which is not an integer") from None
    # An absolute path is kept as written, so that `data check` can report it instead of hiding it.
    absolute = row[0].startswith("/") or re.match(r"^[A-Za-z]:", row[0])
    return Datum(row[0] if absolute else join_posix(image_dir, row[0]), label, row[2])


def write_split_file(path: Path, splits: DatasetSplits) -> None:
    """Write `splits` in the field's split-file format (paths below `image_dir`), atomically."""
    prefix = splits.image_dir.rstrip("/") + "/" if splits.image_dir else ""

    def rows(data: list[Datum]) -> list[list[Any]]:
        return [[d.path[len(prefix) :] if d.path.startswith(prefix) else d.path, d.label, d.classname] for d in data]

    payload = {name: rows(splits.split(name)) for name in SPLIT_NAMES}
    write_text_atomic(path, json.dumps(payload))


@dataclass(frozen=True)
class RequiredFile:
    """A file or folder a dataset needs, with the fix to give when it is absent."""

    relative: str
    what: str
    fix: str
    is_dir: bool = False


@dataclass(frozen=True)
class RawSplits:
    """What a builder's reader returns before the common finishing steps."""

    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str] | None = None  # raw names; derived from the data when None
    source: str = ""  # where the split came from, recorded in `DatasetSplits.info`
    origin: str = ""  # the file (or folder) the labels come from, named in errors; the dataset folder if ""
    keys: list[str] | None = None  # what the data call each label (class folders, CSV labels), for messages


class DatasetBuilder:
    """Base class of the registered datasets (a subclass reads one folder layout).

    Subclasses set the class attributes and implement `read`; options are keyword arguments of `__init__`
    (given as `build_dataset(name, root, key=value)` or `--set key=value` on the command line).
    """

    name: ClassVar[str] = ""
    dataset_dir: ClassVar[str] = ""  # folder under the data root (CoOp's DATA layout)
    image_dir: ClassVar[str] = ""  # folder under the dataset folder that holds the images
    template: ClassVar[str] = "a photo of a {}."
    expected: ClassVar[ExpectedLayout] = ExpectedLayout()
    official_mask_layout: ClassVar[str] = "mirror"  # how the DAPT code finds masks: mirror | last2 | basename
    needs_root: ClassVar[bool] = True
    own_data: ClassVar[bool] = False  # the user's data (`folder`, `csv`), named by the user

    def read(self, dataset_dir: Path) -> RawSplits:
        raise NotImplementedError

    def prompt_template(self) -> str:
        return self.template

    def required_files(self) -> list[RequiredFile]:
        """Files and folders below the dataset folder that must exist (checked before reading)."""
        if not self.image_dir:
            return []
        return [RequiredFile(self.image_dir, "image folder", self._unpack_fix(), is_dir=True)]

    def _unpack_fix(self) -> str:
        return f"unpack the images so that they sit in <root>/{join_posix(self.dataset_dir, self.image_dir)}/"

    def locate(self, root: str | Path | None) -> Path:
        """The dataset folder: `root/<dataset_dir>` (CoOp's DATA layout), or `root` itself if it is that folder."""
        if root is None:
            raise DatasetError(f"dataset {self.name!r} needs --root, the folder that holds {self.dataset_dir}/")
        base = Path(root).expanduser()
        candidate = base / self.dataset_dir if self.dataset_dir else base
        if candidate.is_dir():
            return candidate
        if self.dataset_dir and base.is_dir() and self._looks_like_dataset_dir(base):
            return base
        if not base.is_dir():
            raise DatasetError(f"data root {base} does not exist; pass the folder that holds {self.dataset_dir}/")
        raise DatasetError(
            f"dataset folder {candidate} not found; the {self.name} dataset lives in <root>/{self.dataset_dir}/ "
            "(see docs/datasets.md for the layout)"
        )

    def _looks_like_dataset_dir(self, folder: Path) -> bool:
        if folder.name == self.dataset_dir:
            return True
        markers = [item.relative for item in self.required_files()]
        return bool(markers) and all((folder / marker).exists() for marker in markers)

    def display_name(self, root: str | Path | None) -> str:
        """The name in run folders and reports (see `dataset_display_name`): the registered name here."""
        return self.name

    def data_identity(self, root: str | Path | None, options: dict[str, Any]) -> dict[str, Any]:
        """What tells these data apart wherever they lie (see `dataset_identity`); `options` as given."""
        defaults = builder_options(type(self))
        changed = {key: _plain(value) for key, value in options.items() if _plain(value) != _plain(defaults.get(key))}
        return {"dataset": self.name, "name": self.display_name(root), "options": dict(sorted(changed.items()))}

    def build(self, root: str | Path | None) -> DatasetSplits:
        dataset_dir = self.locate(root)
        raw = self.read(dataset_dir)
        return self.finish(dataset_dir, raw)

    def finish(self, dataset_dir: Path | None, raw: RawSplits) -> DatasetSplits:
        """The common steps after `read`: labels 0..n-1 and distinct prompt names (see
        `promptclip.data.datasets.labels`; errors name the file the labels come from)."""
        where = raw.origin or f"{self.name} data in {dataset_dir}"
        try:
            everything = [*raw.train, *raw.val, *raw.test]
            given = raw.classnames
            names = given if given is not None else classnames_from_data(everything, prefix=self.image_dir)
            check_labels({"train": raw.train, "val": raw.val, "test": raw.test}, len(names), self.image_dir)
        except DatasetError as err:
            raise DatasetError(f"{where}: {err}") from None
        check_distinct_names(names, raw.keys, where, refuse=self.own_data)
        return DatasetSplits(
            name=self.name,
            root=dataset_dir,
            classnames=prompt_names(names),
            template=self.prompt_template(),
            train=raw.train,
            val=raw.val,
            test=raw.test,
            image_dir=self.image_dir,
            expected=self.expected,
            official_mask_layout=self.official_mask_layout,
            info={"split_source": raw.source},
            display_name=self.display_name(dataset_dir),
        )


class SplitFileDataset(DatasetBuilder):
    """A dataset read from the field's `split_zhou_<Name>.json`, or split from its raw layout on request.

    Options: `make_split` (build a seeded split from the raw layout when the split file is absent; the result
    differs from the field's published split, so published numbers are not comparable), `split_seed`.
    """

    split_file: ClassVar[str] = ""

    def __init__(self, *, make_split: bool = False, split_seed: int = 1) -> None:
        self.make_split = bool(make_split)
        self.split_seed = int(split_seed)

    def required_files(self) -> list[RequiredFile]:
        files = super().required_files()
        if not self.make_split:
            files.append(RequiredFile(self.split_file, "split file", self._split_fix()))
        return files

    def _split_fix(self) -> str:
        return (
            f"download {self.split_file} (links in {SPLIT_FILES_URL}) into <root>/{self.dataset_dir}/, "
            "or add `--set make_split=true` to split the raw layout with a seed (not the published split)"
        )

    def read(self, dataset_dir: Path) -> RawSplits:
        split_path = dataset_dir / self.split_file
        if split_path.is_file():
            train, val, test = read_split_file(split_path, self.image_dir)
            return RawSplits(train, val, test, source=self.split_file, origin=str(split_path))
        if not self.make_split:
            raise DatasetError(f"split file {split_path} is missing; {self._split_fix()}")
        try:
            return self.read_raw(dataset_dir, random.Random(self.split_seed))
        except DatasetError:
            raise
        except (ValueError, IndexError, KeyError) as err:
            raise DatasetError(
                f"{self.name}: the raw annotation files in {dataset_dir} cannot be parsed ({err!r}); "
                f"check them against docs/datasets.md, or download {self.split_file} instead"
            ) from None

    def read_raw(self, dataset_dir: Path, rng: random.Random) -> RawSplits:
        """Split the raw layout the way the field built its split file (per-dataset rules and name cleaning)."""
        raise NotImplementedError


def builder_options(builder: type[DatasetBuilder]) -> dict[str, Any]:
    """The options a dataset accepts, with their defaults."""
    signature = inspect.signature(builder.__init__)
    return {
        name: param.default
        for name, param in signature.parameters.items()
        if name != "self" and param.kind is inspect.Parameter.KEYWORD_ONLY
    }


def make_builder(name: str, /, **options: Any) -> DatasetBuilder:
    """Instantiate the registered builder `name` with its options, naming the valid ones on a mistake.
    (`name` is positional-only: own data take an option called `name`.)"""
    try:
        builder_class: type[DatasetBuilder] = DATASETS.get(name)
    except KeyError as err:
        raise DatasetError(str(err.args[0])) from None
    known = builder_options(builder_class)
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(f"{key} (default {value!r})" for key, value in known.items()) or "none"
        raise DatasetError(f"dataset {name!r} has no option {', '.join(unknown)}; its options: {listed}")
    return builder_class(**options)


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists), so options compare as they are recorded."""
    return json.loads(json.dumps(value, default=str))


def dataset_display_name(dataset: str, root: str | Path | None, options: Mapping[str, Any] | None = None) -> str:
    """The name dataset `dataset` goes by in run folders and reports, known before any data is read.

    Contract:
    * the field's datasets (and the synthetic ones): their registered name, whatever `root` and `options`;
    * own data (`folder`, `csv`): the `name` option (`--name`) when given, else derived from the folder at
      `root` (see `docs/datasets.md`; without `name`, `root` must be given); with `name` given, the same data
      moved to another root keep the name;
    * always one safe folder name (letters, digits and `_-.`, starting with a letter or digit, at most 80
      characters); own data never get the name of one of the field's datasets (compared in any case), so it
      can be a path component of a run folder as it is.

    `options` are the dataset's own options, as `build_dataset` takes them (an unknown one is a
    `DatasetError`); no file is read and `root` need not exist.
    """
    return make_builder(dataset, **dict(options or {})).display_name(root)


def dataset_identity(dataset: str, root: str | Path | None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What tells the data of a run apart from other data, independent of where they lie, as plain JSON data:
    `{"dataset": registered name, "name": dataset_display_name(...), "options": {...}}`.

    `options` holds the options given with values other than their defaults (an option added later with a
    default does not change old identities), JSON-normalised. Root-independent: the root's path never enters;
    files named by options of own data (`csv`, `classnames`) enter as the sha256 of their content, so moving
    the data (or running on a machine that mounts them elsewhere) keeps the identity, while editing a class
    name or a CSV row changes it. The images themselves are not read.
    """
    given = dict(options or {})
    return make_builder(dataset, **given).data_identity(root, given)


def build_dataset(name: str, root: str | Path | None = None, /, **options: Any) -> DatasetSplits:
    """Read the registered dataset `name` below `root` (the data root or the dataset folder itself)."""
    return make_builder(name, **options).build(root)


def register(cls: type[DatasetBuilder]) -> type[DatasetBuilder]:
    """Class decorator: register a builder under its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    return DATASETS.register(cls.name)(cls)
