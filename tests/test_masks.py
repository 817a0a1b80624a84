"""Mask rules, encodings, fallbacks, and mask/image alignment through the store and the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import write_array_image, write_image
from PIL import Image

from promptclip.clip.transforms import CLIP_MEAN, CLIP_STD
from promptclip.data.datasets import Datum, build_dataset
from promptclip.data.loader import build_loader
from promptclip.data.masks import (
    FileMaskStore,
    MaskConfig,
    MaskError,
    attach_masks,
    decode_mask,
    detect_encoding,
    foreground_of,
)

RED, BLUE = (230, 30, 30), (30, 30, 230)


def values(*items: int) -> np.ndarray:
    return np.array(items, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ encodings


def test_encoding_is_detected_per_mask():
    assert detect_encoding(values(0, 255, 255, 0)) == "binary"
    assert detect_encoding(values(0, 1, 3, 255)) == "index"  # small label ids, 255 = ignore
    assert detect_encoding(values(0, 2, 5, 130, 250, 255)) == "binary"  # grey levels: a compressed 0/255 mask
    assert detect_encoding(values(0, 0)) == "binary"


def test_foreground_under_each_encoding():
    raw = values(0, 1, 7, 128, 254, 255)
    assert foreground_of(raw, "binary").tolist() == [False, False, False, True, True, True]
    assert foreground_of(raw, "index").tolist() == [False, True, True, True, True, False]
    assert foreground_of(raw, "index", "foreground").tolist() == [False, True, True, True, True, True]
    # Auto on a label-index mask follows the official rule: 255 -> background, other non-zero -> foreground.
    assert foreground_of(values(0, 1, 2, 255), "auto").tolist() == [False, True, True, False]


def test_decoding_reads_palette_indices_and_the_red_channel():
    palette = Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [255] * (253 * 3))
    assert np.asarray(decode_mask(palette)).tolist() == [[0, 255], [255, 0]]
    colour = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 255]]], dtype=np.uint8), mode="RGB")
    assert np.asarray(decode_mask(colour)).tolist() == [[255, 0]]


# ----------------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("rule", "layout", "image", "expected"),
    [
        ("mirror", "last2", "images/apple_pie/1.jpg", "apple_pie/1.jpg"),
        ("last2", "mirror", "SUN397/c/church/indoor/x.jpg", "indoor/x.jpg"),
        ("basename", "mirror", "images/Abyssinian_1.jpg", "Abyssinian_1.jpg"),
        ("dapt", "basename", "cars_train/00001.jpg", "00001.jpg"),
        ("dapt", "last2", "101_ObjectCategories/face/image_0001.jpg", "face/image_0001.jpg"),
        ("dapt", "mirror", "SUN397/a/abbey/x.jpg", "a/abbey/x.jpg"),
    ],
)
def test_mask_path_rules(tmp_path, rule, layout, image, expected):
    image_dir = image.split("/")[0] if not image.startswith("cars") else ""
    store = FileMaskStore(tmp_path, image_dir, MaskConfig(rule=rule), official_layout=layout)
    assert store.relative_mask_path(Datum(image, 0, "x")) == expected


def test_the_official_layouts_of_the_field_datasets():
    layouts = {
        name: build_layout(name)
        for name in ("food101", "caltech101", "dtd", "eurosat", "ucf101", "sun397", "imagenet", "oxford_pets")
    }
    assert layouts["food101"] == layouts["ucf101"] == layouts["eurosat"] == "last2"
    assert layouts["sun397"] == layouts["imagenet"] == "mirror"
    assert layouts["oxford_pets"] == "basename"


def build_layout(name: str) -> str:
    from promptclip.registry import DATASETS

    return DATASETS.get(name).official_mask_layout


def test_any_extension_is_found_preferring_the_images_own_then_png(tmp_path):
    write_image(tmp_path / "mask" / "a" / "1.bmp")
    write_image(tmp_path / "mask" / "a" / "2.png")
    write_image(tmp_path / "mask" / "a" / "2.jpg")
    store = FileMaskStore(tmp_path, "images", MaskConfig())
    assert store.find(Datum("images/a/1.jpg", 0, "a")) == tmp_path / "mask" / "a" / "1.bmp"
    assert store.find(Datum("images/a/9.jpg", 0, "a")) is None
    assert store.find(Datum("images/a/2.jpg", 0, "a")).name == "2.jpg"
    assert store.find(Datum("images/a/2.webp", 0, "a")).name == "2.png"
    custom = FileMaskStore(tmp_path, "images", MaskConfig(mask_dir=str(tmp_path / "elsewhere")))
    write_image(tmp_path / "elsewhere" / "a" / "3.png")
    assert custom.find(Datum("images/a/3.jpg", 0, "a")) is not None


# ------------------------------------------------------------------------------------- missing masks


def folder_dataset(root: Path, count: int, with_masks: int) -> None:
    for i in range(count):
        write_image(root / "cat" / f"{i}.jpg", size=(16, 12))
        if i < with_masks:
            write_array_image(root / "mask" / "cat" / f"{i}.png", np.full((12, 16), 255, dtype=np.uint8))


def test_missing_masks_are_an_error_that_lists_them(tmp_path):
    folder_dataset(tmp_path, 5, 2)
    splits = build_dataset("folder", tmp_path, split_fractions="1,0,0")
    with pytest.raises(MaskError) as caught:
        attach_masks(splits)
    message = str(caught.value)
    assert "3 of 5 train images have no mask" in message
    for i in (2, 3, 4):
        assert f"cat/{i}.jpg" in message
    assert "--mask-fallback full|skip" in message


def test_fallbacks_skip_and_full_are_explicit_choices(tmp_path):
    folder_dataset(tmp_path, 5, 2)
    splits = build_dataset("folder", tmp_path, split_fractions="1,0,0")
    skipped = attach_masks(splits, MaskConfig(fallback="skip"))
    assert sorted(d.path for d in skipped.train) == ["cat/0.jpg", "cat/1.jpg"]
    assert skipped.info["masks_skip_train"] == 3
    full = attach_masks(splits, MaskConfig(fallback="full"))
    assert len(full.train) == 5
    batch = next(iter(build_loader(full, "train", train=False, batch_size=5, image_size=8, with_masks=True)))
    assert batch["mask"].shape == (5, 1, 8, 8) and torch.all(batch["mask"] == 1)


def test_a_mask_of_another_size_is_resized_with_nearest_neighbour(tmp_path):
    write_image(tmp_path / "cat" / "0.png", size=(32, 32))
    half = np.zeros((8, 8), dtype=np.uint8)
    half[:, 4:] = 255
    write_array_image(tmp_path / "mask" / "cat" / "0.png", half)
    splits = attach_masks(build_dataset("folder", tmp_path, split_fractions="1,0,0"))
    batch = next(iter(build_loader(splits, "train", train=False, batch_size=1, image_size=32, with_masks=True)))
    mask = batch["mask"][0, 0]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.all(mask[:, :16] == 0) and torch.all(mask[:, 16:] == 1)


# ---------------------------------------------------------------------------------------------- alignment


def patterned_tree(root: Path, count: int, encoding: str) -> None:
    """Images of red and blue blocks; each mask is derived from its image (red = foreground)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        blocks = rng.random((5, 6)) < 0.5
        red = np.kron(blocks, np.ones((8, 8), dtype=bool))  # 40 x 48 pixels
        image = np.where(red[..., None], np.array(RED, np.uint8), np.array(BLUE, np.uint8)).astype(np.uint8)
        write_array_image(root / "shapes" / f"{i}.png", image)
        if encoding == "binary":
            mask = np.where(red, 255, 0)
        else:  # label-index: id 3 for the object, 255 (ignore) on the first background row
            mask = np.where(red, 3, 0)
            mask[0][~red[0]] = 255
        write_array_image(root / "mask" / "shapes" / f"{i}.png", mask.astype(np.uint8))


@pytest.mark.parametrize("encoding", ["binary", "index"])
def test_masks_stay_aligned_with_their_images_under_random_crops_and_flips(tmp_path, encoding):
    patterned_tree(tmp_path, 8, encoding)
    splits = attach_masks(build_dataset("folder", tmp_path, split_fractions="1,0,0"))
    loader = build_loader(splits, "train", batch_size=4, image_size=24, seed=3)
    agreements = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
            pixels = batch["image"] * std + mean
            red_in_image = pixels[:, 0] > pixels[:, 2]
            mask = batch["mask"][:, 0]
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            agreements.append((red_in_image == (mask > 0.5)).float().mean().item())
    assert min(agreements) > 0.95
    # A mask that missed the flip or the crop would agree far less often: check the test can tell.
    batch = next(iter(loader))
    pixels = batch["image"] * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    flipped = (pixels[:, 0] > pixels[:, 2]) == (batch["mask"][:, 0].flip(-1) > 0.5)
    assert flipped.float().mean().item() < 0.9


def test_synthetic_masks_reach_the_batch_exactly():
    from promptclip.data import synthetic

    splits = build_dataset("synthetic_objects", None, train_per_class=1, val_per_class=0, test_per_class=1)
    splits = attach_masks(splits)  # no files: the renderer's exact masks are kept
    batch = next(iter(build_loader(splits, "test", batch_size=3, image_size=64, with_masks=True)))
    task = synthetic.build_task("synthetic_objects", train_per_class=1, val_per_class=0, test_per_class=1)
    for row in range(3):
        _, exact = synthetic.render(task.test[row].spec, 64)
        assert torch.equal(batch["mask"][row, 0].bool(), torch.from_numpy(exact))


def test_config_values_are_validated():
    with pytest.raises(MaskError, match="rule 'mirorr'"):
        MaskConfig(rule="mirorr")  # type: ignore[arg-type]
