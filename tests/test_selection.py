"""Data-efficient selectors: per-class budgets, determinism, and what each method is meant to pick."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

from promptclip.data.selection import SelectionInput, class_budget, grand_scores, select
from promptclip.registry import SELECTORS

ALL_SELECTORS = ("uniform", "herding", "kcenter", "least_confidence", "margin", "entropy", "grand")


def _random_input(class_sizes: tuple[int, ...] = (10, 7, 3, 1, 25), dim: int = 6, seed: int = 0) -> SelectionInput:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(class_sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=generator)]
    features = torch.randn(labels.numel(), dim, generator=generator)
    logits = torch.randn(labels.numel(), len(class_sizes), generator=generator) * 3
    return SelectionInput(labels=labels, features=features, logits=logits)


def test_every_selector_is_registered() -> None:
    assert set(ALL_SELECTORS) <= set(SELECTORS)


@pytest.mark.parametrize("name", ALL_SELECTORS)
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_per_class_counts(name: str, ratio: float) -> None:
    data = _random_input()
    result = select(name, data, ratio, seed=0)
    sizes = Counter(data.labels.tolist())
    expected = {c: max(1, int(ratio * n + 0.5 + 1e-9)) for c, n in sizes.items()}
    assert result.per_class == expected
    kept = Counter(data.labels[result.indices].tolist())
    assert dict(kept) == expected
    assert result.indices == sorted(set(result.indices))
    if ratio == 1.0:
        assert result.indices == list(range(data.labels.numel()))


def test_budget_rounds_half_up_and_keeps_one() -> None:
    assert class_budget(0.5, 1) == (1, False)  # Python's round(0.5) would give 0
    assert class_budget(0.5, 5) == (3, False)  # 2.5 -> 3
    assert class_budget(0.3, 5) == (2, False)  # 1.4999999999999998 in floating point, meant 1.5
    assert class_budget(0.1, 4) == (1, True)
    assert class_budget(0.25, 10) == (3, False)
    assert class_budget(1.0, 7) == (7, False)


@pytest.mark.parametrize("name", ALL_SELECTORS)
def test_same_seed_same_selection(name: str) -> None:
    data = _random_input()
    assert select(name, data, 0.4, seed=3) == select(name, data, 0.4, seed=3)


def test_uniform_differs_across_seeds() -> None:
    data = _random_input(class_sizes=(40, 40))
    picks = {tuple(select("uniform", data, 0.25, seed=seed).indices) for seed in range(5)}
    assert len(picks) == 5


def test_herding_picks_the_image_closest_to_the_class_mean_first() -> None:
    features = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [0.0, -4.0], [0.3, 0.2], [9.0, 9.0]])
    labels = torch.zeros(6, dtype=torch.long)
    # The mean is (1.55, 1.7); [0.3, 0.2] is nearest to it.
    first = select("herding", SelectionInput(labels, features=features), 1 / 6, seed=0)
    assert first.indices == [4]
    # The second image is the one nearest 2 * mean - [0.3, 0.2] = (2.8, 2.87): [0, 4] rather than the
    # first image's runner-up [4, 0] (nearer the mean alone, but farther from that target).
    second = select("herding", SelectionInput(labels, features=features), 2 / 6, seed=0)
    assert second.indices == [1, 4]


def test_herding_is_per_class() -> None:
    features = torch.tensor([[0.0], [1.0], [2.0], [100.0], [101.0], [110.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    result = select("herding", SelectionInput(labels, features=features), 1 / 3, seed=0)
    assert result.indices == [1, 4]  # class means 1 and 103.67


def test_kcenter_picks_a_far_outlier_early() -> None:
    generator = torch.Generator().manual_seed(1)
    cluster = torch.randn(30, 4, generator=generator) * 0.1
    outlier = torch.full((1, 4), 50.0)
    features = torch.cat([cluster[:17], outlier, cluster[17:]])
    labels = torch.zeros(31, dtype=torch.long)
    for seed in range(4):
        result = select("kcenter", SelectionInput(labels, features=features), 2 / 31, seed=seed)
        assert 17 in result.indices
    # Herding on the same data keeps the cluster instead.
    assert 17 not in select("herding", SelectionInput(labels, features=features), 2 / 31, seed=0).indices


def test_kcenter_covers_separated_clusters() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    generator = torch.Generator().manual_seed(2)
    features = centres.repeat_interleave(10, dim=0) + 0.05 * torch.randn(40, 2, generator=generator)
    labels = torch.zeros(40, dtype=torch.long)
    result = select("kcenter", SelectionInput(labels, features=features), 4 / 40, seed=7)
    assert sorted(i // 10 for i in result.indices) == [0, 1, 2, 3]


def _known_uncertainty_logits() -> tuple[torch.Tensor, torch.Tensor]:
    # Row i is ever more uncertain with i in all three senses: the top probability falls, the top-2 gap
    # closes and the entropy rises. The rows are shuffled so the answer is not just "the first k".
    sharpness = torch.linspace(6.0, 0.0, 8)
    base = torch.tensor([1.0, 0.2, 0.0])
    logits = sharpness[:, None] * base[None, :]
    order = torch.tensor([5, 0, 7, 2, 4, 1, 6, 3])
    return logits[order], order


@pytest.mark.parametrize("name", ["least_confidence", "margin", "entropy"])
def test_uncertainty_selectors_keep_the_most_uncertain(name: str) -> None:
    logits, order = _known_uncertainty_logits()
    labels = torch.zeros(8, dtype=torch.long)
    result = select(name, SelectionInput(labels, logits=logits), 3 / 8, seed=0)
    kept_rows = sorted(order[result.indices].tolist())
    assert kept_rows == [5, 6, 7]


def test_margin_and_entropy_can_disagree() -> None:
    # Row 0: top probability 0.5 with a clear runner-up gap; row 1: two-way tie at 0.45 each.
    probabilities = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.45, 0.45, 0.1, 0.0, 0.0, 0.0]])
    logits = torch.log(probabilities.clamp_min(1e-6))
    labels = torch.zeros(2, dtype=torch.long)
    data = SelectionInput(labels, logits=logits)
    assert select("margin", data, 0.5, seed=0).indices == [1]
    assert select("entropy", data, 0.5, seed=0).indices == [0]


def test_grand_matches_autograd_on_a_random_linear_head() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 4)
    features = torch.randn(9, 5, dtype=torch.float64)
    labels = torch.randint(0, 4, (9,))
    head = head.double()
    expected = []
    for i in range(9):
        head.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features[i : i + 1]), labels[i : i + 1])
        loss.backward()
        grads = torch.cat([head.weight.grad.flatten(), head.bias.grad])
        expected.append(grads.norm())
    with torch.no_grad():
        logits = head(features)
    scores = grand_scores(features, logits, labels)
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-10, atol=1e-12)


def test_grand_keeps_the_largest_gradient_norms() -> None:
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    # Row 0 is confidently right (tiny gradient), rows 1-2 confidently wrong, row 3 uncertain.
    logits = torch.tensor([[8.0, 0.0], [0.0, 8.0], [0.0, 8.0], [0.0, 0.0]])
    labels = torch.zeros(4, dtype=torch.long)
    result = select("grand", SelectionInput(labels, features=features, logits=logits), 0.5, seed=0)
    assert result.indices == [1, 2]  # wrong and confident beats uncertain; feature norm scales it


def test_empty_class_protection_warns(caplog: pytest.LogCaptureFixture) -> None:
    labels = torch.tensor([0] * 20 + [1] * 2 + [2])
    data = SelectionInput(labels, features=torch.randn(23, 3))
    with caplog.at_level(logging.WARNING, logger="promptclip.data.selection"):
        result = select("herding", data, 0.1, seed=0)
    assert result.per_class == {0: 2, 1: 1, 2: 1}
    assert len(result.warnings) == 2
    assert "class 1 has 2 images" in result.warnings[0] and "keeping 1" in result.warnings[0]
    assert "class 2 has 1 image " in result.warnings[1]
    assert sum("keeping 1" in record.message for record in caplog.records) == 2
    assert select("herding", data, 0.5, seed=0).warnings == []


def test_errors_name_the_problem() -> None:
    data = _random_input()
    for ratio in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            select("uniform", data, ratio, seed=0)
    labels_only = SelectionInput(labels=data.labels)
    with pytest.raises(ValueError, match=r"'herding' needs SelectionInput.features"):
        select("herding", labels_only, 0.5, seed=0)
    with pytest.raises(ValueError, match=r"'margin' needs SelectionInput.logits"):
        select("margin", labels_only, 0.5, seed=0)
    with pytest.raises(ValueError, match=r"'grand' needs SelectionInput.logits"):
        select("grand", SelectionInput(labels=data.labels, features=data.features), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"features has 4 rows but labels has 46"):
        SelectionInput(labels=data.labels, features=torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"logits must be a 2-D tensor"):
        SelectionInput(labels=data.labels, logits=torch.randn(46))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor"):
        SelectionInput(labels=data.labels.float())
    with pytest.raises(ValueError, match=r"NaN"):
        SelectionInput(labels=torch.tensor([0, 1]), features=torch.tensor([[0.0], [float("nan")]]))
    with pytest.raises(ValueError, match=r"labels reach class 4 but logits has only 3 columns"):
        select("grand", SelectionInput(data.labels, data.features, data.logits[:, :3]), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer"):
        select("uniform", data, 0.5, seed=-1)
    with pytest.raises(KeyError, match=r"unknown selector 'craig'"):
        select("craig", data, 0.5, seed=0)
