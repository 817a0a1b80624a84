"""Pixels finished on the device (8-bit crops normalised there, or decoded images cropped there) give the
host path's batches, and deterministic crops kept in memory give the same batches without decoding again."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from promptclip.clip.transforms import CLIP_STD
from promptclip.config import ConfigError, load_run_config
from promptclip.data.crop_cache import SHARED_CROP_CACHE, CropCache
from promptclip.data.datasets import build_dataset
from promptclip.data.datasets.base import DatasetSplits, Datum
from promptclip.data.loader import build_loader, default_num_workers
from promptclip.runs.inputs import device_options, eval_loader

CPU = torch.device("cpu")
SIZE = 24
# One 8-bit level in normalised units is 1 / (255 * std) for the channel with the smallest std.
LEVEL = 1.0 / (255.0 * min(CLIP_STD))


@pytest.fixture(scope="module")
def shapes():
    return build_dataset("synthetic_shapes", None, train_per_class=3, val_per_class=1, test_per_class=2, image_size=40)


def counting(splits: DatasetSplits) -> tuple[DatasetSplits, list[str]]:
    """`splits` whose reader records every image it decodes."""
    calls: list[str] = []
    renderer = splits.reader

    class CountingReader:
        def load_image(self, datum):
            calls.append(datum.path)
            return renderer.load_image(datum)

    return splits.replace(reader=CountingReader()), calls


def epoch(loader, number: int = 0) -> list[dict]:
    loader.set_epoch(number)
    return list(loader)


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert set(a) == set(b)
        assert torch.equal(a["image"], b["image"]) and a["image"].dtype == torch.float32
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
        assert a["path"] == b["path"]
        if "mask" in a:
            assert torch.equal(a["mask"], b["mask"])


def loaders(splits, split, **options):
    options = {"batch_size": 4, "image_size": SIZE, "seed": 5, "crop_cache": None, **options}
    host = build_loader(splits, split, **options)
    return host, options


@pytest.mark.parametrize(("split", "masks"), [("train", False), ("train", True), ("test", False)])
def test_uint8_pixels_normalised_on_the_device_are_bitwise_the_host_path(shapes, split, masks):
    host, options = loaders(shapes, split, with_masks=masks)
    device = build_loader(shapes, split, device=CPU, pixels="uint8", **options)
    assert_same_batches(epoch(host, 1), epoch(device, 1))


@pytest.mark.parametrize(("split", "masks"), [("train", False), ("train", True), ("test", False)])
def test_decoded_images_cropped_on_the_device_match_the_host_pixels(shapes, split, masks):
    host, options = loaders(shapes, split, with_masks=masks)
    device = build_loader(shapes, split, device=CPU, pixels="decoded", **options)
    host_batches, device_batches = epoch(host, 2), epoch(device, 2)
    assert len(host_batches) == len(device_batches)
    mismatched = total = 0
    for a, b in zip(host_batches, device_batches, strict=True):
        assert torch.equal(a["index"], b["index"]) and b["image"].shape == a["image"].shape
        difference = (a["image"] - b["image"]).abs()
        # Both resize as PIL does, rounding to 8 bits after each pass; they part only where PIL's fixed-point
        # weights put a value within ~1e-3 of a half level on the other side: one level in the output, or two
        # where two such ties meet in one bicubic window (far rarer). Float noise of the normalisation is
        # ~1e-6, far below a level.
        assert difference.max() <= 2 * LEVEL + 1e-4
        mismatched += int((difference > 1e-4).sum())
        total += difference.numel()
        if masks:
            assert torch.equal(a["mask"], b["mask"])  # nearest neighbour: the same source pixels
    assert mismatched <= 0.01 * total  # ties are rare: well under 1% of the values


def test_decoded_pixels_can_fail(shapes):
    """A box other than the drawn one shows: the comparison above can tell wrong geometry from rounding."""
    host, options = loaders(shapes, "train")
    device = build_loader(shapes, "train", device=CPU, pixels="decoded", **options)
    device.set_epoch(0)
    host.set_epoch(3)
    different = (next(iter(host))["image"] - next(iter(device))["image"]).abs().max()
    assert different > 2 * LEVEL


def test_a_device_format_needs_a_device(shapes):
    with pytest.raises(ValueError, match="give the loader its device"):
        build_loader(shapes, "test", batch_size=2, image_size=SIZE, pixels="uint8")


# -- kept crops ---------------------------------------------------------------------------------------------
def test_kept_evaluation_crops_are_the_same_batches_without_decoding_again(shapes):
    splits, calls = counting(shapes)
    reference = epoch(build_loader(shapes, "test", batch_size=3, image_size=SIZE, crop_cache=None))
    cache = CropCache()
    first = epoch(build_loader(splits, "test", batch_size=3, image_size=SIZE, crop_cache=cache))
    decoded = len(calls)
    assert decoded == len(shapes.test)
    # Another loader over the same images (a later run of a sweep) and another batch size.
    again = epoch(build_loader(splits, "test", batch_size=3, image_size=SIZE, crop_cache=cache), 4)
    assert len(calls) == decoded  # nothing decoded the second time
    assert_same_batches(reference, first)
    assert_same_batches(reference, again)
    resized = epoch(build_loader(splits, "test", batch_size=5, image_size=SIZE, crop_cache=cache))
    assert len(calls) == decoded and cache.hits == 2 * len(shapes.test)
    assert torch.equal(torch.cat([b["image"] for b in resized]), torch.cat([b["image"] for b in reference]))


def test_without_a_cache_every_evaluation_decodes(shapes):
    splits, calls = counting(shapes)
    loader = build_loader(splits, "test", batch_size=3, image_size=SIZE, crop_cache=None)
    epoch(loader)
    epoch(loader)
    assert len(calls) == 2 * len(shapes.test)


def test_random_crops_and_masks_are_never_kept(shapes):
    splits, calls = counting(shapes)
    cache = CropCache()
    loader = build_loader(splits, "train", batch_size=3, image_size=SIZE, crop_cache=cache, with_masks=False)
    epoch(loader, 0)
    epoch(loader, 1)
    assert len(calls) == 2 * len(shapes.train) and cache.nbytes == 0
    masked = build_loader(splits, "train", batch_size=3, image_size=SIZE, crop_cache=cache, augment=False)
    epoch(masked)
    assert cache.nbytes == 0  # training with masks: the masks are not kept, so neither are the crops


def test_training_without_augmentation_keeps_its_crops(shapes):
    splits, calls = counting(shapes)
    cache = CropCache()
    options = {"batch_size": 5, "image_size": SIZE, "augment": False, "with_masks": False, "seed": 2}  # 6 full batches
    loader = build_loader(splits, "train", crop_cache=cache, **options)
    first, second = epoch(loader, 0), epoch(loader, 1)
    assert len(calls) == len(shapes.train)
    assert_same_batches(first, epoch(build_loader(shapes, "train", crop_cache=None, **options), 0))
    assert_same_batches(second, epoch(build_loader(shapes, "train", crop_cache=None, **options), 1))


def test_the_budget_bounds_the_cache_and_the_rest_is_read(shapes):
    splits, calls = counting(shapes)
    crop_bytes = 3 * SIZE * SIZE
    cache = CropCache(max_bytes=3 * crop_bytes + crop_bytes // 2)  # room for three crops
    reference = epoch(build_loader(shapes, "test", batch_size=2, image_size=SIZE, crop_cache=None))
    loader = build_loader(splits, "test", batch_size=2, image_size=SIZE, crop_cache=cache)
    epoch(loader)
    assert cache.nbytes == 3 * crop_bytes
    calls.clear()
    assert_same_batches(reference, epoch(loader))
    # The first batch (two kept crops) is served; the second (one kept, one not) and the rest are read.
    assert len(calls) == len(shapes.test) - 2


def test_a_new_source_displaces_the_one_used_longest_ago(shapes):
    crop_bytes = 3 * SIZE * SIZE
    cache = CropCache(max_bytes=len(shapes.test) * crop_bytes)
    first, _ = counting(shapes)
    second, _ = counting(shapes)  # another reader: another source
    epoch(build_loader(first, "test", batch_size=3, image_size=SIZE, crop_cache=cache))
    epoch(build_loader(second, "test", batch_size=3, image_size=SIZE, crop_cache=cache))
    assert cache.nbytes == len(shapes.test) * crop_bytes  # the second source only


def write_pictures(folder: Path, count: int) -> DatasetSplits:
    rng = np.random.default_rng(0)
    test = []
    for index in range(count):
        picture = Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
        picture.save(folder / f"img{index}.png")
        test.append(Datum(f"img{index}.png", index % 2, f"class {index % 2}"))
    return DatasetSplits("pictures", folder, ["class 0", "class 1"], "a photo of a {}.", [], [], test)


def test_a_file_changed_on_disk_is_read_again(tmp_path):
    splits = write_pictures(tmp_path, 4)
    cache = CropCache()
    loader = build_loader(splits, "test", batch_size=2, image_size=SIZE, crop_cache=cache)
    before = epoch(loader)
    Image.new("RGB", (41, 30), (255, 0, 0)).save(tmp_path / "img1.png")
    os.utime(tmp_path / "img1.png", ns=(1, 1))  # a new modification time even on a coarse clock
    after = epoch(loader)
    assert torch.equal(before[1]["image"], after[1]["image"])  # unchanged files: served as before
    assert not torch.equal(before[0]["image"][1], after[0]["image"][1])
    assert_same_batches(after, epoch(build_loader(splits, "test", batch_size=2, image_size=SIZE, crop_cache=None)))


def test_kept_crops_with_workers_are_the_same_batches(tmp_path):
    splits = write_pictures(tmp_path, 7)
    cache = CropCache()
    options = {"batch_size": 3, "image_size": SIZE, "num_workers": 2}
    reference = epoch(build_loader(splits, "test", crop_cache=None, **options))
    loader = build_loader(splits, "test", crop_cache=cache, **options)
    assert_same_batches(reference, epoch(loader))
    assert_same_batches(reference, epoch(loader))
    assert cache.hits == 7


# -- workers ------------------------------------------------------------------------------------------------
def test_auto_workers_none_on_a_cpu_and_all_cores_but_one_on_a_gpu(monkeypatch):
    assert default_num_workers(None) == 0 and default_num_workers(CPU) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(12)), raising=False)
    assert default_num_workers(torch.device("cuda")) == 11
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    assert default_num_workers(torch.device("cuda")) == 16
    assert build_loader(write_pictures_stub(), "test", batch_size=2).num_workers == 0


def write_pictures_stub() -> DatasetSplits:
    return DatasetSplits("stub", None, ["a"], "{}", [], [], [Datum("x", 0, "a")])


# -- the run's settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        (["data.num_workers", "-2"], "data.num_workers is -2; it must be -1 (auto"),
        (["data.crop_cache_mb", "-1"], "data.crop_cache_mb is -1; it must be 0 (keep no crops) or more"),
        (["data.crop_on_device", "yes please"], "data.crop_on_device: expected true or false"),
    ],
)
def test_bad_loader_settings_are_refused_naming_the_field(opts, expected):
    with pytest.raises(ConfigError) as error:
        load_run_config(None, opts)
    assert expected in str(error.value)


def test_a_run_on_a_cpu_loads_float_pixels_and_keeps_evaluation_crops_within_its_budget(shapes, monkeypatch):
    monkeypatch.setattr(SHARED_CROP_CACHE, "max_bytes", SHARED_CROP_CACHE.max_bytes)  # restored afterwards
    cfg = load_run_config(None, ["data.crop_cache_mb", "3", "data.crop_on_device", "true"])
    options = device_options(cfg, CPU)
    assert options["pixels"] == "auto" and options["crop_cache"] is SHARED_CROP_CACHE  # no GPU: no device crops
    assert SHARED_CROP_CACHE.max_bytes == 3 * 2**20
    loader = eval_loader(shapes, "test", cfg, SimpleNamespace(image_size=SIZE), CPU)  # type: ignore[arg-type]
    assert loader.pixels == "float" and loader.num_workers == 0 and loader.crop_cache is SHARED_CROP_CACHE
    assert device_options(load_run_config(None, ["data.crop_cache_mb", "0"]), CPU)["crop_cache"] is None


def test_finishing_a_batch_makes_no_tensor_from_host_values_after_the_first(shapes, monkeypatch):
    """On a GPU a tensor made from Python values is a copy that waits for the device's queue: the constants of
    normalising and the nearest-neighbour indices are made once per device, not at every batch."""
    from promptclip.data.device_pixels import collate_decoded, finish_batch

    dataset = build_loader(shapes, "train", batch_size=4, image_size=SIZE, with_masks=True).dataset
    batches = []
    for pixels in ("decoded", "uint8"):
        items = [dataset.item(index, pixels) for index in range(4)]
        batches.append(collate_decoded(items) if pixels == "decoded" else torch.utils.data.default_collate(items))
        finish_batch(batches[-1], SIZE, CPU)  # first use: the constants are made
    made: list[tuple] = []
    original = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or original(*a, **k))
    finished = [finish_batch(batch, SIZE, CPU) for batch in batches]
    assert made == [] and all(batch["image"].shape == (4, 3, SIZE, SIZE) for batch in finished)
