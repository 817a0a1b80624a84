"""Hostile and silent inputs of the data (see `tests/hostile.py`): images of every PIL mode, masks that are empty
or full, class folders without images, a single class, class names that read the same, names the backbone
cannot tell apart, split files with labels out of range, a disk full when the run starts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hostile import Case
from PIL import Image

from promptclip.recipes import resolve_recipe

SMOKE = str(resolve_recipe("smoke/coop"))
SIZE = 16


def own_recipe(tmp: Path, **model: Any) -> str:
    """The smoke recipe without the synthetic world's options, for own data (`model` changes model.*)."""
    recipe = yaml.safe_load(Path(SMOKE).read_text())
    recipe["data"].pop("options")
    recipe["model"].update(model)
    path = tmp / "own.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def train_argv(tmp: Path, *extra: str, dataset: str = "folder", recipe: str | None = None) -> list[str]:
    recipe = recipe or own_recipe(tmp)
    argv = ["train", "--recipe", recipe, "--dataset", dataset, "--root", str(tmp / "data"), "--output"]
    return [*argv, str(tmp / "run"), "--no-progress", *extra]


def photo(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def class_folders(root: Path, classes: Sequence[str], per_class: int = 4) -> Path:
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(100 * label + i).save(root / name / f"{i}.png")
    return root


def log_of(tmp: Path) -> str:
    return (tmp / "run" / "log.txt").read_text()


# -- images of every PIL mode ----------------------------------------------------------------------------------
# Each image is two halves of one value each; `expected` gives the 8-bit RGB of each half after reading.
def halves(left: Any, right: Any, dtype: Any) -> np.ndarray:
    array = np.empty((SIZE, SIZE, *np.shape(left)), dtype=dtype)
    array[:, : SIZE // 2] = left
    array[:, SIZE // 2 :] = right
    return array


def scaled(value: float, top: float) -> int:
    return int(value * 255 / top + 0.5)


def pgm16(path: Path, values: np.ndarray) -> None:
    header = f"P5\n{values.shape[1]} {values.shape[0]}\n65535\n".encode()
    path.write_bytes(header + values.astype(">u2").tobytes())


def palette_image(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.fromarray(halves(0, 1, np.uint8), mode="L").convert("P")
    image.putpalette([0, 0, 0, *colour])
    image.putdata(halves(0, 1, np.uint8).ravel().tolist())
    image.info["transparency"] = 0
    return image


def cmyk_image(c: int, k: int) -> Image.Image:
    image = Image.new("CMYK", (SIZE, SIZE), (c, 0, 0, k))
    image.paste((0, 0, 0, 0), (SIZE // 2, 0, SIZE, SIZE))
    return image


Writer = Callable[[Path, int], None]
Expected = Callable[[int], tuple[tuple[int, int, int], tuple[int, int, int]]]


def grey(value: int) -> tuple[int, int, int]:
    return (value, value, value)


MODES: list[tuple[str, str, Writer, Expected]] = [
    (
        "I;16-png",
        ".png",
        lambda p, i: Image.fromarray(halves(1000 * (i + 1), 65535 - 5000 * i, np.uint16)).save(p),
        lambda i: (grey(scaled(1000 * (i + 1), 65535)), grey(scaled(65535 - 5000 * i, 65535))),
    ),
    (
        "I;16-tiff",
        ".tif",
        lambda p, i: Image.fromarray(halves(300 * i, 40000, np.uint16)).save(p),
        lambda i: (grey(scaled(300 * i, 65535)), grey(scaled(40000, 65535))),
    ),
    (
        "I-pgm16",
        ".ppm",  # promptclip reads .ppm; a P5 (grey) file with maxval 65535 opens as mode I
        lambda p, i: pgm16(p, halves(20000 + 1000 * i, 65535, np.uint16)),
        lambda i: (grey(scaled(20000 + 1000 * i, 65535)), (255, 255, 255)),
    ),
    (
        "F-unit-tiff",
        ".tif",
        lambda p, i: Image.fromarray(halves(0.1 * i, 0.9, np.float32)).save(p),
        lambda i: (grey(scaled(float(np.float32(0.1 * i)), 1.0)), grey(scaled(float(np.float32(0.9)), 1.0))),
    ),
    (
        "F-wide-tiff",
        ".tif",
        lambda p, i: Image.fromarray(halves(50.0 + 10 * i, 400.0, np.float32)).save(p),
        lambda i: (grey(50 + 10 * i), (255, 255, 255)),
    ),
    (
        "P-transparency-png",
        ".png",
        lambda p, i: palette_image((40 * i, 100, 200)).save(p),
        lambda i: ((255, 255, 255), (40 * i, 100, 200)),
    ),
    (
        "LA-png",
        ".png",
        lambda p, i: Image.fromarray(halves([30 * i, 0], [30 * i + 5, 255], np.uint8), mode="LA").save(p),
        lambda i: ((255, 255, 255), grey(30 * i + 5)),
    ),
    (
        "RGBA-png",
        ".png",
        lambda p, i: Image.fromarray(halves([10 * i, 0, 0, 0], [10 * i, 50, 60, 255], np.uint8)).save(p),
        lambda i: ((255, 255, 255), (10 * i, 50, 60)),
    ),
    (
        "CMYK-tiff",
        ".tif",
        lambda p, i: cmyk_image(20 * i, 128).save(p),
        lambda i: ((scaled((255 - 20 * i) * 127, 255 * 255), 127, 127), (255, 255, 255)),
    ),
    (
        "1-png",
        ".png",
        lambda p, i: Image.fromarray(halves(False, True, bool)).save(p),
        lambda i: ((0, 0, 0), (255, 255, 255)),
    ),
    (
        "L-png",
        ".png",
        lambda p, i: Image.fromarray(halves(20 * i, 250 - i, np.uint8)).save(p),
        lambda i: (grey(20 * i), grey(250 - i)),
    ),
]


def mode_case(name: str, suffix: str, write: Writer, expected: Expected) -> Case:
    def setup(tmp: Path) -> list[str]:
        for name_ in ("a", "b"):
            (tmp / "data" / name_).mkdir(parents=True)
            for i in range(4):
                write(tmp / "data" / name_ / f"{i}{suffix}", i)
        return train_argv(tmp, "--quiet")

    def check(tmp: Path, output: str) -> None:
        from promptclip.data.datasets import build_dataset

        assert (tmp / "run" / "results.json").is_file()
        splits = build_dataset("folder", tmp / "data")
        for datum in [*splits.train, *splits.val, *splits.test]:
            pixels = np.asarray(splits.load_image(datum))
            left, right = expected(int(Path(datum.path).stem))
            assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8, (datum.path, pixels.shape)
            assert (pixels[:, : SIZE // 2] == left).all(), (datum.path, pixels[0, 0], left)
            assert (pixels[:, SIZE // 2 :] == right).all(), (datum.path, pixels[0, -1], right)

    return Case(f"image-mode-{name}", "silent", setup, 0, ("results:",), may_write=("run",), check=check)


CASES: list[Case] = [mode_case(*mode) for mode in MODES]


# -- masks (DAPT) ---------------------------------------------------------------------------------------------
MaskValues = Callable[[str, int], int]


def masked_data(tmp: Path, values: MaskValues, per_class: int = 6) -> None:
    """Two classes of `per_class` images with masks in data/mask/ (mirror rule). The mask of the k-th training
    image of a class (k = -1 for validation and test images) holds `values(class, k)`: 0 empty, 255 full,
    anything else a square of foreground on background."""
    from promptclip.data.datasets import build_dataset

    data = class_folders(tmp / "data", ["cat", "dog"], per_class)
    training = sorted(datum.path for datum in build_dataset("folder", data).train)
    for name in ("cat", "dog"):
        (data / "mask" / name).mkdir(parents=True)
        ranks = [path for path in training if path.startswith(f"{name}/")]
        for i in range(per_class):
            path = f"{name}/{i}.png"
            value = values(name, ranks.index(path) if path in ranks else -1)
            mask = np.full((SIZE, SIZE), 255 if value == 255 else 0, dtype=np.uint8)
            if value not in (0, 255):
                mask[4:12, 4:12] = 255
            Image.fromarray(mask).save(data / "mask" / path)


def dapt(tmp: Path, values: MaskValues, *opts: str, quiet: bool = False) -> list[str]:
    """DAPT-S on every training image (--shots 0: 3 of 6 per class), with the masks of `masked_data`."""
    masked_data(tmp, values)
    return train_argv(tmp, *(["--quiet"] if quiet else []), "--shots", "0", "--opts", "method", "coop+dapt", *opts)


def one_empty_one_full(name: str, rank: int) -> int:
    return {("cat", 0): 0, ("dog", 0): 255}.get((name, rank), 1)


def one_empty(name: str, rank: int) -> int:
    return 0 if (name, rank) == ("cat", 0) else 1


def nothing_trained(tmp: Path, output: str) -> None:
    assert not (tmp / "run" / "checkpoints").exists() and not (tmp / "run" / "results.json").exists()


LIMIT_HALF = ("plugins.dapt.mask.max_empty_or_full", "0.5")


def screened(tmp: Path, fallback: str) -> Any:
    from promptclip.data.datasets import build_dataset
    from promptclip.data.masks import MaskConfig, attach_masks, screen_masks

    return screen_masks(attach_masks(build_dataset("folder", tmp / "data"), MaskConfig(fallback=fallback)))[0]


def empty_as_full(tmp: Path, output: str) -> None:
    assert "6 masks: 6 empty (no foreground), 0 full (no background), mean foreground 0.0%" in output
    assert "read as all-foreground (mask fallback full)" in log_of(tmp)
    splits = screened(tmp, "full")
    assert all(splits.load_mask(datum) is None for datum in splits.train)  # None: the loader's full mask


def two_skipped(tmp: Path, output: str) -> None:
    assert "2 of 6 training images left out: their masks are empty (1) or full (1)" in log_of(tmp)
    assert "mean foreground 33.3%" in output, output  # (0 + 1 + 4 * 0.25) / 6
    assert sorted(datum.path.split("/")[0] for datum in screened(tmp, "skip").train) == ["cat"] * 2 + ["dog"] * 2


def gradcam(tmp: Path) -> list[str]:
    masked_data(tmp, lambda name, rank: 1)
    argv = ["masks", "gradcam", "--dataset", "folder", "--root", str(tmp / "data"), "--out", str(tmp / "masks")]
    return [*argv, "--arch", "tiny-vit", "--weights", "random", "--device", "cpu", "--no-progress"]


def summary_matches_the_files(tmp: Path, output: str) -> None:
    masks = [np.asarray(Image.open(path)) > 0 for path in sorted((tmp / "masks").rglob("*.png"))]
    assert len(masks) == 6, len(masks)  # the training split: 3 of 6 images per class
    empty = sum(not mask.any() for mask in masks)
    full = sum(bool(mask.all()) for mask in masks)
    mean = 100 * float(np.mean([mask.mean() for mask in masks]))
    said = f"masks: 6 masks: {empty} empty (no foreground), {full} full (no background), mean foreground {mean:.1f}%"
    assert said in output, (said, output)


CASES += [
    Case(
        "masks-all-empty-refused",
        "silent",
        lambda tmp: dapt(tmp, lambda name, rank: 0),
        2,
        ("6 of 6 training masks are empty (6", "{tmp}/data/mask/", "(empty)", "plugins.dapt.mask.max_empty_or_full"),
        may_write=("run",),
        check=nothing_trained,
    ),
    Case(
        "masks-all-full-refused",
        "silent",
        lambda tmp: dapt(tmp, lambda name, rank: 255),
        2,
        ("full (6, no background)", "{tmp}/data/mask/", "(full)", "plugins.dapt.mask.fallback"),
        may_write=("run",),
    ),
    Case(
        "masks-one-empty-within-a-configured-limit",
        "unclear",
        lambda tmp: dapt(tmp, one_empty, *LIMIT_HALF, quiet=True),
        0,
        ("warning: 1 of 6 training masks are empty (1) or full (0), within max_empty_or_full 0.5",),
        may_write=("run",),
    ),
    Case(
        "masks-empty-with-fallback-full",
        "unclear",
        lambda tmp: dapt(tmp, lambda name, rank: 0, "plugins.dapt.mask.fallback", "full"),
        0,
        ("warning: 6 of 6 training masks are empty (no foreground), read as all-foreground",),
        may_write=("run",),
        check=empty_as_full,
    ),
    Case(
        "masks-empty-and-full-with-fallback-skip",
        "unclear",
        lambda tmp: dapt(tmp, one_empty_one_full, "plugins.dapt.mask.fallback", "skip"),
        0,
        ("1 empty (no foreground), 1 full (no background)",),
        may_write=("run",),
        check=two_skipped,
    ),
    Case(
        "masks-limit-out-of-range",
        "traceback",
        lambda tmp: dapt(tmp, lambda name, rank: 1, "plugins.dapt.mask.max_empty_or_full", "1.5"),
        2,
        ("max_empty_or_full 1.5", "[0, 1]"),
        may_write=("run",),
    ),
    Case(
        "masks-gradcam-prints-the-summary",
        "silent",
        gradcam,
        0,
        ("mean foreground",),
        may_write=("masks",),
        check=summary_matches_the_files,
    ),
]


# -- classes ----------------------------------------------------------------------------------------------------
def with_folders(classes: Sequence[str], *extra: str, more: Callable[[Path], object] | None = None) -> Any:
    def setup(tmp: Path) -> list[str]:
        class_folders(tmp / "data", classes)
        if more is not None:
            more(tmp)
        return train_argv(tmp, *extra)

    return setup


def empty_fox(tmp: Path) -> None:
    (tmp / "data" / "fox").mkdir()


def fox_of_other_files(tmp: Path) -> None:
    (tmp / "data" / "fox").mkdir()
    (tmp / "data" / "fox" / "a.heic").write_bytes(b"\x00\x00\x00 ftypheic")
    (tmp / "data" / "fox" / "notes.txt").write_text("foxes\n")


def same_names_from_a_file(tmp: Path) -> list[str]:
    class_folders(tmp / "data", ["a", "b"])
    (tmp / "names.json").write_text(json.dumps({"a": "otter", "b": "Otter"}))
    return train_argv(tmp, "--opts", "data.options.classnames", str(tmp / "names.json"))


def csv_of_same_names(tmp: Path) -> list[str]:
    class_folders(tmp / "data", ["x", "y"])
    rows = ["path,label,classname"] + [
        f"{c}/{i}.png,{label},{name}"
        for label, (c, name) in enumerate([("x", "sea_lion"), ("y", "sea lion")])
        for i in range(4)
    ]
    (tmp / "data" / "labels.csv").write_text("\n".join(rows) + "\n")
    return train_argv(tmp, "--opts", "data.options.csv", "labels.csv", dataset="csv")


def caltech(tmp: Path, rows: list[list[Any]], names: Sequence[str] = ("sea_lion", "otter")) -> Path:
    """data/caltech-101 with images of two classes and a split file: every image in train and test, plus `rows`."""
    dataset = tmp / "data" / "caltech-101"
    entries: list[list[Any]] = []
    for label, name in enumerate(names):
        folder = dataset / "101_ObjectCategories" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(3):
            photo(10 * label + i).save(folder / f"{i}.jpg")
            entries.append([f"c{label}/{i}.jpg", label, name])
    split = {"train": entries + rows, "val": [], "test": entries}
    (dataset / "split_zhou_Caltech101.json").write_text(json.dumps(split))
    return dataset


def caltech_argv(tmp: Path, rows: list[list[Any]], names: Sequence[str] = ("sea_lion", "otter")) -> list[str]:
    caltech(tmp, rows, names)
    return train_argv(tmp, "--quiet", dataset="caltech101")


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def fashion_on_tiny_synthetic(tmp: Path) -> list[str]:
    folders = [f"c{i}" for i in range(len(FASHION))]
    class_folders(tmp / "data", folders, per_class=2)
    (tmp / "names.json").write_text(json.dumps(dict(zip(folders, FASHION, strict=True))))
    recipe = own_recipe(tmp, arch="tiny-synthetic", weights=None)
    return train_argv(tmp, "--quiet", "--opts", "data.options.classnames", str(tmp / "names.json"), recipe=recipe)


def tied_names_named(tmp: Path, output: str) -> None:
    from promptclip.clip.weights import load_clip
    from promptclip.runs.inputs import tied_class_names

    groups = tied_class_names(load_clip("tiny-synthetic"), FASHION, "a photo of a {}.")
    tied = [name for group in groups for name in group]
    assert len(tied) >= 2, groups
    warning = next(line for line in output.splitlines() if "identical text features" in line)
    assert f"{len(tied)} of the 10 class names" in warning, warning
    for name in tied:
        assert repr(name) in warning, (name, warning)
    for name in set(FASHION) - set(tied):
        assert repr(name) not in warning, (name, warning)
    assert "identical text features" in log_of(tmp)


def base2new_on_three(tmp: Path) -> list[str]:
    class_folders(tmp / "data", ["cat", "dog", "fox"])
    argv = ["run", "base2new", "--recipe", own_recipe(tmp), "--datasets", "folder", "--root", str(tmp / "data")]
    return [*argv, "--shots", "1", "--seeds", "1", "--runs-dir", str(tmp / "runs"), "--quiet"]


CASES += [
    Case(
        "empty-class-folder",
        "silent",
        with_folders(["cat", "dog"], more=empty_fox),
        2,
        ("{tmp}/data/fox (holds nothing)", "class folders hold no image", "remove the folder"),
        may_write=("run",),
    ),
    Case(
        "class-folder-of-unread-files",
        "unclear",
        with_folders(["cat", "dog"], more=fox_of_other_files),
        2,
        ("{tmp}/data/fox (holds 2 files, none of them an image, e.g. a.heic, notes.txt)", ".png"),
        may_write=("run",),
    ),
    Case(
        "one-class",
        "silent",
        with_folders(["cat"]),
        2,
        ("{tmp}/data hold only the class 'cat'", "at least 2 classes"),
        may_write=("run",),
        check=nothing_trained,
    ),
    Case(
        "base2new-half-of-one-class",
        "silent",
        base2new_on_three,
        2,
        ("the new classes of folder (3 classes) are 1", "at least 4 classes"),
        may_write=("runs",),
    ),
    Case(
        "same-name-after-underscores",
        "silent",
        with_folders(["sea_lion", "sea lion"]),
        2,
        ("{tmp}/data: classes with the same name in prompts", "'sea lion' and label 1 'sea_lion'", "--classnames FILE"),
        may_write=("run",),
    ),
    Case(
        "same-name-but-case",
        "silent",
        with_folders(["Cat", "cat"]),
        2,
        ("label 0 'Cat' and label 1 'cat'", "Rename one"),
        may_write=("run",),
    ),
    Case(
        "same-name-from-a-class-name-file",
        "silent",
        same_names_from_a_file,
        2,
        ("label 0 'otter' (a) and label 1 'Otter' (b), all 'otter' in prompts",),
        may_write=("run",),
    ),
    Case(
        "same-name-in-a-csv",
        "silent",
        csv_of_same_names,
        2,
        ("{tmp}/data/labels.csv: classes with the same name in prompts", "'sea_lion'", "'sea lion'"),
        may_write=("run",),
    ),
    Case(
        "same-name-in-a-published-split-warns",
        "unclear",
        lambda tmp: caltech_argv(tmp, [], names=("sea_lion", "Sea lion")),
        0,
        ("warning: {tmp}/data/caltech-101/split_zhou_Caltech101.json: classes with the same name in prompts",),
        may_write=("run",),
    ),
    Case(
        "names-the-backbone-cannot-tell-apart",
        "silent",
        fashion_on_tiny_synthetic,
        0,
        ("warning:", "identical text features from backbone tiny-synthetic", "--classnames FILE"),
        may_write=("run",),
        check=tied_names_named,
    ),
    Case(
        "split-file-label-out-of-range",
        "traceback",
        lambda tmp: caltech_argv(tmp, [["c1/0.jpg", 7, "otter"]]),
        2,
        ("{tmp}/data/caltech-101/split_zhou_Caltech101.json", "7 at 'c1/0.jpg'", "label column"),
        may_write=("run",),
    ),
    Case(
        "split-file-negative-label",
        "traceback",
        lambda tmp: caltech_argv(tmp, [["c1/1.jpg", -1, "otter"]]),
        2,
        ("{tmp}/data/caltech-101/split_zhou_Caltech101.json", "'c1/1.jpg' has label -1"),
        may_write=("run",),
    ),
]


# -- a disk full when the run starts ------------------------------------------------------------------------------
# Loaded by the command's own Python (PYTHONPATH=. in the case folder): writing the run folder's lock file fails
# with ENOSPC, as on a disk without a free block (creating the empty file still works there).
FULL_DISK_AT_THE_LOCK = """
import errno, os

_open, _write, _close = os.open, os.write, os.close
_locks = set()


def _open_(path, flags, mode=0o777, *, dir_fd=None):
    fd = _open(path, flags, mode, dir_fd=dir_fd)
    if os.fspath(path).endswith("/run/.lock"):
        _locks.add(fd)
    return fd


def _write_(fd, data):
    if fd in _locks:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _write(fd, data)


def _close_(fd):
    _locks.discard(fd)
    return _close(fd)


os.open, os.write, os.close = _open_, _write_, _close_
"""


def full_disk_at_the_lock(tmp: Path) -> list[str]:
    (tmp / "sitecustomize.py").write_text(FULL_DISK_AT_THE_LOCK)
    return ["train", "--recipe", SMOKE, "--output", str(tmp / "run"), "--quiet"]


def no_lock_left_and_a_retry_runs(tmp: Path, output: str) -> None:
    from promptclip.cli import main

    assert not (tmp / "run" / ".lock").exists(), "an empty lock file was left behind"
    assert main(["train", "--recipe", SMOKE, "--output", str(tmp / "run"), "--quiet"]) == 0  # at once, not in 30 s


CASES += [
    Case(
        "disk-full-at-the-lock",
        "unclear",
        full_disk_at_the_lock,
        2,
        ("the disk is full", "{tmp}/run/.lock", "file system of {tmp}/run)", "Free some space"),
        may_write=("run",),
        subprocess=True,
        env={"PYTHONPATH": os.pathsep.join([".", *filter(None, [os.environ.get("PYTHONPATH")])])},
        check=no_lock_left_and_a_retry_runs,
    ),
]
