"""`promptclip data check`: verify a dataset folder before training and list every problem with its fix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from promptclip.data.datasets.base import (
    SPLIT_FILES_URL,
    SPLIT_NAMES,
    DatasetBuilder,
    DatasetError,
    DatasetSplits,
    Datum,
    make_builder,
    path_escapes_root,
)


@dataclass
class Problem:
    """One kind of problem, the items it concerns (paths, counts) and how to fix it."""

    title: str
    fix: str
    items: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    dataset: str
    location: str = ""
    facts: list[str] = field(default_factory=list)  # what was found (sizes, classes), for the summary
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, title: str, fix: str, items: Sequence[str] = ()) -> None:
        self.problems.append(Problem(title, fix, list(items)))


@dataclass(frozen=True)
class CheckOptions:
    check_sizes: bool = True  # compare class count and split sizes with the published ones
    full_decode: bool = False  # decode every image fully instead of reading its header
    workers: int = 8
    mask_config: Any = None  # a promptclip.data.masks.MaskConfig to check the training masks, or None


def check_dataset(
    name: str, root: str | Path | None, options: dict[str, Any] | None = None, settings: CheckOptions | None = None
) -> CheckReport:
    """Every problem of dataset `name` under `root` that can be found without training."""
    settings = settings or CheckOptions()
    report = CheckReport(dataset=name)
    try:
        builder = make_builder(name, **(options or {}))
    except DatasetError as err:
        report.add("the dataset cannot be set up", "fix the dataset name or options", [str(err)])
        return report
    splits = _read(builder, root, report)
    if splits is None:
        return report
    report.facts.append(f"{splits.num_classes} classes; " + ", ".join(f"{k} {v}" for k, v in splits.sizes().items()))
    if settings.check_sizes:
        _check_expected(splits, report)
    _check_classes(splits, report)
    _check_overlap(splits, report)
    if splits.root is not None:
        _check_files(splits, report, settings)
    if settings.mask_config is not None:
        _check_masks(splits, report, settings.mask_config)
    return report


def _read(builder: DatasetBuilder, root: str | Path | None, report: CheckReport) -> DatasetSplits | None:
    if not builder.needs_root:
        report.location = "(rendered, no files)"
        try:
            return builder.build(None)
        except DatasetError as err:
            report.add("the dataset cannot be built", str(err))
            return None
    try:
        dataset_dir = builder.locate(root)
    except DatasetError as err:
        report.add("the dataset folder is not found", str(err))
        return None
    report.location = str(dataset_dir)
    absent = False
    for required in builder.required_files():
        path = dataset_dir / required.relative
        if not (path.is_dir() if required.is_dir else path.is_file()):
            report.add(f"missing {required.what}: {path}", required.fix)
            absent = True
    if absent:
        return None
    try:
        return builder.finish(dataset_dir, builder.read(dataset_dir))
    except DatasetError as err:
        report.add("the dataset cannot be read", str(err))
        return None


def _check_expected(splits: DatasetSplits, report: CheckReport) -> None:
    expected = splits.expected
    size_fix = (
        f"use the published split file ({SPLIT_FILES_URL}) and a complete copy of the images; "
        "if you use a subset on purpose, add --ignore-sizes"
    )
    if expected.num_classes is not None and expected.num_classes != splits.num_classes:
        report.add(
            f"{splits.num_classes} classes where {expected.num_classes} are expected",
            size_fix,
        )
    if expected.sizes:
        found = splits.sizes()
        wrong = [
            f"{split}: {found[split]} images, expected {count}"
            for split, count in expected.sizes.items()
            if found[split] != count
        ]
        if wrong:
            report.add("split sizes differ from the published ones", size_fix, wrong)


def _check_classes(splits: DatasetSplits, report: CheckReport) -> None:
    if not splits.train:
        return
    present = {datum.label for datum in splits.train}
    empty = [f"{label}: {splits.classnames[label]}" for label in range(splits.num_classes) if label not in present]
    if empty:
        report.add(
            f"{len(empty)} classes have no training image",
            "add training images for these classes, or drop them from the split file",
            empty,
        )


def _check_overlap(splits: DatasetSplits, report: CheckReport) -> None:
    test_paths = {datum.path for datum in splits.test}
    for split, data in (("train", splits.train), ("val", splits.val)):
        shared = sorted({datum.path for datum in data} & test_paths)
        if shared:
            report.add(
                f"{len(shared)} images are in both {split} and test",
                f"an image must be in one split only; remove them from {split} or from test",
                shared,
            )


def _check_files(splits: DatasetSplits, report: CheckReport, settings: CheckOptions) -> None:
    assert splits.root is not None
    everything = {datum.path: datum for split in SPLIT_NAMES for datum in splits.split(split)}
    escaping = sorted(path for path in everything if path_escapes_root(path))
    if escaping:
        report.add(
            f"{len(escaping)} image paths leave the dataset folder {splits.root}",
            "paths must be relative to the dataset folder and stay inside it; edit these entries",
            escaping,
        )
    inside = [path for path in everything if not path_escapes_root(path)]
    outcomes = probe_images(splits.root, inside, settings.full_decode, settings.workers)
    missing = sorted(path for path, outcome in zip(inside, outcomes, strict=True) if outcome == "missing")
    unreadable = sorted(
        f"{path} ({outcome})"
        for path, outcome in zip(inside, outcomes, strict=True)
        if outcome not in ("ok", "missing")
    )
    if missing:
        report.add(
            f"{len(missing)} images are missing",
            "restore these files (unpack the complete archive), or use the split file that matches your copy",
            missing,
        )
    if unreadable:
        report.add(
            f"{len(unreadable)} images cannot be read",
            "re-download or replace these files; a broken file would stop training midway",
            unreadable,
        )


def probe_images(root: Path, paths: Sequence[str], full_decode: bool = False, workers: int = 8) -> list[str]:
    """For each dataset-relative path: "ok", "missing" or the error reading it (paths must stay inside)."""
    probe = _decode_fully if full_decode else _read_header
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda path: _probe(root / path, probe), paths))


FULL_DECODE_MAX_IMAGES = 5000  # smaller sets (few-shot training sets) are decoded fully before training
SKIPPED_LIST_LIMIT = 10


def screen_images(
    splits: DatasetSplits,
    data: Sequence[Datum],
    what: str,
    on_bad: str = "error",
    workers: int = 8,
) -> tuple[list[Datum], list[str]]:
    """Check the images a run is about to read, before it starts: (the usable data, "path: problem" for the
    rest). With `on_bad="error"` any problem raises a `DatasetError` listing the files and the fixes.

    Sets of up to `FULL_DECODE_MAX_IMAGES` images are decoded fully (a truncated JPEG passes a header check);
    larger ones get the header check of `promptclip data check`. Data without files (rendered) pass as they are.
    """
    if splits.root is None or not data:
        return list(data), []
    paths = [datum.path for datum in data]
    inside = [path for path in paths if not path_escapes_root(path)]
    full_decode = len(inside) <= FULL_DECODE_MAX_IMAGES
    outcomes = dict(zip(inside, probe_images(splits.root, inside, full_decode, workers), strict=True))
    problems = {
        path: outcomes.get(path, "the path leaves the dataset folder")
        for path in dict.fromkeys(paths)
        if outcomes.get(path) != "ok"
    }
    if not problems:
        return list(data), []
    listed = [f"{path}: {problem}" for path, problem in sorted(problems.items())]
    if on_bad != "skip":
        shown = "\n  ".join(listed[:SKIPPED_LIST_LIMIT])
        more = f"\n  ... and {len(listed) - SKIPPED_LIST_LIMIT} more" if len(listed) > SKIPPED_LIST_LIMIT else ""
        raise DatasetError(
            f"{len(problems)} of {len(data)} {what} cannot be used (dataset folder {splits.root}):\n  {shown}{more}\n"
            "fix: restore or replace these files (`promptclip data check --dataset "
            f"{splits.name} --root {splits.root} --full-decode` lists every problem of the dataset), or leave "
            "them out of the run with --opts data.on_bad_image skip "
            "(they are then counted in results.json)"
        )
    return [datum for datum in data if datum.path not in problems], listed


def _probe(path: Path, probe: Callable[[Path], None]) -> str:
    if not path.is_file():
        return "missing"
    try:
        probe(path)
    except Exception as err:  # PIL raises many kinds of errors for broken files
        return f"{type(err).__name__}: {err}"
    return "ok"


def _read_header(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()


def _decode_fully(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


def _check_masks(splits: DatasetSplits, report: CheckReport, config: Any) -> None:
    from promptclip.data.masks import FileMaskStore, fixes_for_missing

    if splits.root is None:
        return  # rendered datasets carry exact masks
    store = FileMaskStore(splits.root, splits.image_dir, config, splits.official_mask_layout)
    absent: list[Datum] = sorted(store.missing(splits.train), key=lambda datum: datum.path)
    if absent:
        report.add(
            f"{len(absent)} of {len(splits.train)} training images have no mask ({store.description})",
            fixes_for_missing(config),
            [f"{store.mask_dir / store.relative_mask_path(datum)} (image {datum.path})" for datum in absent],
        )
