"""Data-efficient selection: keep a ratio of every class's training images, chosen from a model's outputs.

Each selector is registered in :data:`promptclip.registry.SELECTORS` and works class by class (DeepCore's
"balanced" mode, which is how DAPT calls it): it keeps ``max(1, round_half_up(ratio * n_c))`` of the
``n_c`` images of class ``c``. The selectors follow the definitions of DeepCore (Guo et al., 2022):

- ``uniform``: class-balanced random sampling without replacement.
- ``herding``: greedy mean matching on features; each step adds the image that brings the mean of the
  kept set closest to the class mean, so the first pick is the image nearest to the class mean.
- ``kcenter``: k-center greedy on features (Euclidean); a seeded random first centre, then repeatedly the
  image farthest from every centre kept so far.
- ``least_confidence``, ``margin``, ``entropy``: uncertainty of the softmax of the logits; each keeps the
  most uncertain images (lowest top probability, smallest top-1 minus top-2 gap, highest entropy).
- ``grand``: GraNd, the norm of the cross-entropy gradient with respect to a linear head's weight and bias,
  computed in closed form from features and logits; keeps the largest norms.

Differences from DeepCore's released code, on purpose: budgets round half up instead of Python's
half-to-even ``round`` (which gives 0 images for ``0.5 * 1``) and never drop below one image; least
confidence uses the top softmax probability rather than the raw top logit; GraNd scores the given model
once instead of averaging over freshly trained networks.

Features and logits are whatever the caller's model produces (for CLIP, usually L2-normalised image
features and scaled cosine logits); the selectors compute in float64 on the CPU for reproducibility.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from promptclip.registry import SELECTORS

__all__ = ["ClassPool", "SelectionInput", "SelectionResult", "Selector", "class_budget", "grand_scores", "select"]

logger = logging.getLogger(__name__)

# A ratio * n_c a hair below .5 because of binary floating point (0.3 * 5 = 1.4999999999999998) still
# rounds up.
_ROUNDING_SLACK = 1e-9


@dataclass
class SelectionInput:
    """What a selector sees of the training set: labels and, as a selector needs them, features/logits.

    ``labels`` is a 1-D integer tensor [N]; ``features`` [N, D] and ``logits`` [N, C] come from the
    same N images in the same order.
    """

    labels: torch.Tensor
    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        labels = self.labels
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError("SelectionInput.labels must be a 1-D tensor [N] of class indices")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"SelectionInput.labels must be an integer tensor (long), got {labels.dtype}")
        if labels.numel() == 0:
            raise ValueError("SelectionInput.labels is empty: there is nothing to select from")
        if int(labels.min()) < 0:
            raise ValueError("SelectionInput.labels must be non-negative class indices")
        for name in ("features", "logits"):
            _check_matrix(name, getattr(self, name), labels.shape[0])


def _check_matrix(name: str, value: torch.Tensor | None, rows: int) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"SelectionInput.{name} must be a 2-D tensor [N, *], got {shape}")
    if value.shape[0] != rows:
        raise ValueError(
            f"SelectionInput.{name} has {value.shape[0]} rows but labels has {rows}; "
            "both must describe the same images in the same order"
        )
    if not value.dtype.is_floating_point:
        raise ValueError(f"SelectionInput.{name} must be a floating-point tensor, got {value.dtype}")
    if not torch.isfinite(value).all():
        raise ValueError(f"SelectionInput.{name} contains NaN or infinite values")


@dataclass
class SelectionResult:
    """The kept images: ``indices`` (ascending), how many per class, and any warnings raised."""

    indices: list[int]
    per_class: dict[int, int]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClassPool:
    """The images of one class, as a selector receives them.

    ``features``/``logits`` are float64 CPU rows of this class only (None when not given); ``rng`` is
    seeded from (seed, label), so a class's choice does not depend on the other classes.
    """

    label: int
    size: int
    features: torch.Tensor | None
    logits: torch.Tensor | None
    rng: np.random.Generator


#: A selector's core: returns ``budget`` distinct positions in ``range(pool.size)``, in pick order.
PickFn = Callable[[ClassPool, int], list[int]]


@dataclass(frozen=True)
class Selector:
    """A registered selection method: the inputs it needs and its per-class pick function."""

    name: str
    needs: tuple[str, ...]
    pick: PickFn
    labels_index_logits: bool = False  # reads logits[i, labels[i]], so every label needs a column


def _register(name: str, needs: tuple[str, ...] = (), labels_index_logits: bool = False) -> Callable[[PickFn], PickFn]:
    def add(pick: PickFn) -> PickFn:
        entry = Selector(name=name, needs=needs, pick=pick, labels_index_logits=labels_index_logits)
        SELECTORS.register(name)(entry)
        return pick

    return add


def class_budget(ratio: float, class_size: int) -> tuple[int, bool]:
    """Images kept from a class of ``class_size``: ``max(1, floor(ratio * n + 0.5))`` (round half up).

    Returns ``(budget, raised)`` where ``raised`` says the rounding gave 0 and the floor of one image was
    applied.
    """
    rounded = math.floor(ratio * class_size + 0.5 + _ROUNDING_SLACK)
    rounded = min(rounded, class_size)
    return max(1, rounded), rounded == 0


def _top_scores(scores: torch.Tensor, budget: int) -> list[int]:
    """Positions of the ``budget`` highest scores; ties go to the earlier position."""
    order = np.argsort(-scores.numpy(), kind="stable")
    return order[:budget].tolist()


# -------------------------------------------------------------------------------------------- selectors


@_register("uniform")
def _uniform(pool: ClassPool, budget: int) -> list[int]:
    return pool.rng.choice(pool.size, size=budget, replace=False).tolist()


@_register("herding", needs=("features",))
def _herding(pool: ClassPool, budget: int) -> list[int]:
    features = _required(pool.features)
    mean = features.mean(dim=0)
    squared_norms = (features * features).sum(dim=1)
    kept_sum = torch.zeros_like(mean)
    available = torch.ones(pool.size, dtype=torch.bool)
    picks: list[int] = []
    for step in range(budget):
        # The kept mean after this step equals the class mean when the new image x equals
        # target = (step + 1) * mean - kept_sum; pick the x nearest to it. ||x - t||^2 minus the constant
        # ||t||^2 is ||x||^2 - 2 x.t.
        target = (step + 1) * mean - kept_sum
        distance = squared_norms - 2.0 * (features @ target)
        distance[~available] = math.inf
        pick = int(torch.argmin(distance))
        picks.append(pick)
        available[pick] = False
        kept_sum += features[pick]
    return picks


@_register("kcenter", needs=("features",))
def _kcenter(pool: ClassPool, budget: int) -> list[int]:
    features = _required(pool.features)
    first = int(pool.rng.integers(pool.size))
    picks = [first]
    nearest = torch.cdist(features, features[first : first + 1]).squeeze(1)
    nearest[first] = -1.0
    for _ in range(budget - 1):
        pick = int(torch.argmax(nearest))
        picks.append(pick)
        nearest = torch.minimum(nearest, torch.cdist(features, features[pick : pick + 1]).squeeze(1))
        nearest[picks] = -1.0
    return picks


@_register("least_confidence", needs=("logits",))
def _least_confidence(pool: ClassPool, budget: int) -> list[int]:
    probabilities = torch.softmax(_required(pool.logits), dim=1)
    return _top_scores(1.0 - probabilities.max(dim=1).values, budget)


@_register("margin", needs=("logits",))
def _margin(pool: ClassPool, budget: int) -> list[int]:
    probabilities = torch.softmax(_required(pool.logits), dim=1)
    top_two = probabilities.topk(2, dim=1).values
    return _top_scores(-(top_two[:, 0] - top_two[:, 1]), budget)


@_register("entropy", needs=("logits",))
def _entropy(pool: ClassPool, budget: int) -> list[int]:
    log_probabilities = torch.log_softmax(_required(pool.logits), dim=1)
    entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=1)
    return _top_scores(entropy, budget)


def grand_scores(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GraNd: norm of the cross-entropy gradient w.r.t. a linear head (weight and bias), per image.

    Derivation. For a head z = W f + b (W [C, D], b [C]) and loss L = -log softmax(z)_y, let
    g = dL/dz = softmax(z) - onehot(y). Then dL/db = g and dL/dW = g f^T, whose Frobenius norm is
    ||g|| ||f|| (an outer product). Stacking both,
    ||(dL/dW, dL/db)||^2 = ||g||^2 ||f||^2 + ||g||^2, so the score is ||g|| * sqrt(||f||^2 + 1).
    It needs only the logits (through g) and the features the head reads, never the head itself.
    """
    residual = torch.softmax(logits, dim=1)
    residual[torch.arange(labels.shape[0]), labels] -= 1.0
    return residual.norm(dim=1) * torch.sqrt((features * features).sum(dim=1) + 1.0)


@_register("grand", needs=("features", "logits"), labels_index_logits=True)
def _grand(pool: ClassPool, budget: int) -> list[int]:
    logits = _required(pool.logits)
    labels = torch.full((pool.size,), pool.label, dtype=torch.long)
    return _top_scores(grand_scores(_required(pool.features), logits, labels), budget)


def _required(value: torch.Tensor | None) -> torch.Tensor:
    # select() has already checked the selector's needs; this only narrows the type.
    if value is None:
        raise RuntimeError("selector input missing after validation")
    return value


# ---------------------------------------------------------------------------------------------- driver

_INPUT_HELP = {
    "features": "image features [N, D] from the model being tuned",
    "logits": "class logits [N, C] from the model being tuned",
}


def _check_request(selector: Selector, data: SelectionInput, ratio: float, seed: int) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"selection ratio must be in (0, 1] (the fraction of each class to keep), got {ratio!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"selection seed must be a non-negative integer, got {seed!r}")
    for need in selector.needs:
        if getattr(data, need) is None:
            no_need = [name for name, entry in SELECTORS.items() if need not in entry.needs]
            raise ValueError(
                f"selector {selector.name!r} needs SelectionInput.{need} ({_INPUT_HELP[need]}); pass it, "
                f"or use a selector that does not: {', '.join(no_need)}"
            )
    logits = data.logits
    if logits is not None and "logits" in selector.needs:
        if logits.shape[1] < 2:
            raise ValueError(f"SelectionInput.logits needs at least 2 class columns, got {logits.shape[1]}")
        top_label = int(data.labels.max())
        if selector.labels_index_logits and top_label >= logits.shape[1]:
            raise ValueError(
                f"SelectionInput.labels reach class {top_label} but logits has only {logits.shape[1]} "
                "columns; give one logit column per class"
            )


def _as_float64(value: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if value is None else value.detach()[rows].to(device="cpu", dtype=torch.float64)


def select(name: str, data: SelectionInput, ratio: float, seed: int) -> SelectionResult:
    """Keep ``ratio`` of every class with the selector ``name``; deterministic for a given ``seed``.

    Each class keeps ``max(1, round_half_up(ratio * n_c))`` images; a class whose rounded budget would be
    0 keeps one image and the result carries a warning saying so (also logged).
    """
    selector: Selector = SELECTORS.get(name)
    _check_request(selector, data, ratio, seed)
    labels = data.labels.detach().to("cpu", torch.long)
    kept: list[int] = []
    per_class: dict[int, int] = {}
    messages: list[str] = []
    for label in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == label).squeeze(1)
        budget, raised = class_budget(ratio, rows.numel())
        if raised:
            count = rows.numel()
            message = (
                f"class {label} has {count} image{'' if count == 1 else 's'} and ratio {ratio} rounds to 0 "
                "kept; keeping 1 so the class is not left empty"
            )
            messages.append(message)
            logger.warning(message)
        pool = ClassPool(
            label=label,
            size=rows.numel(),
            features=_as_float64(data.features, rows),
            logits=_as_float64(data.logits, rows),
            rng=np.random.default_rng([int(seed), label]),
        )
        picks = selector.pick(pool, budget)
        if len(set(picks)) != budget:
            raise RuntimeError(f"selector {name!r} returned {len(set(picks))} distinct images, expected {budget}")
        kept.extend(rows[picks].tolist())
        per_class[label] = budget
    return SelectionResult(indices=sorted(kept), per_class=per_class, warnings=messages)
