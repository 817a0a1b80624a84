"""Linear-probe CLIP (`lp`): the solver against scikit-learn's LogisticRegression on the same features, the C
search step by step against CoOp's lpclip procedure, and the run path (validation draw, refusals)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from promptclip.config import ConfigError, build_run_config
from promptclip.factory import run_needs
from promptclip.methods.base import LabelledFeatures
from promptclip.methods.lp import COARSE_GRID, fit_logistic_regression, logistic_objective, search_c

sklearn_linear_model = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is a dev dependency")


def clustered(n_per_class: int, classes: int, dim: int, spread: float, seed: int) -> LabelledFeatures:
    """L2-normalised points around random class centres (overlapping for a large `spread`)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    return LabelledFeatures(F.normalize(points, dim=-1), labels)


def sklearn_fit(data: LabelledFeatures, C: float, tol: float, max_iter: int):  # type: ignore[no-untyped-def]
    model = sklearn_linear_model.LogisticRegression(C=C, tol=tol, max_iter=max_iter)
    return model.fit(data.features.numpy(), data.labels.numpy())


def objective_gradient_norm(weight: torch.Tensor, bias: torch.Tensor, data: LabelledFeatures, C: float) -> float:
    """The 2-norm of the gradient of the (n-scaled) sklearn objective at (weight, bias)."""
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    logistic_objective(weight, bias, data.features, data.labels, C).backward()
    return float(torch.cat([weight.grad.flatten(), bias.grad]).norm())  # type: ignore[union-attr]


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0])
def test_the_fit_equals_sklearn_logistic_regression(C: float) -> None:
    train = clustered(10, 4, 8, spread=1.0, seed=0)
    test = clustered(25, 4, 8, spread=1.0, seed=1)
    ours = fit_logistic_regression(train, 4, C, max_iter=1000, tolerance=1e-9)
    reference = sklearn_fit(train, C, tol=1e-12, max_iter=100_000)
    weight, bias = torch.from_numpy(reference.coef_), torch.from_numpy(reference.intercept_)
    # One objective, so the same minimum value (float64 sums of 40 terms: ~1e-15 relative).
    theirs = float(logistic_objective(weight, bias, train.features, train.labels, C))
    assert ours.objective == pytest.approx(theirs, rel=1e-10, abs=1e-12)
    # The minimiser is unique up to a common shift of the biases, to which probabilities are blind. The penalty
    # makes the objective at least 1/(C n)-strongly convex in W, so two points with gradients g1, g2 have
    # weights at most (|g1| + |g2|) C n apart; with unit features a logit (and so a probability) moves at most
    # that much per unit of weight, and the biases, pinned by the same stationarity, add as much again.
    gradients = objective_gradient_norm(ours.weight, ours.bias, train, C) + objective_gradient_norm(
        weight, bias, train, C
    )
    tolerance = 2 * gradients * C * len(train.labels)
    assert tolerance < 1e-3, f"the fits did not converge (gradient norms {gradients:.2g})"
    probabilities = ours.logits(test.features).softmax(dim=-1)
    expected = torch.from_numpy(reference.predict_proba(test.features.numpy()))
    assert (probabilities - expected).abs().max().item() <= tolerance
    predicted = ours.logits(test.features).argmax(dim=-1)
    assert torch.equal(predicted, torch.from_numpy(reference.predict(test.features.numpy())))


def test_the_fit_stops_at_the_tolerance_and_reports_its_gradient() -> None:
    train = clustered(10, 4, 8, spread=1.0, seed=0)
    loose = fit_logistic_regression(train, 4, 1.0, max_iter=1000, tolerance=1e-2)
    tight = fit_logistic_regression(train, 4, 1.0, max_iter=1000, tolerance=1e-9)
    assert loose.gradient <= 1e-2 and loose.iterations < tight.iterations
    capped = fit_logistic_regression(train, 4, 1e4, max_iter=3, tolerance=1e-12)
    assert capped.iterations == 3 and capped.gradient > 1e-12


# -- the search over C ---------------------------------------------------------------------------------------
def coop_search(score, grid=COARSE_GRID, steps=8):  # type: ignore[no-untyped-def]
    """CoOp's lpclip loop, restated: the first best grid value P, then [P/10, 10P]; at every step both ends
    are scored (no memory), the right one is kept when it scores strictly higher, and the next range runs in
    log10 from the kept end to the middle."""
    scores = [score(c) for c in grid]
    peak = grid[scores.index(max(scores))]
    low, high = peak / 10, peak * 10
    final = None
    for _ in range(steps):
        left, right = score(low), score(high)
        middle = 0.5 * (math.log10(low) + math.log10(high))
        if left < right:
            final, low, high = high, 10**middle, high
        else:
            final, low, high = low, low, 10**middle
    return final


def peaked(at: float):  # type: ignore[no-untyped-def]
    return lambda C: -abs(math.log10(C) - at)


def test_the_search_takes_coops_steps() -> None:
    # Peak of the score at log10 C = 2.3: the grid picks 1e2; the bisection then keeps, in log10 C,
    # 3 (1 vs 3), 2 (2 vs 3), 2.5, 2.25, 2.25, 2.3125, 2.3125, 2.296875.
    result = search_c(peaked(2.3), COARSE_GRID, 8)
    assert math.log10(result.C) == pytest.approx(2.296875, abs=1e-12)
    assert math.isclose(result.C, coop_search(peaked(2.3)), rel_tol=1e-12)
    logs = [round(math.log10(c), 6) for c, _ in result.trials]
    # Each C is fitted once: the 7 grid values, then 1 and 3, then one new end per step.
    assert logs == [6, 4, 2, 0, -2, -4, -6, 1, 3, 2.5, 2.25, 2.375, 2.3125, 2.28125, 2.296875]


@pytest.mark.parametrize("at", [-5.2, -0.4, 0.0, 3.7, 6.9])
def test_the_search_ends_where_coops_does(at: float) -> None:
    assert math.isclose(search_c(peaked(at), COARSE_GRID, 8).C, coop_search(peaked(at)), rel_tol=1e-12)


def test_ties_go_to_the_earlier_grid_value_then_to_the_smaller_c() -> None:
    flat = search_c(lambda C: 50.0, COARSE_GRID, 3)
    # Grid tie: the first value, 1e6; every bisection tie keeps the left (smaller) end: 1e5 each time.
    assert math.isclose(flat.C, 1e5, rel_tol=1e-12)
    assert math.isclose(flat.C, coop_search(lambda C: 50.0, steps=3), rel_tol=1e-12)
    assert search_c(lambda C: 50.0, COARSE_GRID, 0).C == 1e6


def test_the_searched_probe_chooses_coops_c_with_sklearn_fits() -> None:
    """The whole protocol on the same features: CoOp's loop over sklearn fits and the learner's search over
    its own fits choose the same C and predict the same test labels."""
    train, val, test = (clustered(n, 5, 16, spread=1.2, seed=s) for n, s in ((8, 3), (4, 4), (40, 5)))

    def sklearn_accuracy(C: float) -> float:
        predicted = torch.from_numpy(sklearn_fit(train, C, tol=1e-4, max_iter=1000).predict(val.features.numpy()))
        return float((predicted == val.labels).double().mean())

    expected_c = coop_search(sklearn_accuracy)
    ours = search_c(lambda C: fit_logistic_regression(train, 5, C).accuracy(val), COARSE_GRID, 8)
    assert math.isclose(ours.C, expected_c, rel_tol=1e-12)
    # Both final fits stop once the largest gradient entry is below sklearn's tol 1e-4, not at the minimum, so
    # the two classifiers differ by about that much and a test point on a class boundary may fall either way.
    final = fit_logistic_regression(train, 5, ours.C)
    reference = sklearn_fit(train, expected_c, tol=1e-4, max_iter=1000)
    predicted = final.logits(test.features).argmax(dim=-1)
    agree = predicted == torch.from_numpy(reference.predict(test.features.numpy()))
    assert agree.double().mean() >= 0.99


# -- configuration and runs ----------------------------------------------------------------------------------
def lp_config(**method_cfg: object):  # type: ignore[no-untyped-def]
    return build_run_config({"method": "lp", "method_cfg": method_cfg})


@pytest.mark.parametrize(
    ("field", "value"), [("C", -1.0), ("C", 0), ("c_grid", []), ("c_grid", [1.0, -2.0]), ("search_steps", -1)]
)
def test_bad_settings_are_refused_when_the_run_is_planned(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"method_cfg.{field}"):
        run_needs(lp_config(**{field: value}))


def test_only_a_searched_c_needs_the_validation_draw() -> None:
    assert run_needs(lp_config()).validation
    assert not run_needs(lp_config(C=0.5)).validation


def smoke_recipe(tmp_path: Path, method_cfg: dict, val_per_class: int) -> Path:
    recipe = {
        "method": "lp",
        "method_cfg": method_cfg,
        "model": {"arch": "tiny-vit", "weights": "random", "precision": "fp32"},
        "data": {
            "dataset": "synthetic_shapes",
            "shots": 2,
            "eval_batch_size": 32,
            "num_workers": 0,
            "options": {"train_per_class": 3, "val_per_class": val_per_class, "test_per_class": 2, "image_size": 32},
        },
        "device": "cpu",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_few_shot(recipe: Path, runs: Path, shots: int) -> int:
    from promptclip.cli import main

    arguments = ["--recipe", str(recipe), "--shots", str(shots), "--seeds", "1", "--runs-dir", str(runs), "--quiet"]
    return main(["run", "few_shot", *arguments])


def test_a_few_shot_run_records_the_search(tmp_path: Path) -> None:
    recipe = smoke_recipe(tmp_path, {"c_grid": [10.0, 0.1], "search_steps": 1}, val_per_class=2)
    runs = tmp_path / "runs"
    assert run_few_shot(recipe, runs, shots=2) == 0
    (results_file,) = runs.rglob("results.json")
    record = json.loads(results_file.read_text())["train"]["linear_probe"]
    assert record["searched"] and len(record["trials"]) == 4  # 2 grid values, then the 2 ends of one step
    assert record["C"] in [c for c, _ in record["trials"]]
    log = (results_file.parent / "log.txt").read_text()
    assert "20 validation images" in log  # min(2, 4) per class of the 10 classes


def test_a_search_without_validation_images_stops_before_any_work(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    recipe = smoke_recipe(tmp_path, {}, val_per_class=0)
    runs = tmp_path / "runs"
    assert run_few_shot(recipe, runs, shots=1) != 0
    assert "method_cfg.C" in capsys.readouterr().err
    assert not list(runs.rglob("prompt.safetensors"))
    # A fixed C reads no validation image.
    recipe = smoke_recipe(tmp_path, {"C": 1.0}, val_per_class=0)
    assert run_few_shot(recipe, runs, shots=1) == 0


def test_a_base_to_new_run_is_refused_before_fitting(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from promptclip.cli import main

    recipe = smoke_recipe(tmp_path, {"C": 1.0}, val_per_class=1)
    runs = tmp_path / "runs"
    assert main(["run", "base2new", "--recipe", str(recipe), "--seeds", "1", "--runs-dir", str(runs), "--quiet"]) != 0
    assert "cannot classify another class set" in capsys.readouterr().err
    assert not list(runs.rglob("prompt.safetensors"))
