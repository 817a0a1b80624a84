"""Loader: batch layout, seeded determinism (workers, epochs), no zero-length loader, in-memory sets."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from promptclip.data.datasets import DatasetError, build_dataset
from promptclip.data.loader import build_loader, derive_seed, seed_worker


@pytest.fixture(scope="module")
def shapes():
    return build_dataset("synthetic_shapes", None, train_per_class=2, val_per_class=1, test_per_class=1, image_size=32)


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def same_batches(first, second) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
        for a, b in zip(first, second, strict=True)
    )


def test_batches_are_dicts_with_the_documented_layout(shapes):
    loader = build_loader(shapes, "train", batch_size=4, image_size=16, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"image", "label", "index", "path", "mask"}  # training on a dataset with masks
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
    assert batch["mask"].shape == (4, 1, 16, 16) and batch["mask"].dtype == torch.float32
    assert isinstance(batch["path"], list) and batch["path"][0].startswith("train/")
    for row in range(4):
        assert shapes.train[batch["index"][row]].label == batch["label"][row]
    evaluation = next(iter(build_loader(shapes, "test", batch_size=3, image_size=16)))
    assert "mask" not in evaluation
    assert evaluation["index"].tolist() == [0, 1, 2]  # in order, not shuffled


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(shapes):
    first = epoch_batches(build_loader(shapes, "train", batch_size=8, image_size=16, seed=1), 0)
    again = epoch_batches(build_loader(shapes, "train", batch_size=8, image_size=16, seed=1), 0)
    other = epoch_batches(build_loader(shapes, "train", batch_size=8, image_size=16, seed=2), 0)
    assert same_batches(first, again)
    assert not same_batches(first, other)


def test_epochs_differ_and_any_epoch_can_be_replayed_alone(shapes):
    loader = build_loader(shapes, "train", batch_size=8, image_size=16, seed=4)
    epoch0, epoch1 = epoch_batches(loader, 0), epoch_batches(loader, 1)
    assert not same_batches(epoch0, epoch1)
    resumed = build_loader(shapes, "train", batch_size=8, image_size=16, seed=4)
    assert same_batches(epoch_batches(resumed, 1), epoch1)


def test_batches_do_not_depend_on_the_number_of_workers(shapes):
    serial = epoch_batches(build_loader(shapes, "train", batch_size=5, image_size=16, seed=9), 2)
    parallel = epoch_batches(build_loader(shapes, "train", batch_size=5, image_size=16, seed=9, num_workers=2), 2)
    assert same_batches(serial, parallel)


def test_worker_seeds_derive_from_seed_epoch_and_worker_id():
    def draws(seed, epoch, worker):
        seed_worker(seed, epoch, worker)
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    assert draws(1, 0, 0) == draws(1, 0, 0)
    assert draws(1, 0, 0) != draws(1, 0, 1)
    assert draws(1, 0, 0) != draws(1, 1, 0)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)


@pytest.mark.parametrize(("size", "batch", "train", "expected"), [(3, 4, True, 1), (9, 4, True, 2), (9, 4, False, 3)])
def test_drop_last_never_leaves_a_loader_empty(size, batch, train, expected):
    tiny = build_dataset("synthetic_scenes", None, train_per_class=1, test_per_class=1, image_size=8)
    data = tiny.train[:size] if size <= len(tiny.train) else tiny.train
    loader = build_loader(tiny, data, train=train, batch_size=batch, image_size=8)
    batches = list(loader)
    assert len(loader) == len(batches) == expected
    seen = sum(len(b["index"]) for b in batches)
    assert seen == (size if not train or size < batch else (size // batch) * batch)


def test_an_empty_split_is_an_error_not_an_empty_loader():
    splits = build_dataset("synthetic_shapes", None, train_per_class=1, val_per_class=0, test_per_class=1)
    with pytest.raises(DatasetError, match=r"val split .* is empty"):
        build_loader(splits, "val", batch_size=4)


def test_in_memory_sets_decode_once_and_still_augment_per_epoch(shapes):
    few = shapes.replace(train=shapes.train[:6])
    calls = []
    renderer = few.reader

    class CountingReader:
        def load_image(self, datum):
            calls.append(datum.path)
            return renderer.load_image(datum)

    few = few.replace(reader=CountingReader())
    loader = build_loader(few, "train", batch_size=6, image_size=16, seed=0, in_memory=True, with_masks=False)
    assert len(calls) == 6
    epoch0, epoch1 = epoch_batches(loader, 0), epoch_batches(loader, 1)
    assert len(calls) == 6  # no decoding after the first time
    assert not torch.equal(epoch0[0]["image"], epoch1[0]["image"])
    streamed = build_loader(shapes.replace(train=shapes.train[:6]), "train", batch_size=6, image_size=16, seed=0)
    assert same_batches(epoch_batches(streamed, 1), epoch1)  # same crops as decoding every time
