"""Evaluation as integer per-class counts; every accuracy is computed from the counts.

The learner is put in eval mode and run under `torch.no_grad`, so `text_features()` encodes the class set
once and reuses it for every batch (the learner's eval cache). Only the image side runs per batch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from promptclip.methods.base import PromptModel


@dataclass
class EvalCounts:
    """Per-class correct and total counts over one evaluation set (`classnames[i]` is label i)."""

    classnames: list[str]
    correct: list[int]
    total: list[int]

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
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalCounts:
        return cls(list(data["classnames"]), [int(v) for v in data["correct"]], [int(v) for v in data["total"]])


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the frozen towers on CUDA only (bf16 or fp16); CPU always runs in fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type="cuda", dtype=dtype)


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch on `device`; other entries (paths) unchanged."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def progress_enabled(requested: bool | None) -> bool:
    """Progress bars when asked for, or by default when stderr is a terminal."""
    return sys.stderr.isatty() if requested is None else requested


def evaluate(
    learner: PromptModel,
    loader: Iterable[Mapping[str, Any]],
    classnames: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    progress: bool | None = False,
    desc: str = "eval",
) -> EvalCounts:
    """Per-class counts of `learner` on `loader` (batches with `image` and `label`).

    With `classnames`, the learner is switched to those classes first (`set_classnames`), so the class set
    being evaluated is always explicit; labels index into it.
    """
    if classnames is not None and list(classnames) != list(learner.classnames):
        learner.set_classnames(classnames)
    device = torch.device(device) if device is not None else next(learner.parameters()).device
    names = list(learner.classnames)
    num_classes = len(names)
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    was_training = learner.training
    learner.eval()
    try:
        with torch.no_grad():
            for batch in _iterate(loader, progress, desc):
                batch = move_batch(batch, device)
                with autocast_context(device, precision):
                    logits = learner(batch).logits
                labels = batch["label"].to(torch.long)
                _check_labels(labels, num_classes)
                hits = (logits.float().argmax(dim=-1) == labels).cpu()
                labels = labels.cpu()
                total += torch.bincount(labels, minlength=num_classes)
                correct += torch.bincount(labels[hits], minlength=num_classes)
    finally:
        learner.train(was_training)
    return EvalCounts(names, correct.tolist(), total.tolist())


def _iterate(loader: Iterable[Mapping[str, Any]], progress: bool | None, desc: str) -> Iterator[Mapping[str, Any]]:
    if not progress_enabled(progress):
        yield from loader
        return
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    with tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True) as bar:
        yield from bar


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"label {int(labels.max())} is outside the {num_classes} classes being evaluated; the loader and "
            "the class names must come from the same (sub)set of classes"
        )


@torch.no_grad()
def predict_probabilities(
    learner: PromptModel, images: torch.Tensor, device: str | torch.device | None = None, precision: str = "fp32"
) -> torch.Tensor:
    """Softmax over the learner's classes for a batch of preprocessed images [B, 3, H, W] -> [B, C]."""
    device = torch.device(device) if device is not None else next(learner.parameters()).device
    was_training = learner.training
    learner.eval()
    try:
        with autocast_context(device, precision):
            logits = learner({"image": images.to(device)}).logits
        return logits.float().softmax(dim=-1).cpu()
    finally:
        learner.train(was_training)
