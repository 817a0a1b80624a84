"""The dynamic hard-negative optimizer: negative selection, the masked symmetric contrastive loss, the
picture library."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dpc_cases import NoiseReader, picture_splits
from PIL import Image

from promptclip.data.datasets.base import Datum
from promptclip.plugins import hard_negatives
from promptclip.plugins.hard_negatives import (
    PictureLibrary,
    PictureRequest,
    PictureWorkers,
    contrastive_logits,
    rank_candidates,
    select_negatives,
    symmetric_contrastive_loss,
)


def ranked_scores(rows: list[list[int]], num_classes: int) -> torch.Tensor:
    """Scores whose descending order per row is the given class list (unlisted classes score lowest)."""
    scores = torch.full((len(rows), num_classes), -1.0)
    for i, order in enumerate(rows):
        for rank, c in enumerate(order):
            scores[i, c] = float(len(order) - rank)
    return scores


def test_hard_candidates_are_the_top_k_minus_the_ground_truth() -> None:
    scores = ranked_scores([[0, 5, 6, 7, 8, 9], [9, 8, 7, 6, 1, 5]], 10)
    labels = torch.tensor([0, 1])
    negatives = select_negatives(scores, labels, top_k=4, min_negatives=0)
    # Anchor 0: top-4 = 0 5 6 7, minus its label 0. Anchor 1: top-4 = 9 8 7 6 (label not among them), capped
    # at K - 1 = 3; 7 was taken by anchor 0, so it is dropped.
    assert negatives == [[5, 6, 7], [9, 8]]


def test_negatives_are_never_a_ground_truth_of_the_batch_and_never_repeat() -> None:
    generator = torch.Generator().manual_seed(0)
    num_classes = 12
    for _ in range(200):
        labels = torch.randint(num_classes, (6,), generator=generator)
        labels[1] = labels[0]  # a duplicated class among the anchors
        scores = torch.randn(6, num_classes, generator=generator)
        negatives = select_negatives(scores, labels, top_k=5, min_negatives=2, generator=generator)
        flat = [c for row in negatives for c in row]
        assert not set(flat) & set(labels.tolist())
        assert len(flat) == len(set(flat))


def test_too_few_hard_negatives_are_topped_up_with_random_unused_classes_from_every_class() -> None:
    num_classes = 6
    labels = torch.tensor([2, 3])
    # Both anchors rank only each other's class above their own: no hard negative survives the filter.
    scores = ranked_scores([[3, 2], [2, 3]], num_classes)
    drawn: set[int] = set()
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        negatives = select_negatives(scores, labels, top_k=2, min_negatives=2, generator=generator)
        assert [len(row) for row in negatives] == [2, 2]
        drawn |= {c for row in negatives for c in row}
    assert drawn == {0, 1, 4, 5}  # the first and the last class can be drawn too


def test_the_top_up_stops_when_no_class_is_left_and_respects_eligibility() -> None:
    labels = torch.tensor([0, 1, 2])
    scores = torch.zeros(3, 4)
    negatives = select_negatives(scores, labels, top_k=3, min_negatives=2)
    assert sum(len(row) for row in negatives) == 1 and [c for row in negatives for c in row] == [3]
    eligible = [True, True, True, False]
    assert select_negatives(scores, labels, top_k=3, min_negatives=2, eligible=eligible) == [[], [], []]


def test_negative_selection_is_reproducible_from_its_generator() -> None:
    scores = torch.randn(4, 20, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3])
    first = select_negatives(scores, labels, 2, 3, torch.Generator().manual_seed(5))
    second = select_negatives(scores, labels, 2, 3, torch.Generator().manual_seed(5))
    assert first == second


def test_select_negatives_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="top_k"):
        select_negatives(torch.zeros(2, 3), torch.tensor([0, 1]), top_k=0)
    with pytest.raises(ValueError, match="scores"):
        select_negatives(torch.zeros(3, 3), torch.tensor([0, 1]), top_k=2)


def test_symmetric_contrastive_loss_matches_its_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 4])
    scale = torch.tensor(10.0)
    logits = scale * images @ texts.t()
    targets = torch.arange(5)
    expected = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
    assert torch.allclose(symmetric_contrastive_loss(images, texts, labels, scale), expected)


def test_a_repeated_class_is_masked_not_counted_as_a_negative() -> None:
    generator = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    texts[1] = texts[0]  # rows 0 and 1 are the same class: the same class features
    labels = torch.tensor([7, 7, 2, 3])
    scale = torch.tensor(10.0)
    loss = symmetric_contrastive_loss(images, texts, labels, scale)
    logits = scale * images @ texts.t()
    keep = [[j for j in range(4) if j == i or labels[j] != labels[i]] for i in range(4)]
    rows = sum(-torch.log_softmax(logits[i, keep[i]], 0)[keep[i].index(i)] for i in range(4)) / 4
    cols = sum(-torch.log_softmax(logits[keep[i], i], 0)[keep[i].index(i)] for i in range(4)) / 4
    assert torch.allclose(loss, 0.5 * (rows + cols))
    unmasked = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4)))
    assert not torch.allclose(loss, unmasked)


def test_contrastive_logits_and_loss_stay_fp32_under_autocast() -> None:
    """Near s = 100 a bf16 logit moves in steps of 0.5: the pairs' logits run with autocast off, as every
    learner's logits do, so autocast changes nothing here (fp32 features in, bitwise the fp32 result out)."""
    generator = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    labels, scale = torch.tensor([0, 1, 1, 2, 3, 4]), torch.tensor(100.0)
    logits = contrastive_logits(images, texts, labels, scale)
    loss = symmetric_contrastive_loss(images, texts, labels, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = contrastive_logits(images, texts, labels, scale)
        autocast_loss = symmetric_contrastive_loss(images, texts, labels, scale)
    assert autocast_logits.dtype == autocast_loss.dtype == torch.float32
    assert torch.equal(autocast_logits, logits) and torch.equal(autocast_loss, loss)


def test_the_ranking_is_one_tensor_of_labels_and_top_classes() -> None:
    scores = ranked_scores([[4, 2, 0], [1, 3, 2]], 5)
    assert rank_candidates(scores, torch.tensor([2, 3]), top_k=2).tolist() == [[2, 4, 2], [3, 1, 3]]
    assert rank_candidates(scores, torch.tensor([2, 3]), top_k=9).shape == (2, 6)  # K capped at the classes


def test_picture_library_draws_a_picture_of_each_requested_class() -> None:
    splits = picture_splits(["a", "b", "c"], per_class=3)
    library = PictureLibrary.from_splits(splits, image_size=16)
    assert len(library) == 9 and library.has_pictures() == [True, True, True]
    drawn = library.draw([2, 0, 2], torch.Generator().manual_seed(0))
    assert drawn.images.shape == (3, 3, 16, 16)
    assert drawn.labels.tolist() == [2, 0, 2]
    assert [p.split("/")[1][0] for p in drawn.paths] == ["2", "0", "2"]


def test_the_negatives_pictures_are_augmented_as_the_runs_training_images() -> None:
    from promptclip.clip.transforms import Augmentation, EvalTransform, TrainTransform

    splits = picture_splits(["a", "b"], per_class=1)  # one picture per class: the draw picks only the crop
    picture = splits.load_image(splits.train[1])
    requests = PictureLibrary.from_splits(splits, image_size=16).requests([1, 1, 1], torch.Generator().manual_seed(3))

    def rendered(augmentation: Augmentation) -> list[torch.Tensor]:
        library = PictureLibrary.from_splits(splits, image_size=16, augmentation=augmentation)
        return [torch.from_numpy(library.render(request)[0]) for request in requests]

    def expected(transform: TrainTransform | EvalTransform, request: PictureRequest) -> torch.Tensor:
        generator = torch.Generator().manual_seed(request.seed)
        torch.randint(1, (1,), generator=generator)  # the library's choice among the class's one picture
        made = (
            transform.augment(picture, generator) if isinstance(transform, TrainTransform) else transform.crop(picture)
        )
        return torch.from_numpy(np.array(made, dtype=np.uint8))

    # Without augmentation every negative is the evaluation crop; with the run's crops, those crops and flips.
    no_augment = rendered(Augmentation(random_crops=False))
    assert all(torch.equal(p, expected(EvalTransform(16), r)) for p, r in zip(no_augment, requests, strict=True))
    half = TrainTransform(16, scale=(0.5, 1.0), flip_p=0.0)
    run_crops = rendered(Augmentation(scale=(0.5, 1.0), flip_p=0.0))
    assert all(torch.equal(p, expected(half, r)) for p, r in zip(run_crops, requests, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(run_crops, rendered(Augmentation()), strict=True))


def test_a_small_library_is_decoded_once() -> None:
    splits = picture_splits(["a", "b"], per_class=2)
    reader = splits.reader
    assert isinstance(reader, NoiseReader)
    library = PictureLibrary.from_splits(splits, image_size=16)
    assert reader.reads == 4
    for seed in range(5):
        library.draw([0, 1], torch.Generator().manual_seed(seed))
    assert reader.reads == 4
    streamed = PictureLibrary.from_splits(splits, image_size=16, preload=False)
    streamed.draw([0, 1])
    assert reader.reads == 6


def test_library_refuses_labels_outside_the_training_classes() -> None:
    splits = picture_splits(["a", "b"])
    splits = splits.replace(train=[*splits.train, Datum("train/x", 5, "x")])
    with pytest.raises(ValueError, match="outside"):
        PictureLibrary.from_splits(splits, image_size=16)


class DyingReader(NoiseReader):
    """Reads pictures in the process that built it; any other process (a picture worker) dies on its read."""

    def __init__(self) -> None:
        super().__init__()
        self.owner = os.getpid()

    def load_image(self, datum: Datum) -> Image.Image:
        if os.getpid() != self.owner:
            os._exit(1)
        return super().load_image(datum)


def test_a_picture_worker_that_dies_stops_the_draw_with_the_fix(monkeypatch) -> None:
    splits = picture_splits(["a", "b"]).replace(reader=DyingReader())
    library = PictureLibrary.from_splits(splits, image_size=16, preload=False)  # read in the worker
    monkeypatch.setattr(hard_negatives, "RENDER_TIMEOUT_S", 5)
    workers = PictureWorkers(library, 1, capacity=2)
    try:
        with pytest.raises(RuntimeError, match=r"data\.num_workers 0"):
            workers.render(library.requests([0, 1]))
    finally:
        workers.close()
