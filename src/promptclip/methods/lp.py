"""Linear-probe CLIP: multinomial logistic regression on frozen, L2-normalised CLIP image features.

The few-shot baseline of CoOp (its `lpclip/` scripts, after the CLIP paper's appendix A.3): an L2-penalised
logistic regression whose inverse regularisation C is chosen on the validation draw, first over a coarse grid
(1e6, 1e4, ..., 1e-6), then by an 8-step bisection in log10 C around the best grid value. Each fit minimises
sklearn's objective for `LogisticRegression(penalty="l2", C=C)`:

    mean_i CE(W x_i + b, y_i) + ||W||² / (2 C n)        (the bias is not penalised)

by full-batch L-BFGS in float64 from zeros, stopping when the largest gradient entry is below `tolerance` or
after `max_iter` iterations (sklearn's `tol` and `max_iter`). No random draw is made, so a fit is repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptclip.classnames import prompt_names
from promptclip.clip.model import CLIP
from promptclip.config import ConfigError
from promptclip.methods.base import Batch, LabelledFeatures, LearnerOutput, PromptModel, RunNeeds
from promptclip.registry import METHODS

# CoOp lpclip/linear_probe.py: the coarse search list, in its order (a tie goes to the earlier, larger C).
COARSE_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


@dataclass
class LinearProbeConfig:
    C: float | None = None
    """Inverse L2 regularisation strength. null: chosen on the validation draw (the coarse grid, then
    `search_steps` bisection steps); a number: that C alone, and no validation images are read."""
    c_grid: list[float] = field(default_factory=lambda: list(COARSE_GRID))
    """The coarse search values, in order; on equal validation accuracy the earlier value wins."""
    search_steps: int = 8
    """Bisection steps in log10 C after the coarse search (CoOp: 8); 0 keeps the best grid value."""
    max_iter: int = 1000
    """L-BFGS iterations per fit at most (sklearn's max_iter, as CoOp sets it)."""
    tolerance: float = 1e-4
    """A fit stops when the largest entry of the objective's gradient is at most this (sklearn's tol)."""


def check_lp_config(cfg: LinearProbeConfig) -> None:
    if cfg.C is not None and not (cfg.C > 0 and math.isfinite(cfg.C)):
        raise ConfigError(f"method_cfg.C: {cfg.C} is not a positive number; use e.g. 1.0, or null to search C")
    if not cfg.c_grid or any(not (c > 0 and math.isfinite(c)) for c in cfg.c_grid):
        raise ConfigError(f"method_cfg.c_grid: {cfg.c_grid} must be a non-empty list of positive numbers")
    if cfg.search_steps < 0:
        raise ConfigError(f"method_cfg.search_steps: must be >= 0, got {cfg.search_steps}")
    if cfg.max_iter < 1:
        raise ConfigError(f"method_cfg.max_iter: must be >= 1, got {cfg.max_iter}")
    if not cfg.tolerance > 0:
        raise ConfigError(f"method_cfg.tolerance: must be > 0, got {cfg.tolerance}")


# -- the solver --------------------------------------------------------------------------------------------------
@dataclass
class LogisticFit:
    """One L2-penalised logistic regression, fitted in float64."""

    weight: torch.Tensor
    """[C, D]"""
    bias: torch.Tensor
    """[C]"""
    C: float
    objective: float
    iterations: int
    gradient: float
    """The largest entry of the objective's gradient at the end (at most `tolerance` when it converged)."""

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight.dtype) @ self.weight.t() + self.bias

    def accuracy(self, data: LabelledFeatures) -> float:
        """Percent of `data` whose arg-max class is its label (the first class wins a tie, as numpy's)."""
        predicted = self.logits(data.features).argmax(dim=-1)
        return 100.0 * (predicted == data.labels.to(predicted.device)).double().mean().item()


def logistic_objective(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, C: float
) -> torch.Tensor:
    """sklearn's objective for `LogisticRegression(C=C)`, divided by n: mean cross-entropy + ||W||² / (2 C n)."""
    n = features.shape[0]
    cross_entropy = F.cross_entropy(features @ weight.t() + bias, labels)
    return cross_entropy + weight.pow(2).sum() / (2.0 * C * n)


def fit_logistic_regression(
    data: LabelledFeatures, num_classes: int, C: float, max_iter: int = 1000, tolerance: float = 1e-4
) -> LogisticFit:
    """Minimise `logistic_objective` from zeros by full-batch L-BFGS (strong-Wolfe line search) in float64."""
    features = data.features.detach().double()
    labels = data.labels.to(features.device, torch.long)
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 25,  # room for the line searches: the iteration cap is the one that binds
        tolerance_grad=tolerance,
        tolerance_change=64 * torch.finfo(torch.float64).eps,  # scipy's ftol as sklearn sets it
        history_size=10,  # scipy's L-BFGS-B default memory
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = logistic_objective(weight, bias, features, labels, C)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # type: ignore[no-untyped-call]
        objective = float(closure().detach())
    gradient = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))  # type: ignore[union-attr]
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return LogisticFit(weight.detach(), bias.detach(), C, objective, iterations, gradient)


# -- the search over C ---------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    C: float
    trials: list[tuple[float, float]]
    """(C, validation accuracy) of every fit, in the order they were made."""


def search_c(score: Callable[[float], float], grid: Sequence[float], steps: int) -> SearchResult:
    """CoOp's search: `score` (validation accuracy) at every grid value, the first best one P, then `steps`
    bisection steps on [P/10, 10·P] in log10 C: both ends are scored, the better one is chosen (the left, smaller
    C on a tie) and the half of the interval on its side is kept. The result is the C chosen at the last step
    (P itself with no steps). Each C is scored once."""
    scores: dict[float, float] = {}
    trials: list[tuple[float, float]] = []

    def score_at(log_c: float) -> float:
        if log_c not in scores:
            scores[log_c] = score(10.0**log_c)
            trials.append((10.0**log_c, scores[log_c]))
        return scores[log_c]

    coarse = [score_at(math.log10(c)) for c in grid]
    chosen = math.log10(grid[coarse.index(max(coarse))])
    left, right = chosen - 1.0, chosen + 1.0
    for _ in range(steps):
        middle = 0.5 * (left + right)
        if score_at(left) < score_at(right):
            chosen, left = right, middle
        else:
            chosen, right = left, middle
    return SearchResult(10.0**chosen, trials)


# -- the learner ---------------------------------------------------------------------------------------------------
@METHODS.register("lp")
class LinearProbe(PromptModel):
    """Linear-probe CLIP: logistic regression on frozen image features, C chosen on the validation draw."""

    name = "lp"
    Config = LinearProbeConfig
    fits_on_features = True

    def __init__(
        self, clip: CLIP, classnames: Sequence[str], cfg: LinearProbeConfig, template: str = "a photo of a {}."
    ) -> None:
        check_lp_config(cfg)
        super().__init__(clip, classnames, cfg, template)
        device = clip.token_embedding.weight.device
        self.weight = nn.Parameter(torch.zeros(len(self.classnames), clip.config.embed_dim, device=device))
        self.bias = nn.Parameter(torch.zeros(len(self.classnames), device=device))

    @classmethod
    def needs(cls, cfg: LinearProbeConfig, run: Any) -> RunNeeds:
        check_lp_config(cfg)
        return RunNeeds(validation=cfg.C is None)

    # The classifier is tied to its training classes, and its rows are the class features.
    def set_classnames(self, names: Sequence[str]) -> None:
        if prompt_names(names) != self.classnames:
            raise ValueError(
                f"lp: the linear probe's classifier has one row per training class ({len(self.classnames)} "
                f"classes) and cannot classify another class set ({len(names)} classes); evaluate it on its "
                "own classes (few-shot), not base-to-new or on another dataset"
            )
        self.invalidate_cache()

    def encode_classnames(self, names: Sequence[str]) -> torch.Tensor:
        if prompt_names(names) != self.classnames:
            raise ValueError("lp: only the classifier's own training classes have features")
        return F.normalize(self.weight, dim=-1)

    @property
    def cacheable_image_features(self) -> bool:
        return True  # the image side is the frozen CLIP and `forward` is `classify_image_features(image_features)`

    def classify_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            return image_features.float() @ self.weight.t() + self.bias

    def forward(self, batch: Batch) -> LearnerOutput:
        image = self.image_features(batch["image"])
        return LearnerOutput(self.classify_image_features(image), image, self.text_features())

    # -- fitting ---------------------------------------------------------------------------------------------
    def fit_on_features(
        self, train: LabelledFeatures, val: LabelledFeatures | None, log: Callable[[str], None]
    ) -> dict[str, Any]:
        cfg = self.cfg
        fits: dict[float, LogisticFit] = {}

        def fit(C: float) -> LogisticFit:
            result = fit_logistic_regression(train, len(self.classnames), C, cfg.max_iter, cfg.tolerance)
            if result.gradient > cfg.tolerance:
                log(
                    f"lp: C={C:.4g} stopped after {result.iterations} iterations with gradient {result.gradient:.2g} "
                    f"> tolerance {cfg.tolerance:g} (raise method_cfg.max_iter to fit it closer)"
                )
            fits[C] = result
            return result

        if cfg.C is not None:
            final = fit(cfg.C)
            search: dict[str, Any] = {"C": cfg.C, "searched": False}
        else:
            if val is None or val.labels.numel() == 0:
                raise ValueError("lp: choosing C needs validation images; set method_cfg.C to fix it instead")

            def score(C: float) -> float:
                accuracy = fit(C).accuracy(val)
                log(f"lp: C={C:.4g} validation accuracy {accuracy:.2f}% ({fits[C].iterations} L-BFGS iterations)")
                return accuracy

            result = search_c(score, cfg.c_grid, cfg.search_steps)
            final = fits[result.C]
            search = {"C": result.C, "searched": True, "trials": [[c, round(a, 4)] for c, a in result.trials]}
            log(f"lp: chose C={result.C:.4g} ({len(result.trials)} fits on {val.labels.numel()} validation images)")
        self.load_fit(final)
        return {"final_loss": final.objective, "linear_probe": {**search, "iterations": final.iterations}}

    def load_fit(self, fit: LogisticFit) -> None:
        """Take a fitted classifier as this learner's weights."""
        with torch.no_grad():
            self.weight.copy_(fit.weight.to(self.weight.device, self.weight.dtype))
            self.bias.copy_(fit.bias.to(self.bias.device, self.bias.dtype))
        self.invalidate_cache()
