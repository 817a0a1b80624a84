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

The ranking is read on the host once per step, in one copy (`rank_candidates`): the pictures of the chosen
classes live on the host. Each negative picture is a `PictureRequest` (class, seed): `PictureLibrary.render`
picks the picture and crops, resizes and flips it from that seed alone, so it gives the same pixels in the
main process or in worker processes (`PictureWorkers`); the 8-bit pixels are normalised where the model runs.

Every random choice comes from a `torch.Generator` the caller seeds, so a step can be replayed.
"""

from __future__ import annotations

import math
import multiprocessing
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from promptclip.clip.transforms import FIELD_AUGMENTATION, Augmentation, augmented_picture, normalize_uint8
from promptclip.data.datasets.base import DatasetError, DatasetSplits, Datum
from promptclip.methods.base import scaled_cosine_logits

PRELOAD_MAX_IMAGES = 2000  # a few-shot library is decoded once; a full split is read per draw
_SEED_BOUND = 2**62  # per-picture seeds are drawn below this
RENDER_TIMEOUT_S = 600  # a step's pictures take well under a second per worker; far beyond: a lost worker


# ---------------------------------------------------------------------------------------------------------
# Choosing the negative classes
# ---------------------------------------------------------------------------------------------------------


def rank_candidates(scores: torch.Tensor, labels: torch.Tensor, top_k: int) -> torch.Tensor:
    """[B, 1 + k] on the scores' device: each anchor's label, then its k = min(top_k, C) best classes under
    `scores` [B, C] (ranked in fp32). One tensor, so the host reads the step's ranking in one copy."""
    ranked = scores.detach().float().topk(min(top_k, scores.shape[1]), dim=1).indices
    return torch.cat([labels.to(ranked.device, ranked.dtype)[:, None], ranked], dim=1)


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
    # The step's only device-to-host copy: the negatives' pictures are chosen and read on the host.
    rows = rank_candidates(scores, labels, top_k).to("cpu", copy=True).tolist()
    return negatives_from_ranking(rows, top_k, min_negatives, allowed, generator)


def negatives_from_ranking(
    rows: Sequence[Sequence[int]],
    top_k: int,
    min_negatives: int,
    allowed: Sequence[bool],
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Steps 2-4 on the host, from `rank_candidates` rows (label, then the ranked classes)."""
    in_batch = {row[0] for row in rows}
    negatives: list[list[int]] = []
    for label, *ranked in rows:
        candidates = [c for c in ranked if c != label][: top_k - 1]
        chosen = []
        for c in candidates:
            if allowed[c] and c not in in_batch:
                chosen.append(c)
                in_batch.add(c)
        missing = min_negatives - len(chosen)
        if missing > 0:
            unused = [c for c in range(len(allowed)) if allowed[c] and c not in in_batch]
            order = torch.randperm(len(unused), generator=generator).tolist()
            for position in order[:missing]:
                chosen.append(unused[position])
                in_batch.add(unused[position])
        negatives.append(chosen)
    return negatives


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


def contrastive_logits(
    image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Z = s * I T^T over N image-class pairs [N, N], in fp32 even under autocast (as every learner's logits:
    near s = 100, bf16 would round them in steps of 0.5), with the off-diagonal pairs of one class at -inf."""
    if image_features.shape[0] != class_features.shape[0] or image_features.shape[0] != labels.shape[0]:
        raise ValueError("the image features, class features and labels must describe the same pairs")
    logits = scaled_cosine_logits(logit_scale, image_features, class_features)
    same_class = labels[:, None] == labels[None, :]
    same_class.fill_diagonal_(False)
    return logits.masked_fill(same_class, float("-inf"))


def symmetric_contrastive_loss(
    image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """1/2 [CE(Z, diag) + CE(Z^T, diag)] with Z = `contrastive_logits` (row i: image i, class labels[i]).
    Off-diagonal pairs of the same class are masked: a repeated class is not a negative."""
    logits = contrastive_logits(image_features, class_features, labels, logit_scale)
    targets = torch.arange(labels.shape[0], device=logits.device)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


# ---------------------------------------------------------------------------------------------------------
# The picture library
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PictureRequest:
    """One negative's picture: a random picture of `label`, randomly augmented, all from `seed`."""

    label: int
    seed: int


@dataclass
class LibraryDraw:
    images: torch.Tensor  # [N, 3, S, S], CLIP-normalised float32
    labels: torch.Tensor  # [N]
    paths: list[str]


@dataclass
class RenderedPictures:
    """Rendered negatives before normalisation: 8-bit pixels, cheap to send to the model's device."""

    pixels: torch.Tensor  # [N, S, S, 3] uint8
    labels: torch.Tensor  # [N]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def images(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[N, 3, S, S] CLIP-normalised float32 on `device`: the same arithmetic as `TrainTransform`'s
        tensor step (x / 255, then mean and std), done on the batch where the model runs."""
        return normalize_uint8(self.pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)).contiguous()


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
        augmentation: Augmentation = FIELD_AUGMENTATION,
    ) -> None:
        self.splits = splits
        self.num_classes = num_classes
        self.source = source
        self.transform = augmentation.transform(image_size)  # the run's, as its anchors are augmented
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
        cls,
        splits: DatasetSplits,
        image_size: int,
        preload: bool | None = None,
        source: str = "few-shot train",
        augmentation: Augmentation = FIELD_AUGMENTATION,
    ) -> PictureLibrary:
        return cls(splits, splits.train, splits.num_classes, image_size, preload, source, augmentation)

    def __len__(self) -> int:
        return sum(len(items) for items in self.by_class)

    def has_pictures(self) -> list[bool]:
        """Per class: whether the library can give a picture of it."""
        return [bool(items) for items in self.by_class]

    def _image(self, datum: Datum) -> Image.Image:
        cached = self._decoded.get(datum.path)
        return cached if cached is not None else self.splits.load_image(datum)

    def requests(self, classes: Sequence[int], generator: torch.Generator | None = None) -> list[PictureRequest]:
        """One request per entry of `classes`, each with its own seed drawn from `generator`."""
        for label in classes:
            if not self.by_class[label]:
                raise DatasetError(f"picture library of {self.splits.name!r} has no picture of class {label}")
        seeds = torch.randint(_SEED_BOUND, (len(classes),), generator=generator).tolist()
        return [PictureRequest(int(label), seed) for label, seed in zip(classes, seeds, strict=True)]

    def render(self, request: PictureRequest) -> tuple[np.ndarray, str]:
        """The picture of `request`, chosen and augmented as the run's training images are (cropped, resized
        and flipped, or the evaluation crop without augmentation): [S, S, 3] uint8, and its path."""
        generator = torch.Generator().manual_seed(request.seed)
        items = self.by_class[request.label]
        datum = items[int(torch.randint(len(items), (1,), generator=generator))]
        picture = augmented_picture(self.transform, self._image(datum), generator)
        return np.array(picture, dtype=np.uint8), datum.path

    def render_all(self, requests: Sequence[PictureRequest], workers: PictureWorkers | None = None) -> RenderedPictures:
        """Every request rendered, in the worker processes when given, else here."""
        size = self.transform.image_size
        if not requests:
            empty = torch.empty(0, size, size, 3, dtype=torch.uint8)
            return RenderedPictures(empty, torch.empty(0, dtype=torch.long), [])
        labels = torch.tensor([r.label for r in requests], dtype=torch.long)
        if workers is not None:
            pixels, paths = workers.render(requests)
            return RenderedPictures(pixels, labels, paths)
        rendered = [self.render(r) for r in requests]
        pixels = torch.from_numpy(np.stack([array for array, _ in rendered]))
        return RenderedPictures(pixels, labels, [path for _, path in rendered])

    def draw(self, classes: Sequence[int], generator: torch.Generator | None = None) -> LibraryDraw:
        """One randomly chosen, randomly augmented picture per entry of `classes`, normalised, on the CPU."""
        rendered = self.render_all(self.requests(classes, generator))
        return LibraryDraw(rendered.images(), rendered.labels, rendered.paths)


# ---------------------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------------------

_WORKER_LIBRARY: PictureLibrary | None = None
_WORKER_PIXELS: np.ndarray | None = None


def _adopt_library(library: PictureLibrary, pixels: torch.Tensor) -> None:
    global _WORKER_LIBRARY, _WORKER_PIXELS
    torch.set_num_threads(1)  # as a data loader's workers: one picture per process at a time
    _WORKER_LIBRARY, _WORKER_PIXELS = library, pixels.numpy()


def _render_in_worker(task: tuple[int, PictureRequest]) -> str:
    """Render a picture into its slot of the shared pixel buffer; only its path travels back."""
    if _WORKER_LIBRARY is None or _WORKER_PIXELS is None:
        raise RuntimeError("a picture worker was started without its library")
    slot, request = task
    _WORKER_PIXELS[slot], path = _WORKER_LIBRARY.render(request)
    return path


class PictureWorkers:
    """Processes that render the negatives' pictures (decode when not preloaded, crop, resize, flip), as a
    data loader's workers render its batches: the main process sends (class, seed) requests and reads 8-bit
    pixels from a buffer shared with the workers (room for `capacity` pictures), identical to rendering them
    itself. Each worker holds a copy of the library taken when started."""

    def __init__(self, library: PictureLibrary, workers: int, capacity: int) -> None:
        if workers < 1 or capacity < 1:
            raise ValueError(f"picture workers: need at least 1 process and 1 picture, got {workers}, {capacity}")
        self.workers, self.capacity = workers, capacity
        size = library.transform.image_size
        # Shared memory: a step's pixels (tens of MB at batch 32) need not be pickled through pipes.
        self._pixels = torch.empty(capacity, size, size, 3, dtype=torch.uint8).share_memory_()
        context = multiprocessing.get_context()
        self._pool = context.Pool(workers, initializer=_adopt_library, initargs=(library, self._pixels))
        self._finalizer = weakref.finalize(self, self._pool.terminate)

    def render(self, requests: Sequence[PictureRequest]) -> tuple[torch.Tensor, list[str]]:
        """[N, S, S, 3] uint8 pixels (a copy, the buffer is reused) and the paths of the pictures."""
        if len(requests) > self.capacity:
            raise ValueError(f"picture workers: {len(requests)} pictures for room for {self.capacity}")
        chunk = max(1, math.ceil(len(requests) / self.workers))
        pending = self._pool.map_async(_render_in_worker, list(enumerate(requests)), chunksize=chunk)
        try:
            paths = pending.get(timeout=RENDER_TIMEOUT_S)
        except multiprocessing.TimeoutError:
            # A worker that died (killed for memory, say) loses its pictures: stop instead of waiting forever.
            raise RuntimeError(
                f"dpc: the picture workers rendered no pictures in {RENDER_TIMEOUT_S} s (did a worker process "
                "die?); set data.num_workers 0 to render them in the main process"
            ) from None
        return self._pixels[: len(requests)].clone(), paths

    def close(self) -> None:
        self._finalizer()
