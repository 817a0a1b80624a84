"""Training augmentation set from a recipe: `data.augment`, `data.crop_scale`, `data.flip` reach the loader,
bad values are refused naming the field, and the run identity changes with them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from promptclip.clip.transforms import EvalTransform, PairedEvalTransform, TrainTransform
from promptclip.config import ConfigError, load_run_config
from promptclip.data.datasets import build_dataset
from promptclip.data.loader import _SAMPLE, derive_seed
from promptclip.runs.inputs import train_loader

SIZE = 16


@pytest.fixture(scope="module")
def shapes():
    return build_dataset("synthetic_shapes", None, train_per_class=2, val_per_class=1, test_per_class=1, image_size=32)


def loader_for(shapes, *opts: str, masks: bool = False):
    cfg = load_run_config(None, ["data.batch_size", "4", *opts])
    clip = SimpleNamespace(image_size=SIZE)  # the loader reads only the image size of the backbone
    return train_loader(shapes, cfg, clip, seed=3, device=torch.device("cpu"), masks=masks)  # type: ignore[arg-type]


def epoch(loader, number: int) -> list[dict]:
    loader.set_epoch(number)
    return list(loader)


def test_augment_none_trains_on_the_evaluation_crop_every_epoch(shapes):
    loader = loader_for(shapes, "data.augment", "none", masks=True)
    first, second = epoch(loader, 0), epoch(loader, 1)
    evaluation = PairedEvalTransform(SIZE)
    for batch in first + second:
        for row, index in enumerate(batch["index"].tolist()):
            datum = shapes.train[index]
            pixels, mask = evaluation(shapes.load_image(datum), shapes.load_mask(datum))
            assert torch.equal(batch["image"][row], pixels)
            assert torch.equal(batch["mask"][row, 0], (mask >= 128).float())
    # The order is still shuffled per epoch; only the pixels are fixed.
    assert [b["index"].tolist() for b in first] != [b["index"].tolist() for b in second]


def test_crop_scale_and_flip_reach_the_random_crop(shapes):
    loader = loader_for(shapes, "data.crop_scale", "[0.5, 0.6]", "data.flip", "false")
    expected = TrainTransform(SIZE, scale=(0.5, 0.6), flip_p=0.0)
    default = TrainTransform(SIZE)
    differs_from_default = False
    for batch in epoch(loader, 2):
        for row, index in enumerate(batch["index"].tolist()):
            image = shapes.load_image(shapes.train[index])
            seed = derive_seed(_SAMPLE, 3, 2, index)
            assert torch.equal(batch["image"][row], expected(image, torch.Generator().manual_seed(seed)))
            differs_from_default |= not torch.equal(
                batch["image"][row], default(image, torch.Generator().manual_seed(seed))
            )
    assert differs_from_default  # the settings changed the pixels, so the comparison above can fail


def test_the_default_is_the_fields_augmentation(shapes):
    transform = loader_for(shapes).dataset.transform
    assert isinstance(transform, TrainTransform)
    assert (transform.scale, transform.flip_p) == ((0.08, 1.0), 0.5)
    assert not isinstance(loader_for(shapes, "data.augment", "none").dataset.transform, TrainTransform)
    assert isinstance(loader_for(shapes, "data.augment", "none").dataset.transform, EvalTransform)


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        (["data.crop_scale", "[0.6, 0.2]"], "data.crop_scale is (0.6, 0.2); it must be two numbers [low, high]"),
        (["data.crop_scale", "[0, 1]"], "with 0 < low <= high <= 1"),
        (["data.crop_scale", "[0.5, 1.5]"], "with 0 < low <= high <= 1"),
        (["data.crop_scale", "[0.5]"], "data.crop_scale is (0.5,)"),
        (["data.crop_scale", "0.5"], "data.crop_scale: expected a list"),
        (["data.augment", "flips"], "data.augment: 'flips' is not allowed; choose one of 'random_resized_crop'"),
        (["data.flip", "sometimes"], "data.flip: expected true or false"),
    ],
)
def test_bad_augmentation_values_are_refused_naming_the_field(opts, expected):
    with pytest.raises(ConfigError) as error:
        load_run_config(None, opts)
    assert expected in str(error.value)
