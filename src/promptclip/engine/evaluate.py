"""Evaluation as integer per-class counts; every accuracy is computed from the counts.

The learner is put in eval mode and run under `torch.no_grad`, so `text_features()` encodes the class set
once and reuses it for every batch (the learner's eval cache). Only the image side runs per batch.

Learners whose image side is the frozen CLIP (`PromptModel.cacheable_image_features`: zero-shot, CoOp, KgCoOp,
deep language prompting) can also reuse image features: with an `ImageFeatureStore`, each image is encoded
once per backbone, then every later evaluation of it (the other runs of a sweep: seeds, shot counts, methods)
reads its features instead of decoding and encoding it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from promptclip.engine import stop
from promptclip.engine.learner import Learner

if TYPE_CHECKING:
    from torch import nn

    from promptclip.clip.model import CLIP
    from promptclip.engine.distributed import DataParallel


@dataclass
class EvalCounts:
    """Per-class correct and total counts over one evaluation set (`classnames[i]` is label i)."""

    classnames: list[str]
    correct: list[int]
    total: list[int]
    errors: list[tuple[int, int, int]] | None = None
    """(true, predicted, count) of each non-zero off-diagonal cell of the confusion matrix, when known."""

    @classmethod
    def from_confusion(cls, classnames: Sequence[str], confusion: torch.Tensor) -> EvalCounts:
        """Counts of a [C, C] confusion matrix (rows: true class, columns: predicted class)."""
        off_diagonal = confusion.clone()
        off_diagonal.fill_diagonal_(0)
        cells = off_diagonal.nonzero().tolist()
        errors = [(true, predicted, int(off_diagonal[true, predicted])) for true, predicted in cells]
        return cls(list(classnames), confusion.diagonal().tolist(), confusion.sum(dim=1).tolist(), errors)

    @property
    def num_samples(self) -> int:
        return sum(self.total)

    @property
    def num_correct(self) -> int:
        return sum(self.correct)

    @property
    def accuracy(self) -> float:
        """Micro accuracy in percent: all correct over all samples (the field's reported metric)."""
        return 100.0 * self.num_correct / self.num_samples if self.num_samples else 0.0

    @property
    def macro_accuracy(self) -> float:
        """Mean of per-class accuracies in percent, over classes that have test samples."""
        rates = [c / t for c, t in zip(self.correct, self.total, strict=True) if t > 0]
        return 100.0 * sum(rates) / len(rates) if rates else 0.0

    def per_class_accuracy(self) -> list[float | None]:
        return [100.0 * c / t if t else None for c, t in zip(self.correct, self.total, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "classnames": list(self.classnames),
            "correct": list(self.correct),
            "total": list(self.total),
            "accuracy": round(self.accuracy, 4),
            "macro_accuracy": round(self.macro_accuracy, 4),
            **({"errors": [list(cell) for cell in self.errors]} if self.errors is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalCounts:
        errors = data.get("errors")
        cells = [(int(t), int(p), int(n)) for t, p, n in errors] if errors is not None else None
        return cls(list(data["classnames"]), [int(v) for v in data["correct"]], [int(v) for v in data["total"]], cells)


def compute_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype autocast computes in: bf16 or fp16 on CUDA; None (fp32, no autocast) otherwise, and always on
    CPU."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the frozen towers on CUDA only (bf16 or fp16); CPU always runs in fp32."""
    dtype = compute_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def store_frozen_towers(learner: Learner, device: torch.device, precision: str) -> int:
    """Store the matmul weights of every frozen CLIP of `learner` (its backbone, a teacher) in the compute
    dtype when the run autocasts (CUDA, bf16 or fp16), so that autocast does not cast each of them again at
    every call; the features are the same, since autocast rounds them to that dtype anyway
    (`CLIP.store_matmul_weights`). A CLIP with trained matmul weights is left as it is. Returns how many
    tensors changed."""
    dtype = compute_dtype(device, precision)
    if dtype is None:
        return 0
    return sum(
        clip.store_matmul_weights(dtype)
        for clip in clips_in(learner)
        if not any(p.requires_grad for p in clip.matmul_weights())
    )


def clips_in(learner: Learner | nn.Module) -> list[CLIP]:
    """Every distinct CLIP inside `learner` (its backbone, a teacher), or `learner` itself when it is one."""
    from promptclip.clip.model import CLIP

    return list({id(module): module for module in learner.modules() if isinstance(module, CLIP)}.values())


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch on `device`; other entries (paths) unchanged."""
    return {
        key: value.to(device, non_blocking=copies_without_waiting(value, device))
        if isinstance(value, torch.Tensor)
        else value
        for key, value in batch.items()
    }


def copies_without_waiting(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether moving `tensor` to `device` may return before the copy is done (`non_blocking`): from the host
    to a GPU. The copy is queued on the GPU's stream ahead of the kernels that read it; from pinned memory (the
    loaders pin their batches when the run is on a GPU) it overlaps with the host's work, and from pageable
    memory CUDA stages the data before returning, so the host never waits for the GPU either way. A copy to
    the host waits: its values are read as soon as it returns."""
    return tensor.device.type == "cpu" and device.type == "cuda"


def progress_enabled(requested: bool | None) -> bool:
    """Progress bars when asked for, or by default when stderr is a terminal."""
    return sys.stderr.isatty() if requested is None else requested


def evaluate(
    learner: Learner,
    loader: Iterable[Mapping[str, Any]],
    classnames: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    progress: bool | None = False,
    desc: str = "eval",
    image_features: ImageFeatureStore | None = None,
    data_parallel: DataParallel | None = None,
) -> EvalCounts:
    """Per-class counts of `learner` on `loader` (batches with `image` and `label`).

    With `classnames`, the learner is switched to those classes first (`set_classnames`), so the class set
    being evaluated is always explicit; labels index into it. `image_features` (a store of one backbone and
    dataset, see `ImageFeatureCache`) serves and keeps the image features of learners whose image side is
    frozen; it is ignored for the others. With `data_parallel`, this rank classifies its own whole batches and
    the counts are summed over ranks (the same counts as one process).
    """
    if classnames is not None and list(classnames) != list(learner.classnames):
        learner.set_classnames(classnames)
    device = torch.device(device) if device is not None else next(learner.parameters()).device
    store_frozen_towers(learner, device, precision)
    names = list(learner.classnames)
    num_classes = len(names)
    # Rows: true class, columns: predicted class; correct and total are its diagonal and row sums. It stays on
    # the device until the end, so no batch waits for the one before it.
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    store = image_features if image_features is not None and learner.cacheable_image_features else None
    batches: Iterable[Mapping[str, Any]] = loader
    if store is not None:
        batches = _batches_with_stored_features(loader, store, data_parallel)
    elif data_parallel is not None:
        batches = data_parallel.shard_eval_loader(loader)
    was_training = learner.training
    learner.eval()
    try:
        with torch.no_grad(), stop.safe_points():
            for batch in _iterate(batches, progress, desc):
                stop.check()
                _check_labels(batch["label"], num_classes)  # on the host, as the loader gave them
                batch = move_batch(batch, device)
                with autocast_context(device, precision):
                    logits = _logits(learner, batch, store)
                labels = batch["label"].to(torch.long)
                predicted = logits.float().argmax(dim=-1)
                cells = labels * num_classes + predicted
                confusion += torch.bincount(cells, minlength=num_classes * num_classes)
    finally:
        learner.train(was_training)
    if data_parallel is not None:
        (confusion,) = data_parallel.sum_counts(confusion)
    return EvalCounts.from_confusion(names, confusion.cpu().view(num_classes, num_classes))


def _logits(learner: Learner, batch: Mapping[str, Any], store: ImageFeatureStore | None) -> torch.Tensor:
    if store is None:
        return learner(batch).logits
    features = batch.get(STORED_FEATURES)
    if features is None:
        features = learner.image_features(batch["image"])
        store.put(batch["path"], features)
    return learner.classify_image_features(features)


def _iterate(loader: Iterable[Mapping[str, Any]], progress: bool | None, desc: str) -> Iterator[Mapping[str, Any]]:
    if not progress_enabled(progress):
        yield from loader
        return
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    with tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True) as bar:
        yield from bar


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    labels = torch.as_tensor(labels)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"label {int(labels.max())} is outside the {num_classes} classes being evaluated; the loader and "
            "the class names must come from the same (sub)set of classes"
        )


@torch.no_grad()
def predict_probabilities(
    learner: Learner, images: torch.Tensor, device: str | torch.device | None = None, precision: str = "fp32"
) -> torch.Tensor:
    """Softmax over the learner's classes for a batch of preprocessed images [B, 3, H, W] -> [B, C]."""
    device = torch.device(device) if device is not None else next(learner.parameters()).device
    store_frozen_towers(learner, device, precision)
    was_training = learner.training
    learner.eval()
    try:
        with autocast_context(device, precision):
            logits = learner({"image": images.to(device)}).logits
        return logits.float().softmax(dim=-1).cpu()
    finally:
        learner.train(was_training)


# ---------------------------------------------------------------------------------------------------------
# Image features kept across evaluations
# ---------------------------------------------------------------------------------------------------------

STORED_FEATURES = "stored_image_features"
"""Batch key of image features served from an `ImageFeatureStore` (the batch then has no `image`)."""


class ImageFeatureStore:
    """Normalised image features [D] by image path, for one backbone, dataset, precision and device kind."""

    def __init__(self, cache: ImageFeatureCache, key: Hashable) -> None:
        self._cache = cache
        self.key = key
        self.features: dict[str, torch.Tensor] = {}

    def __contains__(self, path: object) -> bool:
        return path in self.features

    def __len__(self) -> int:
        return len(self.features)

    def get(self, paths: Sequence[str]) -> torch.Tensor | None:
        """Features [B, D] of `paths`, or None unless every one of them is stored."""
        if not paths or any(path not in self.features for path in paths):
            return None
        self._cache.hits += len(paths)
        return torch.stack([self.features[path] for path in paths])

    def put(self, paths: Sequence[str], features: torch.Tensor) -> None:
        self._cache.misses += len(paths)
        for path, row in zip(paths, features.detach(), strict=True):
            self.features[path] = row
        self._cache.trim()


class ImageFeatureCache:
    """Image features of evaluation images, kept across the evaluations of a process (the runs of a sweep).

    One store per (backbone weights, dataset, precision, device kind); the dataset part is whatever the
    caller names the images by (the runner: dataset name, root and options), since the image paths are only
    unique within it. At most `max_images` features are kept (about 2 KB each for ViT-B/16); the store used
    longest ago is dropped first.
    """

    def __init__(self, max_images: int = 500_000) -> None:
        self.max_images = max_images
        self.hits = 0
        self.misses = 0
        self._stores: OrderedDict[Hashable, ImageFeatureStore] = OrderedDict()
        self._fingerprints: weakref.WeakKeyDictionary[CLIP, str] = weakref.WeakKeyDictionary()

    def store(self, clip: CLIP, data: Hashable, precision: str, device: torch.device | str) -> ImageFeatureStore:
        key = (self.backbone_fingerprint(clip), clip.image_size, data, precision, torch.device(device).type)
        if key not in self._stores:
            self._stores[key] = ImageFeatureStore(self, key)
        self._stores.move_to_end(key)
        return self._stores[key]

    def backbone_fingerprint(self, clip: CLIP) -> str:
        """The sha256 of the weights file, or (random or in-memory weights) of the image tower's tensors."""
        if clip.weights_sha256:
            return clip.weights_sha256
        if clip not in self._fingerprints:
            digest = hashlib.sha256()
            for name, tensor in clip.visual.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprints[clip] = digest.hexdigest()
        return self._fingerprints[clip]

    @property
    def num_images(self) -> int:
        return sum(len(store) for store in self._stores.values())

    def trim(self) -> None:
        while len(self._stores) > 1 and self.num_images > self.max_images:
            self._stores.popitem(last=False)

    def clear(self) -> None:
        self._stores.clear()


def _listed_batches(loader: Iterable[Mapping[str, Any]]) -> list[list[tuple[str, int]]] | None:
    """The (path, label) of each batch a promptclip evaluation loader gives, without reading an image; None for
    other loaders."""
    from promptclip.engine.distributed import global_batches

    dataset = getattr(loader, "dataset", None)
    data = getattr(dataset, "data", None)
    if data is None or getattr(loader, "shuffle", True) or not hasattr(loader, "epoch"):
        return None
    return [[(data[i].path, data[i].label) for i in batch] for batch in global_batches(loader, loader.epoch)]


def _batches_with_stored_features(
    loader: Iterable[Mapping[str, Any]], store: ImageFeatureStore, data_parallel: DataParallel | None
) -> Iterator[Mapping[str, Any]]:
    """The loader's batches, served from `store` without reading images when every image of the evaluation is
    stored; else the loader's own batches (their features are stored as they are computed)."""
    listed = _listed_batches(loader)
    if listed is not None and data_parallel is not None:
        listed = data_parallel.rank_batches(listed)
    if listed is None or any(path not in store for batch in listed for path, _ in batch):
        yield from (data_parallel.shard_eval_loader(loader) if data_parallel is not None else loader)
        return
    for batch in listed:
        paths = [path for path, _ in batch]
        features = store.get(paths)
        assert features is not None
        yield {"label": torch.tensor([label for _, label in batch]), "path": paths, STORED_FEATURES: features}
