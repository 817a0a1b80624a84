"""Evaluating a learner on one target: the same pipeline for `promptclip run`/`train` and `promptclip eval`."""

from __future__ import annotations

from typing import Literal

import torch

from promptclip.clip.model import CLIP
from promptclip.config import RunConfig
from promptclip.data.fewshot import subsample_classes
from promptclip.engine.distributed import current_data_parallel
from promptclip.engine.evaluate import EvalCounts, ImageFeatureCache, evaluate
from promptclip.methods.base import PromptModel
from promptclip.protocols.spec import EvalTarget, RunSpec
from promptclip.runs.errors import RunError
from promptclip.runs.inputs import DatasetCache, eval_loader, image_data_key
from promptclip.runs.results import Evaluation, evaluation_from_counts


def eval_subset_of(spec: RunSpec, target: EvalTarget) -> Literal["base", "new"]:
    """`base` when `target` is the dataset and class subset the run trained on, else `new`."""
    return "base" if (target.dataset, target.subsample) == (spec.dataset, spec.train_subsample) else "new"


def evaluate_target(
    learner: PromptModel,
    target: EvalTarget,
    subset: Literal["base", "new"],
    datasets: DatasetCache,
    cfg: RunConfig,
    clip: CLIP,
    device: torch.device,
    progress: bool | None,
    image_features: ImageFeatureCache | None = None,
) -> EvalCounts:
    """Evaluate on `target`: its dataset, its class subset (relabelled from 0) and split, with its names and
    template; `subset` tells the learner whether these are the classes it was trained on. `image_features`
    keeps the frozen image features of the target's images for later evaluations."""
    splits = subsample_classes(datasets.get(target.dataset), target.subsample)
    learner.set_eval_subset(subset)
    if learner.template != splits.template:  # a transfer target prompts hand-written parts with its own template
        learner.set_template(splits.template)
    try:
        learner.set_classnames(splits.classnames)
    except ValueError as err:  # e.g. class-specific context cannot serve another class set
        raise RunError(f"evaluation {target.key!r} on {target.dataset} [{target.subsample}]: {err}") from None
    loader = eval_loader(splits, target.split, cfg, clip, device)
    store = (
        image_features.store(clip, image_data_key(cfg, target), cfg.model.precision, device)
        if image_features is not None
        else None
    )
    return evaluate(
        learner,
        loader,
        classnames=splits.classnames,
        device=device,
        precision=cfg.model.precision,
        progress=progress,
        desc=f"eval {target.key}",
        image_features=store,
        data_parallel=current_data_parallel(),
    )


def to_evaluation(target: EvalTarget, counts: EvalCounts) -> Evaluation:
    return evaluation_from_counts(
        target.dataset, target.subsample, target.split, counts.classnames, counts.correct, counts.total, counts.errors
    )


def describe_counts(target: EvalTarget, counts: EvalCounts) -> str:
    return (
        f"{target.key}: {target.dataset} [{target.subsample}, {target.split}] accuracy {counts.accuracy:.2f}% "
        f"({counts.num_correct}/{counts.num_samples}), macro {counts.macro_accuracy:.2f}%"
    )
