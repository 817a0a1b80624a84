"""The claims arithmetic: paired per-seed effects, their spread and the verdict."""

from __future__ import annotations

import statistics

import pytest

from promptclip.reports.claims import Claim, evaluate_claims, format_claim


def scores(rows: dict[tuple[str, str, int], tuple[float, float]]) -> dict[tuple[str, str, int], dict[str, float]]:
    return {key: {"base": base, "new": new} for key, (base, new) in rows.items()}


def test_effect_is_the_mean_over_seeds_of_the_dataset_averaged_difference() -> None:
    data = scores(
        {
            ("a", "d1", 1): (60, 50), ("b", "d1", 1): (50, 50),
            ("a", "d2", 1): (70, 50), ("b", "d2", 1): (66, 50),
            ("a", "d1", 2): (62, 50), ("b", "d1", 2): (50, 50),
            ("a", "d2", 2): (68, 50), ("b", "d2", 2): (66, 50),
        }
    )  # fmt: skip
    (result,) = evaluate_claims(data, [Claim("a beats b", "a", "b", "base")])
    per_seed = [(10 + 4) / 2, (12 + 2) / 2]  # both 7.0: no spread
    assert result.effect == pytest.approx(statistics.mean(per_seed))
    assert result.std == pytest.approx(0.0)
    assert result.seeds == 2 and result.shown


def test_an_effect_within_three_seed_deviations_is_not_shown() -> None:
    data = scores({("a", "d", s): (50 + d, 50) for s, d in ((1, 3.0), (2, -1.0), (3, 1.0))})
    data |= scores({("b", "d", s): (50, 50) for s in (1, 2, 3)})
    (result,) = evaluate_claims(data, [Claim("a beats b", "a", "b", "base")])
    assert result.effect == pytest.approx(1.0) and result.std == pytest.approx(2.0)
    assert not result.shown
    assert format_claim(result).startswith("NOT shown: a beats b (base accuracy +1.0 ± 2.0 points over 3 seeds")


def test_hm_claims_compare_harmonic_means_and_a_wrong_sign_is_not_shown() -> None:
    data = scores({("a", "d", s): (80, 40) for s in (1, 2)} | {("b", "d", s): (60, 60) for s in (1, 2)})
    (result,) = evaluate_claims(data, [Claim("a has the higher HM", "a", "b", "hm")])
    assert result.effect == pytest.approx(2 * 80 * 40 / 120 - 60)  # 53.3 - 60 < 0
    assert not result.shown


def test_equal_new_needs_identical_new_accuracy_in_every_run() -> None:
    same = scores({("a", "d", s): (70, 40) for s in (1, 2)} | {("b", "d", s): (60, 40) for s in (1, 2)})
    (result,) = evaluate_claims(same, [Claim("a keeps b's new accuracy", "a", "b", "equal_new")])
    assert result.shown and result.effect == 0.0
    off = dict(same) | {("a", "d", 2): {"base": 70, "new": 40.5}}
    (result,) = evaluate_claims(off, [Claim("a keeps b's new accuracy", "a", "b", "equal_new")])
    assert not result.shown and result.effect == pytest.approx(0.5)


def test_at_least_claims_are_shown_when_not_negative_and_claims_without_runs_are_left_out() -> None:
    data = scores({("a", "d", s): (50, 0) for s in (1, 2)} | {("b", "d", s): (50, 0) for s in (1, 2)})
    claims = [Claim("a at least b", "a", "b", "base", at_least=True), Claim("c beats b", "c", "b", "base")]
    (result,) = evaluate_claims(data, claims)
    assert result.claim.text == "a at least b" and result.shown


def test_claims_keep_to_their_datasets() -> None:
    data = scores({("a", "d1", s): (90, 0) for s in (1, 2)} | {("b", "d1", s): (50, 0) for s in (1, 2)})
    assert evaluate_claims(data, [Claim("a beats b on d2", "a", "b", "base", ("d2",))]) == []
