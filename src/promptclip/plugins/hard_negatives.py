"""DPC's dynamic hard-negative optimizer: which classes to contrast each training image against, the pictures
of those classes, and the symmetric contrastive loss over the resulting image-class pairs.

Per training step, for a batch of B anchors (image x_i, class y_i):

1. a frozen scorer (the stage-1 model) ranks every training class for each anchor;
2. the anchor's candidates are its top-K classes minus its ground truth, at most K - 1 of them;
3. a candidate is kept only if its class is not yet in the batch (the anchors' classes and the negatives
   accepted so far), so a negative is never the ground truth of any anchor;
4. an anchor with fewer than `min_negatives` is topped up with random classes not yet in the batch, drawn
   uniformly from every class (none is excluded);
5. each negative class contributes one picture from the picture library, augmented like the anchors;
6. the B' = B + sum(n_i) image-class pairs are scored with a symmetric InfoNCE; pairs whose classes repeat
   (two anchors of one class) are masked out instead of being counted as negatives.

Every random choice comes from a `torch.Generator` the caller seeds, so a step can be replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from promptclip.clip.transforms import TrainTransform
from promptclip.data.datasets.base import DatasetError, DatasetSplits, Datum

PRELOAD_MAX_IMAGES = 2000  # a few-shot library is decoded once; a full split is read per draw


# ---------------------------------------------------------------------------------------------------------
# Choosing the negative classes
# ---------------------------------------------------------------------------------------------------------


def select_negatives(
    scores: torch.Tensor,
    labels: torch.Tensor,
    top_k: int,
    min_negatives: int = 2,
    generator: torch.Generator | None = None,
    eligible: Sequence[bool] | None = None,
) -> list[list[int]]:
    """The negative classes of each anchor (row of `scores`, [B, C]), following steps 2-4 above.

    `eligible[c]` False keeps class c out (a class without pictures in the library). The returned classes are
    distinct across the whole batch and never equal to any label in `labels`.
    """
    if scores.dim() != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be [B, C] for B labels; got {tuple(scores.shape)} for {labels.shape[0]}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if min_negatives < 0:
        raise ValueError(f"min_negatives must be >= 0, got {min_negatives}")
    num_classes = scores.shape[1]
    allowed = [True] * num_classes if eligible is None else [bool(e) for e in eligible]
    if len(allowed) != num_classes:
        raise ValueError(f"eligible has {len(allowed)} entries for {num_classes} classes")
    label_list = [int(label) for label in labels.tolist()]
    in_batch = set(label_list)
    ranked = scores.detach().float().topk(min(top_k, num_classes), dim=1).indices.tolist()
    negatives: list[list[int]] = []
    for label, row in zip(label_list, ranked, strict=True):
        candidates = [c for c in row if c != label][: top_k - 1]
        chosen = []
        for c in candidates:
            if allowed[c] and c not in in_batch:
                chosen.append(c)
                in_batch.add(c)
        missing = min_negatives - len(chosen)
        if missing > 0:
            unused = [c for c in range(num_classes) if allowed[c] and c not in in_batch]
            order = torch.randperm(len(unused), generator=generator).tolist()
            for position in order[:missing]:
                chosen.append(unused[position])
                in_batch.add(unused[position])
        negatives.append(chosen)
    return negatives


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


def symmetric_contrastive_loss(
    image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """1/2 [CE(Z, diag) + CE(Z^T, diag)] with Z = s * I T^T over N image-class pairs (row i: image i, class
    labels[i]). Off-diagonal pairs of the same class are masked: a repeated class is not a negative."""
    if image_features.shape[0] != class_features.shape[0] or image_features.shape[0] != labels.shape[0]:
        raise ValueError("the image features, class features and labels must describe the same pairs")
    logits = logit_scale * image_features.float() @ class_features.float().t()
    same_class = labels[:, None] == labels[None, :]
    same_class.fill_diagonal_(False)
    logits = logits.masked_fill(same_class, float("-inf"))
    targets = torch.arange(labels.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


# ---------------------------------------------------------------------------------------------------------
# The picture library
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LibraryDraw:
    images: torch.Tensor  # [N, 3, S, S]
    labels: torch.Tensor  # [N]
    paths: list[str]


class PictureLibrary:
    """Labelled training pictures per class, indexed once, from which the negatives' images are drawn.

    Built from a run's training split (`from_splits`): by default the same seed's few-shot draw, so DPC sees
    no image beyond the shot budget; the full training split of the same classes reproduces the authors'
    setting. Small libraries are decoded once and kept in memory; large ones are read per draw.
    """

    def __init__(
        self,
        splits: DatasetSplits,
        data: Sequence[Datum],
        num_classes: int,
        image_size: int,
        preload: bool | None = None,
        source: str = "given",
    ) -> None:
        self.splits = splits
        self.num_classes = num_classes
        self.source = source
        self.transform = TrainTransform(image_size)
        self.by_class: list[list[Datum]] = [[] for _ in range(num_classes)]
        for datum in data:
            if not 0 <= datum.label < num_classes:
                raise DatasetError(
                    f"picture library of {splits.name!r}: {datum.path!r} has label {datum.label}, outside the "
                    f"{num_classes} training classes; build the library from the same class subset as the run"
                )
            self.by_class[datum.label].append(datum)
        self._decoded: dict[str, Image.Image] = {}
        size = sum(len(items) for items in self.by_class)
        if size == 0:
            raise DatasetError(f"picture library of {splits.name!r} is empty; DPC needs training pictures")
        if preload if preload is not None else size <= PRELOAD_MAX_IMAGES:
            for items in self.by_class:
                for datum in items:
                    self._decoded[datum.path] = splits.load_image(datum)

    @classmethod
    def from_splits(
        cls, splits: DatasetSplits, image_size: int, preload: bool | None = None, source: str = "few-shot train"
    ) -> PictureLibrary:
        return cls(splits, splits.train, splits.num_classes, image_size, preload, source)

    def __len__(self) -> int:
        return sum(len(items) for items in self.by_class)

    def has_pictures(self) -> list[bool]:
        """Per class: whether the library can give a picture of it."""
        return [bool(items) for items in self.by_class]

    def _image(self, datum: Datum) -> Image.Image:
        cached = self._decoded.get(datum.path)
        return cached if cached is not None else self.splits.load_image(datum)

    def draw(self, classes: Sequence[int], generator: torch.Generator | None = None) -> LibraryDraw:
        """One randomly chosen, randomly augmented picture per entry of `classes`."""
        if not classes:
            size = self.transform.image_size
            return LibraryDraw(torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.long), [])
        images, paths = [], []
        for label in classes:
            items = self.by_class[label]
            if not items:
                raise DatasetError(f"picture library of {self.splits.name!r} has no picture of class {label}")
            datum = items[int(torch.randint(len(items), (1,), generator=generator))]
            images.append(self.transform(self._image(datum), generator))
            paths.append(datum.path)
        return LibraryDraw(torch.stack(images), torch.tensor(list(classes), dtype=torch.long), paths)
