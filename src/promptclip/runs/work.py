"""The work of one run, in order: check the inputs, run a stage 1 if one is needed, load the backbone, build
the learner, train it, save the prompt, evaluate every target. Every rank of a data-parallel job runs it; rank
0 alone writes files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from promptclip.clip.model import CLIP
from promptclip.data.datasets import DatasetSplits
from promptclip.data.fewshot import subsample_classes
from promptclip.data.loader import resolve_num_workers, training_augmentation
from promptclip.engine.checkpoint import seed_everything
from promptclip.engine.distributed import current_data_parallel, is_main_process
from promptclip.engine.train import MetricsFile, Trainer
from promptclip.factory import from_pretrained, learner_for_run
from promptclip.methods.base import PluginContext, PromptModel
from promptclip.protocols.spec import check_dataset_options
from promptclip.runs import group as rank_group
from promptclip.runs.errors import RunError
from promptclip.runs.evaluation import describe_counts, eval_subset_of, evaluate_target, to_evaluation
from promptclip.runs.fitting import check_validation_draw, fit_on_features
from promptclip.runs.inputs import (
    DatasetCache,
    check_class_counts,
    load_backbone,
    resolve_device,
    screen_run_images,
    train_loader,
    training_splits,
    warn_tied_class_names,
    with_masks,
)
from promptclip.runs.plan import PlannedRun, reusable_prompt
from promptclip.runs.results import Evaluation, RunResults
from promptclip.runs.selection import select_training_data

if TYPE_CHECKING:
    from promptclip.runs.execution import RunOptions

Log = Callable[[str], None]


def run_work(planned: PlannedRun, options: RunOptions, log: Log) -> RunResults:
    spec, cfg = planned.spec, planned.cfg
    rank_group.announce_run(planned.run_dir.path)
    check_dataset_options(cfg, [spec.dataset, *(t.dataset for t in spec.targets)])
    group = current_data_parallel()
    device = group.device if group is not None else resolve_device(cfg.device)  # cuda:LOCAL_RANK on GPUs
    reused = reusable_prompt(planned)
    # Every image the run will read is checked before any training (this run's or a stage 1's).
    datasets = DatasetCache(cfg)
    source = datasets.get(spec.dataset)
    splits, skipped = screen_run_images(
        spec, cfg, datasets, training_splits(source, spec, options.fewshot_cache_dir), log, planned.needs.validation
    )
    check_class_counts(spec, splits, datasets)
    if planned.needs.validation:
        check_validation_draw(splits, cfg.method)
    stage1_dir = run_stage1(planned, options, log) if reused is None else None
    seed_everything(spec.seed)
    clip = load_backbone(cfg, device, options.allow_torchscript)
    check_backbone_identity(planned, clip)
    if is_main_process():
        warn_tied_class_names(clip, splits, cfg.model.arch)
    selection = None
    if spec.ratio is not None:
        splits, selection = select_training_data(clip, splits, spec, cfg, device)
        log(f"selected {selection['kept']} of {selection['pool']} training images ({spec.selector})")
    classes = f"{spec.train_subsample} classes: {len(splits.classnames)}"
    log(f"training data: {spec.dataset} ({classes}), {len(splits.train)} images")

    if reused is not None:
        learner = from_pretrained(clip, reused, classnames=splits.classnames).to(device)
        train_info: dict[str, Any] = {"epochs": 0, "steps": 0, "seconds": 0.0, "final_loss": None}
        train_info["reused_from"] = str(reused.parent)
        log(f"evaluating the prompt trained in {reused.parent} (trained exactly as this run would); nothing to train")
    else:
        full = subsample_classes(source, spec.train_subsample) if planned.needs.full_training_classes else None
        workers = resolve_num_workers(cfg.data.num_workers, device)  # -1: as many as the device needs
        context = PluginContext(
            splits, spec.seed, planned.run_dir.path, stage1_dir, full, workers, training_augmentation(cfg.data)
        )
        learner = build_learner(planned, clip, splits, context).to(device)
        log(learner.parameter_summary())
        check_targets_servable(learner, planned, datasets, splits)
        train_info = train(learner, splits, planned, clip, device, options, log)
        if stage1_dir is not None:
            train_info["stage1_run"] = str(stage1_dir)
    if is_main_process():
        learner.save_pretrained(planned.run_dir.prompt)
    evaluations = evaluate_all(learner, planned, datasets, clip, device, options, log)
    extra: dict[str, Any] = {"selection": {"policy": "last_epoch"}}
    if selection is not None:
        extra["data_selection"] = selection
    if skipped:
        extra["skipped_images"] = skipped
    return RunResults(
        protocol=spec.protocol,
        dataset=spec.folder_dataset,
        method=spec.method,
        recipe=spec.recipe,
        seed=spec.seed,
        shots=spec.shots,
        evaluations=evaluations,
        transductive=spec.transductive or planned.needs.transductive,
        ratio=spec.ratio,
        selector=spec.selector,
        identity=planned.identity.to_json(),
        backbone={"arch": clip.config.name, "weights_sha256": clip.weights_sha256, "weights": cfg.model.weights},
        train=train_info,
        extra=extra,
    )


def build_learner(planned: PlannedRun, clip: CLIP, splits: DatasetSplits, context: PluginContext) -> PromptModel:
    """The run's learner; a config value the method refuses (a prompt length that does not fit its words, a
    depth beyond the backbone's layers, ...) stops the run with the method's reason and where to change it."""
    cfg = planned.cfg
    try:
        return learner_for_run(clip, cfg, splits.classnames, splits.template, context)
    except ValueError as err:
        raise RunError(
            f"{cfg.method} on {planned.spec.dataset} ({len(splits.classnames)} classes): {err}. Change the "
            "method_cfg / plugins values in the recipe or with --opts"
        ) from None


def check_targets_servable(
    learner: PromptModel, planned: PlannedRun, datasets: DatasetCache, splits: DatasetSplits
) -> None:
    """Before training: every evaluation target's class names are accepted by the learner (class-specific
    contexts serve only their own classes), so a run that cannot be evaluated stops before it trains."""
    for target in planned.spec.targets:
        names = subsample_classes(datasets.get(target.dataset), target.subsample).classnames
        if names == splits.classnames:
            continue
        try:
            learner.set_classnames(names)
        except ValueError as err:
            raise RunError(
                f"{planned.cfg.method} cannot be evaluated on {target.key!r} ({target.dataset}, "
                f"{target.subsample} classes): {err}; nothing was trained"
            ) from None
        finally:
            learner.set_classnames(splits.classnames)


def run_stage1(planned: PlannedRun, options: RunOptions, log: Log) -> Path | None:
    """Train (or reuse, when finished) the stage-1 run this run needs; its folder, or None without one."""
    stage = planned.stage1
    if stage is None:
        return None
    from promptclip.runs.execution import execute_planned

    state = "reusing the finished run" if stage.finished else "training"
    log(f"stage 1 ({stage.cfg.method}, {stage.spec.recipe}): {state} in {stage.run_dir.path}")
    outcome = execute_planned(stage, options)
    return outcome.run_dir.path if outcome.run_dir is not None else stage.run_dir.path


def check_backbone_identity(planned: PlannedRun, clip: CLIP) -> None:
    """The weights loaded are the ones the run's identity was computed from (a file replaced meanwhile is not)."""
    expected = planned.identity.values.get("backbone.weights_sha256")
    if expected is not None and clip.weights_sha256 not in (None, expected):
        raise RunError(
            f"{planned.run_dir.path}: the weights file changed while the run was being planned "
            f"(sha256 {expected[:12]}... then {clip.weights_sha256[:12]}...); start the run again"
        )


def evaluate_all(
    learner: PromptModel,
    planned: PlannedRun,
    datasets: DatasetCache,
    clip: CLIP,
    device: torch.device,
    options: RunOptions,
    log: Log,
) -> dict[str, Evaluation]:
    spec = planned.spec
    metrics = MetricsFile(planned.run_dir.metrics)
    evaluations: dict[str, Evaluation] = {}
    for target in spec.targets:
        subset = eval_subset_of(spec, target)
        counts = evaluate_target(
            learner, target, subset, datasets, planned.cfg, clip, device, options.progress, options.image_features
        )
        evaluations[target.key] = entry = to_evaluation(target, counts)
        if is_main_process():
            metrics.append(
                {
                    "eval": target.key,
                    "dataset": target.dataset,
                    "subsample": target.subsample,
                    "split": target.split,
                    "accuracy": round(entry.accuracy, 4),
                    "macro_accuracy": round(entry.macro_accuracy, 4),
                    "samples": counts.num_samples,
                }
            )
        log(describe_counts(target, counts))
    return evaluations


def train(
    learner: PromptModel,
    splits: DatasetSplits,
    planned: PlannedRun,
    clip: CLIP,
    device: torch.device,
    options: RunOptions,
    log: Log,
) -> dict[str, Any]:
    if not learner.trainable_parameters():
        log(f"{learner.name} has no trainable parameters: nothing to train")
        return {"epochs": 0, "steps": 0, "seconds": 0.0, "final_loss": None}
    cfg, spec = planned.cfg, planned.spec
    if learner.fits_on_features:
        return fit_on_features(learner, splits, cfg, clip, device, planned.needs.validation, log)
    masks = planned.needs.masks is not None
    if masks:
        splits = with_masks(splits, planned.needs.masks, log)
    loader = train_loader(splits, cfg, clip, spec.seed, device, masks)
    group = current_data_parallel()
    if group is not None:  # each rank takes its share of every batch
        loader = group.shard_train_loader(loader)
    trainer = Trainer(
        learner,
        loader,
        cfg.optim,
        run_dir=planned.run_dir.path,
        device=device,
        precision=cfg.model.precision,
        compile_mode=cfg.model.compile,
        progress=options.progress,
        tensorboard=options.tensorboard,
        log=log,
        fingerprint=planned.identity.run_id,
        callbacks=options.callbacks,
        data_parallel=group,
    )
    result = trainer.fit(resume=options.resume)
    info = {"epochs": result.epochs, "steps": result.steps, "seconds": result.seconds, "final_loss": result.final_loss}
    if result.resumed_from_epoch is not None:
        info["resumed_from_epoch"] = result.resumed_from_epoch
    return info
