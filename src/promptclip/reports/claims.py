"""The papers' claims, measured: each claim compares two methods on the same datasets and seeds.

An effect is the difference between two methods' accuracy (or HM), averaged over the datasets of a seed; its
spread is the standard deviation of that per-seed difference, so seed noise shared by both methods (the same
few-shot draw) cancels. A claim is *shown* when the effect has the claimed sign and is at least three times
its seed standard deviation (an "at least as good" claim: when it is not negative), and *not shown*
otherwise; a claim whose methods were not run is left out.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Claim", "ClaimResult", "Scores", "evaluate_claims", "format_claim"]

Metric = Literal["base", "new", "hm", "equal_new"]

#: (method, dataset, seed) -> {"base": accuracy %, "new": accuracy %}
Scores = Mapping[tuple[str, str, int], Mapping[str, float]]

SIGNIFICANCE = 3.0  # an effect counts when it is at least this many seed standard deviations


@dataclass(frozen=True)
class Claim:
    """`better` beats `worse` on `metric` over `datasets` (all datasets both ran when empty)."""

    text: str
    better: str
    worse: str
    metric: Metric
    datasets: tuple[str, ...] = ()
    at_least: bool = False
    """Claims "at least as good": shown when the mean effect is not negative (no significance asked)."""


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    effect: float
    """Mean over seeds of the per-seed difference better - worse (points); for `equal_new`, the largest
    absolute new-class difference of any run."""
    std: float
    seeds: int
    shown: bool


def _hm(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new else 0.0


def _value(scores: Mapping[str, float], metric: Metric) -> float:
    if metric == "hm":
        return _hm(scores["base"], scores["new"])
    return scores["new" if metric == "equal_new" else metric]


def _paired(scores: Scores, claim: Claim) -> dict[int, list[tuple[float, float]]]:
    """Per seed, the (better, worse) values on every dataset where both methods ran with that seed."""
    by_seed: dict[int, list[tuple[float, float]]] = {}
    for (method, dataset, seed), entry in scores.items():
        if method != claim.better or (claim.datasets and dataset not in claim.datasets):
            continue
        other = scores.get((claim.worse, dataset, seed))
        if other is None:
            other = scores.get((claim.worse, dataset, 0))  # a deterministic method (zero-shot) runs once
        if other is not None:
            by_seed.setdefault(seed, []).append((_value(entry, claim.metric), _value(other, claim.metric)))
    return by_seed


def _shown(claim: Claim, mean: float, std: float, seeds: int) -> bool:
    if claim.at_least:
        return mean >= 0
    return mean > 0 and mean >= SIGNIFICANCE * std and seeds > 1


def evaluate_claims(scores: Scores, claims: Sequence[Claim]) -> list[ClaimResult]:
    """The claims whose two methods ran on a common dataset and seed, each with its effect and verdict."""
    results = []
    for claim in claims:
        by_seed = _paired(scores, claim)
        if not by_seed:
            continue
        if claim.metric == "equal_new":
            gap = max(abs(b - w) for pairs in by_seed.values() for b, w in pairs)
            results.append(ClaimResult(claim, gap, 0.0, len(by_seed), gap == 0.0))
            continue
        effects = [statistics.mean(b - w for b, w in pairs) for pairs in by_seed.values()]
        mean = statistics.mean(effects)
        std = statistics.stdev(effects) if len(effects) > 1 else 0.0
        results.append(ClaimResult(claim, mean, std, len(effects), _shown(claim, mean, std, len(effects))))
    return results


def format_claim(result: ClaimResult) -> str:
    """One line: the verdict, the claim and the numbers behind it."""
    claim = result.claim
    if claim.metric == "equal_new":
        detail = "identical in every run" if result.shown else f"differ by up to {result.effect:.2f} points"
        return f"{'shown' if result.shown else 'NOT shown'}: {claim.text} (new-class accuracy {detail})"
    verdict = "shown" if result.shown else "NOT shown"
    metric = {"base": "base accuracy", "new": "new-class accuracy", "hm": "HM"}[claim.metric]
    rule = "shown: not negative" if claim.at_least else f"shown: at least {SIGNIFICANCE:g}x the seed std"
    return (
        f"{verdict}: {claim.text} ({metric} {result.effect:+.1f} ± {result.std:.1f} points over "
        f"{result.seeds} seeds; {rule})"
    )
