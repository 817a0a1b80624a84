"""Your own data, with no code: a folder per class (`folder`) or a CSV file (`csv`).

Both accept a JSON file of class names (`classnames=FILE`), a prompt template, and split the data per class
with a seed (`split_seed`, fractions `split_fractions`) when the data do not say which image is in which split.
Own data go by a name of their own in run folders and reports (`name=NAME`, `--name`): by default the root
folder's name (`csv`: the root folder's name and the CSV file's stem, `pets-labels`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from promptclip.data.datasets.base import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    DatasetBuilder,
    DatasetError,
    DatasetSplits,
    Datum,
    RawSplits,
    RequiredFile,
    is_image_name,
    join_posix,
    list_visible,
    register,
    split_per_class,
)
from promptclip.io import sha256_file
from promptclip.registry import DATASETS

DEFAULT_FRACTIONS = (0.5, 0.2, 0.3)
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MASK_FOLDER = "mask"  # the default mask folder; never read as a class
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_NAME_LENGTH = 80


def _taken_by(name: str) -> str | None:
    """The field's dataset that goes by `name` (any case: folders merge on case-insensitive disks), if any."""
    for registered, builder in DATASETS.items():
        if registered.lower() == name.lower() and not builder.own_data:
            return str(registered)
    return None


def check_own_name(name: str) -> str:
    """`name` if it can be a run folder's path component and is not the name of one of the field's datasets."""
    if len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.fullmatch(name):
        raise DatasetError(
            f"--name {name!r}: the name of your data becomes a folder in every run path, so it may hold only "
            f"letters, digits and _ - . (starting with a letter or digit, at most {MAX_NAME_LENGTH} characters); "
            "e.g. --name my_pets (the dataset option `name`)"
        )
    taken = _taken_by(name)
    if taken is not None:
        raise DatasetError(
            f"--name {name}: {taken!r} is one of promptclip's datasets, and runs of both would share folders and "
            f"report rows; give your data another name, e.g. --name my_{name}"
        )
    return name


def name_from(text: str, kind: str) -> str:
    """A valid name made from a folder or file name: other characters become `_`; a name that one of the
    field's datasets has gets the kind in front (`folder-dtd`), so it never shares their run folders."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).lstrip("._-")[:MAX_NAME_LENGTH]
    if not cleaned:
        return kind
    return f"{kind}-{cleaned}"[:MAX_NAME_LENGTH] if _taken_by(cleaned) else cleaned


def folder_name(root: str | Path) -> str:
    """The last component of `root` as the user wrote it (`.`, `..` and a trailing `/` resolved, links not)."""
    return Path(os.path.abspath(Path(root).expanduser())).name


def option_file(text: str, root: Path | None) -> Path | None:
    """The file an option names: as given (relative to the current folder), else relative to the data root."""
    path = Path(text).expanduser()
    if not path.is_file() and root is not None and (root / text).is_file():
        path = root / text
    return path if path.is_file() else None


def parse_fractions(value: Any) -> tuple[float, float, float]:
    """`"0.7,0.1,0.2"` or a 3-sequence -> (train, val, test) fractions that sum to 1."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        fractions = tuple(float(part) for part in parts)
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(
            f"split_fractions={value!r} must be three numbers train,val,test that sum to 1, e.g. 0.5,0.2,0.3"
        )
    return fractions  # type: ignore[return-value]


def not_utf8_error(path: Path, option: str) -> DatasetError:
    """A text file (CSV, class-name file) that is not UTF-8: where the first bad byte is, and how to convert."""
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:  # an image, an archive, a spreadsheet's own format
        kind = "CSV" if option == "csv" else "JSON"
        return DatasetError(f"{path} (option {option}) is a binary file, not {kind} text; give the {kind} file")
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        where = f" (byte 0x{raw[err.start]:02x} on line {line})"
    converted = path.with_name(f"{path.stem}-utf8{path.suffix}")
    spreadsheet = ", or save as 'CSV UTF-8' from a spreadsheet" if path.suffix.lower() == ".csv" else ""
    return DatasetError(
        f"{path} (option {option}) is not UTF-8 text{where}; it is probably Latin-1 or Windows-1252. Convert it "
        f"to UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path} > {converted}`{spreadsheet}) and give the converted file"
    )


def read_classnames_map(path_text: str, root: Path | None) -> dict[str, str] | list[str]:
    """A JSON class-name file: `{"key": "name"}` (key = folder or CSV label) or a list in label order."""
    path = option_file(path_text, root)
    if path is None:
        raise DatasetError(f"class-name file {path_text} not found (option classnames); give an existing JSON file")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise not_utf8_error(path, "classnames") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f'{path} is not valid JSON ({err}); expected {{"folder": "class name"}}') from None
    if isinstance(content, dict) and all(isinstance(v, str) for v in content.values()):
        return {str(key): value for key, value in content.items()}
    if isinstance(content, list) and all(isinstance(v, str) for v in content):
        return content
    raise DatasetError(f"{path}: expected a JSON object of strings or a list of strings (the class names)")


class OwnDataset(DatasetBuilder):
    """Options shared by the user-data datasets."""

    own_data = True

    def __init__(
        self,
        *,
        name: str | None = None,
        classnames: str | None = None,
        template: str = "a photo of a {}.",
        split_seed: int = 1,
        split_fractions: Any = DEFAULT_FRACTIONS,
    ) -> None:
        if "{}" not in template:
            raise DatasetError(f"template {template!r} has no {{}} where the class name goes")
        self.own_name = check_own_name(str(name)) if name is not None else None
        self.classnames_file = classnames
        self.template_text = template
        self.split_seed = int(split_seed)
        self.fractions = parse_fractions(split_fractions)

    def prompt_template(self) -> str:
        return self.template_text

    def build(self, root: str | Path | None) -> DatasetSplits:
        splits = super().build(root)
        # Few-shot caches are per dataset name; own data of the same kind in other places must not share one.
        identity = hashlib.sha256(self.identity(splits.root).encode()).hexdigest()[:12]
        splits.info["cache_key"] = f"{self.name}-{identity}"
        return splits

    def identity(self, root: Path | None) -> str:
        """Where the data lie (the few-shot cache key): unlike `data_identity`, it changes with the root."""
        return str(root.resolve()) if root is not None else ""

    def display_name(self, root: str | Path | None) -> str:
        if self.own_name is not None:
            return self.own_name
        if root is None:
            raise DatasetError(
                f"dataset {self.name!r} needs --root (the data's name is its folder's name unless --name gives one)"
            )
        return name_from(self.default_name(root), self.name)

    def default_name(self, root: str | Path) -> str:
        """The text the name is made from when --name is not given."""
        return folder_name(root)

    def option_files(self, root: Path | None) -> dict[str, Path]:
        """The files the options name (they define the data as much as the images do)."""
        if self.classnames_file is None:
            return {}
        path = option_file(self.classnames_file, root)
        if path is None:
            raise DatasetError(
                f"class-name file {self.classnames_file} not found (option classnames); give an existing JSON file"
            )
        return {"classnames": path}

    def data_identity(self, root: str | Path | None, options: dict[str, Any]) -> dict[str, Any]:
        folder = Path(root).expanduser() if root is not None else None
        files = self.option_files(folder)
        plain = {key: value for key, value in options.items() if key != "name" and key not in files}
        if "split_fractions" in plain:
            plain["split_fractions"] = self.fractions  # "0.5,0.2,0.3" and (0.5, 0.2, 0.3) are the same split
        identity = super().data_identity(root, plain)
        for key, path in files.items():  # by content: the same file in another place is the same data
            identity["options"][key] = f"sha256:{sha256_file(path)[:16]}"
        identity["options"] = dict(sorted(identity["options"].items()))
        return identity

    def auto_split(self, data: list[Datum]) -> tuple[list[Datum], list[Datum], list[Datum]]:
        return split_per_class(data, self.fractions, random.Random(self.split_seed))

    def names_for_keys(self, keys: Sequence[str], root: Path) -> list[str]:
        """Class names of `keys` (folders or CSV labels, in label order), renamed by the class-name file."""
        if self.classnames_file is None:
            return list(keys)
        mapping = read_classnames_map(self.classnames_file, root)
        if isinstance(mapping, list):
            if len(mapping) != len(keys):
                raise DatasetError(
                    f"{self.classnames_file} lists {len(mapping)} names but the data have {len(keys)} classes"
                )
            return list(mapping)
        unknown = sorted(set(mapping) - set(keys))
        if unknown:
            raise DatasetError(
                f"{self.classnames_file} names classes {unknown[:5]} that the data do not have; "
                f"known: {list(keys)[:10]}"
            )
        return [mapping.get(key, key) for key in keys]


@register
class FolderDataset(OwnDataset):
    """Your own images, one folder per class (--root DIR); names from folders or a JSON map, seeded split"""

    name: ClassVar[str] = "folder"

    def locate(self, root: str | Path | None) -> Path:
        if root is None:
            raise DatasetError("dataset 'folder' needs --root, the folder that holds one sub-folder per class")
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"data root {folder} does not exist; pass the folder of class sub-folders")
        return folder

    def required_files(self) -> list[RequiredFile]:
        return []

    def read(self, dataset_dir: Path) -> RawSplits:
        tops = [name for name in list_visible(dataset_dir) if (dataset_dir / name).is_dir() and name != MASK_FOLDER]
        if "train" in tops and set(tops) <= set(SPLIT_NAMES):
            return self._read_given_splits(dataset_dir, tops)
        classes = tops
        if not classes:
            raise DatasetError(f"{dataset_dir} has no class sub-folders; put each class's images in <root>/<class>/")
        names = self.names_for_keys(classes, dataset_dir)
        data = self._images(dataset_dir, "", classes, names)
        train, val, test = self.auto_split(data)
        source = f"folders, split seed {self.split_seed}"
        return RawSplits(train, val, test, names, source=source, origin=str(dataset_dir), keys=classes)

    def _read_given_splits(self, dataset_dir: Path, splits: list[str]) -> RawSplits:
        classes = sorted(
            {
                name
                for split in splits
                for name in list_visible(dataset_dir / split)
                if (dataset_dir / split / name).is_dir()
            }
        )
        names = self.names_for_keys(classes, dataset_dir)
        data = {
            split: self._images(dataset_dir, split, classes, names) if split in splits else [] for split in SPLIT_NAMES
        }
        source = "folders train/val/test"
        return RawSplits(
            data["train"], data["val"], data["test"], names, source=source, origin=str(dataset_dir), keys=classes
        )

    @staticmethod
    def _images(dataset_dir: Path, prefix: str, classes: list[str], names: list[str]) -> list[Datum]:
        """The images of each class folder; a class folder without images is refused (it would silently be a
        class that nothing trains or tests)."""
        data: list[Datum] = []
        empty: list[Path] = []
        for label, folder in enumerate(classes):
            where = dataset_dir / prefix / folder
            if not where.is_dir():
                continue
            found = [image for image in list_visible(where) if is_image_name(image)]
            if not found:
                empty.append(where)
            data.extend(Datum(join_posix(prefix, folder, image), label, names[label]) for image in found)
        if empty:
            raise DatasetError(empty_class_folders_message(empty))
        return data


def empty_class_folders_message(folders: list[Path]) -> str:
    """Which class folders hold no image, what they hold instead, and the fix."""

    def holds(folder: Path) -> str:
        entries = list_visible(folder)
        files = [name for name in entries if (folder / name).is_file()]
        if files:
            return f"{len(files)} files, none of them an image, e.g. {', '.join(files[:3])}"
        if entries:
            return "only sub-folders: a class's images must sit directly in its folder"
        return "nothing"

    listed = "\n  ".join(f"{folder} (holds {holds(folder)})" for folder in folders[:20])
    more = f"\n  ... and {len(folders) - 20} more" if len(folders) > 20 else ""
    extensions = " ".join(sorted(IMAGE_EXTENSIONS))
    return (
        f"{len(folders)} class folders hold no image:\n  {listed}{more}\n"
        f"fix: put the class's images ({extensions}) in the folder, or remove the folder (folders whose names "
        "start with '.' are not read)"
    )


@register
class CSVDataset(OwnDataset):
    """Your own images listed in a CSV (path,label[,classname][,split]): --root DIR --csv FILE"""

    name: ClassVar[str] = "csv"
    COLUMNS: ClassVar[tuple[str, ...]] = ("path", "label", "classname", "split", "domain")

    def __init__(
        self,
        *,
        csv: str | None = None,
        name: str | None = None,
        classnames: str | None = None,
        template: str = "a photo of a {}.",
        split_seed: int = 1,
        split_fractions: Any = DEFAULT_FRACTIONS,
    ) -> None:
        super().__init__(
            name=name,
            classnames=classnames,
            template=template,
            split_seed=split_seed,
            split_fractions=split_fractions,
        )
        self.csv_file = csv

    def locate(self, root: str | Path | None) -> Path:
        if root is None:
            raise DatasetError("dataset 'csv' needs --root, the folder the CSV's image paths are relative to")
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"data root {folder} does not exist; pass the folder the CSV paths start from")
        return folder

    def csv_path(self, root: Path | None) -> Path:
        if not self.csv_file:
            raise DatasetError("dataset 'csv' needs a CSV file: add --csv FILE (or --set csv=FILE)")
        path = option_file(self.csv_file, root)
        if path is None:
            raise DatasetError(f"CSV file {self.csv_file} not found (also looked in {root}); check --csv")
        return path

    def default_name(self, root: str | Path) -> str:
        """`<root folder>-<CSV stem>` (`pets-labels`), or the folder's name alone when the two are the same:
        several CSV files may share an image folder, and generic CSV names (labels.csv) many folders."""
        folder = folder_name(root)
        stem = Path(self.csv_file).stem if self.csv_file else ""
        return folder if not stem or stem == folder else f"{folder}-{stem}"

    def option_files(self, root: Path | None) -> dict[str, Path]:
        return {**super().option_files(root), "csv": self.csv_path(root)}

    def required_files(self) -> list[RequiredFile]:
        return []

    def identity(self, root: Path | None) -> str:
        csv_file = self.csv_path(root).resolve() if root is not None else ""
        return f"{super().identity(root)}|{csv_file}"

    def read(self, dataset_dir: Path) -> RawSplits:
        path = self.csv_path(dataset_dir)
        rows = self._rows(path, dataset_dir)
        labels_are_ints = all(row["label"].lstrip("-").isdigit() for _, row in rows)
        keys, label_of = self._label_keys(rows, labels_are_ints)
        names = self._names(path, rows, keys, label_of, dataset_dir)
        split_of: dict[str, list[Datum]] = {split: [] for split in SPLIT_NAMES}
        unsplit: list[Datum] = []
        for line, row in rows:
            label = label_of[row["label"]]
            datum = Datum(row["path"], label, names[label], self._domain(path, line, row))
            if "split" in row:
                split_of[self._split(path, line, row["split"])].append(datum)
            else:
                unsplit.append(datum)
        ordered = sorted(label_of, key=label_of.__getitem__)
        keys_by_label = ordered if [label_of[key] for key in ordered] == list(range(len(names))) else None
        if unsplit:
            train, val, test = self.auto_split(unsplit)
            source = f"{path.name}, split seed {self.split_seed}"
        else:
            train, val, test = split_of["train"], split_of["val"], split_of["test"]
            source = f"{path.name} splits"
        return RawSplits(train, val, test, names, source=source, origin=str(path), keys=keys_by_label)

    def _rows(self, path: Path, root: Path) -> list[tuple[int, dict[str, str]]]:
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                table = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
        except UnicodeDecodeError:
            raise not_utf8_error(path, "csv") from None
        if not table:
            raise DatasetError(f"{path} is empty; expected rows `path,label[,classname][,split]`")
        header = [cell.strip().lower() for cell in table[0]]
        has_header = "path" in header and "label" in header
        columns = header if has_header else list(self.COLUMNS[: len(table[0])])
        unknown = [name for name in columns if name not in self.COLUMNS]
        if unknown or len(columns) < 2:
            raise DatasetError(
                f"{path}: columns {unknown or columns} are not understood; use a header with path,label and "
                "optionally classname, split, domain"
            )
        first_line = 2 if has_header else 1
        rows = []
        for line, cells in enumerate(table[1:] if has_header else table, start=first_line):
            if len(cells) != len(columns):
                raise DatasetError(f"{path}, line {line}: {len(cells)} fields where the header has {len(columns)}")
            row = {name: cell.strip() for name, cell in zip(columns, cells, strict=True)}
            if not row["path"] or not row["label"]:
                raise DatasetError(f"{path}, line {line}: empty path or label")
            row["path"] = self._relative(row["path"], root)
            rows.append((line, row))
        return rows

    @staticmethod
    def _relative(path_text: str, root: Path) -> str:
        """POSIX path relative to `root`; an absolute path inside `root` is made relative, others kept."""
        posix = path_text.replace("\\", "/")
        candidate = Path(posix)
        if candidate.is_absolute():
            try:
                return candidate.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                return posix  # outside the root: `data check` reports it, loading refuses it
        return posix

    @staticmethod
    def _label_keys(rows: list[tuple[int, dict[str, str]]], ints: bool) -> tuple[list[str], dict[str, int]]:
        values = {row["label"] for _, row in rows}
        if ints:
            keys = sorted(values, key=int)
            return keys, {key: int(key) for key in keys}
        keys = sorted(values)
        return keys, {key: label for label, key in enumerate(keys)}

    def _names(
        self,
        path: Path,
        rows: list[tuple[int, dict[str, str]]],
        keys: list[str],
        label_of: dict[str, int],
        root: Path,
    ) -> list[str]:
        num_classes = max(label_of.values()) + 1
        if min(label_of.values()) < 0:
            raise DatasetError(f"{path}: labels must be >= 0")
        given: dict[int, str] = {}
        for line, row in rows:
            name = row.get("classname") or ""
            label = label_of[row["label"]]
            if name and given.setdefault(label, name) != name:
                raise DatasetError(
                    f"{path}, line {line}: label {row['label']} is named {name!r} here and {given[label]!r} before"
                )
        if self.classnames_file is not None:
            mapping = read_classnames_map(self.classnames_file, root)
            if isinstance(mapping, list):
                if len(mapping) < num_classes:
                    raise DatasetError(f"{self.classnames_file} lists {len(mapping)} names for {num_classes} labels")
                return list(mapping)
            given.update({label_of[key]: value for key, value in mapping.items() if key in label_of})
        if not all(key.lstrip("-").isdigit() for key in keys):
            return [given.get(label, key) for key, label in sorted(label_of.items(), key=lambda kv: kv[1])]
        nameless = [label for label in range(num_classes) if label not in given]
        if nameless:
            raise DatasetError(
                f"{path}: labels {nameless[:10]} have no class name; add a classname column or a JSON file of "
                "names (--set classnames=FILE); CLIP needs the names to build prompts"
            )
        return [given[label] for label in range(num_classes)]

    @staticmethod
    def _split(path: Path, line: int, value: str) -> str:
        split = SPLIT_ALIASES.get(value.lower())
        if split is None:
            raise DatasetError(f"{path}, line {line}: split {value!r} is not one of train, val, test")
        return split

    @staticmethod
    def _domain(path: Path, line: int, row: dict[str, str]) -> int:
        value = row.get("domain") or "0"
        if not value.lstrip("-").isdigit():
            raise DatasetError(f"{path}, line {line}: domain {value!r} is not an integer")
        return int(value)
