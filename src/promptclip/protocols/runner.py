"""Execute run specs: load CLIP, build the data, build the learner, train, save the prompt, evaluate every
target, write `results.json` (atomically, last, so its presence means the run is complete).

The run folder holds `config.yaml` (the resolved configuration; `config_hash` is the sha256 of its text),
`log.txt`, `metrics.jsonl`, `checkpoints/last.pt`, `prompt/` (`save_pretrained`) and `results.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from promptclip import __version__
from promptclip.clip.model import CLIP
from promptclip.config import RunConfig, replace, to_dict
from promptclip.data.datasets import DatasetSplits, build_dataset
from promptclip.data.datasets.base import SplitName, builder_options, make_builder
from promptclip.data.datasets.check import screen_images
from promptclip.data.fewshot import fewshot_splits, subsample_classes
from promptclip.data.loader import build_loader
from promptclip.engine.checkpoint import seed_everything
from promptclip.engine.distributed import (
    DataParallel,
    current_data_parallel,
    init_data_parallel,
    is_main_process,
    launched_with_torchrun,
)
from promptclip.engine.evaluate import EvalCounts, ImageFeatureCache, evaluate
from promptclip.engine.train import METRICS_FILE, EpochCallback, MetricsFile, RunLog, Trainer
from promptclip.io import atomic_write_json, atomic_write_text, remove_stale_temporaries
from promptclip.locks import RunLock, RunLockError
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.protocols.spec import RESULTS_FILE, EvalTarget, RunSpec, shots_label

RESULTS_SCHEMA = 1
CONFIG_FILE = "config.yaml"
PROMPT_DIR = "prompt"
IN_MEMORY_MAX_IMAGES = 2000  # decode small (few-shot) training sets once instead of every epoch


class RunError(RuntimeError):
    """A run that cannot proceed as configured; the message names the run folder and the fix."""


class RunBusyError(RunError):
    """The run folder is locked by another running process (another sweep over the same runs folder)."""


@dataclass
class RunOptions:
    resume: bool = False
    progress: bool | None = None
    tensorboard: bool = False
    echo: bool = True
    callbacks: Sequence[EpochCallback] = ()
    fewshot_cache_dir: str | Path | None = None
    image_features: ImageFeatureCache = field(default_factory=ImageFeatureCache)
    """Frozen image features of evaluation images, shared by the runs these options execute (a sweep's runs
    on one dataset and backbone encode each test image once; see `PromptModel.cacheable_image_features`)."""


@dataclass
class RunOutcome:
    spec: RunSpec
    status: Literal["done", "skipped", "failed", "busy"]
    results: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------
# Configuration of one run
# ---------------------------------------------------------------------------------------------------------


def spec_config(cfg: RunConfig, spec: RunSpec) -> RunConfig:
    """`cfg` with the spec's dataset, shots, class subset and seed filled in."""
    data = replace(cfg.data, dataset=spec.dataset, shots=spec.shots, subsample=spec.train_subsample)
    return replace(cfg, data=data, seed=spec.seed)


def config_text(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(config_text(cfg).encode("utf-8")).hexdigest()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} was asked for but CUDA is not available; use --opts device cpu")
    return device


def dataset_options(cfg: RunConfig, dataset: str) -> dict[str, Any]:
    """Options for `dataset`: `data.options` entries it accepts, then `data.options.<dataset>` overrides.

    A run touches several datasets (cross-dataset targets); a shared option applies to every dataset that
    has it, and an option no dataset of the run accepts is an error raised by `check_dataset_options`.
    """
    options = cfg.data.options or {}
    per_dataset = options.get(dataset)
    shared = {k: v for k, v in options.items() if not isinstance(v, Mapping)}
    accepted = builder_options(type(make_builder(dataset)))
    chosen = {k: v for k, v in shared.items() if k in accepted}
    if isinstance(per_dataset, Mapping):
        chosen.update(per_dataset)
    return chosen


def check_dataset_options(cfg: RunConfig, datasets: Sequence[str]) -> None:
    options = cfg.data.options or {}
    shared = [k for k, v in options.items() if not isinstance(v, Mapping)]
    accepted: set[str] = set()
    for name in datasets:
        accepted |= set(builder_options(type(make_builder(name))))
    unused = [k for k in shared if k not in accepted]
    if unused:
        raise RunError(
            f"data.options: {', '.join(unused)} is not an option of {', '.join(sorted(set(datasets)))}; "
            "see `promptclip data info --dataset NAME` for each dataset's options"
        )


class DatasetCache:
    """Each dataset of a run is read once (a cross-dataset run evaluates up to eleven)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._built: dict[str, DatasetSplits] = {}

    def get(self, name: str) -> DatasetSplits:
        if name not in self._built:
            self._built[name] = build_dataset(name, self.cfg.data.root, **dataset_options(self.cfg, name))
        return self._built[name]

    def screen(self, name: str, split: SplitName, skipped: dict[str, list[str]]) -> None:
        """Check the images of `split` of dataset `name` before the run starts (see `screen_images`); with
        `data.on_bad_image skip` the unusable ones leave the cached split and are listed in `skipped`."""
        key = f"{name}/{split}"
        if key in skipped:
            return
        splits = self.get(name)
        kept, bad = screen_images(splits, splits.split(split), f"{split} images of {name}", self.cfg.data.on_bad_image)
        skipped[key] = bad
        if bad:
            self._built[name] = splits.replace(**{split: kept})


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


RANDOM_BACKBONE_SEED = 0


def load_backbone(cfg: RunConfig, device: torch.device) -> CLIP:
    """The frozen CLIP of `cfg.model`. Random weights (tests, smoke runs) are drawn from a fixed seed, apart
    from the global generators, so every run seed sees the same backbone."""
    from promptclip.clip.weights import RANDOM_WEIGHTS, load_clip

    if cfg.model.weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            return load_clip(cfg.model.arch, cfg.model.weights, device=device)
    return load_clip(cfg.model.arch, cfg.model.weights, device=device)


def build_learner(
    clip: CLIP,
    cfg: RunConfig,
    splits: DatasetSplits,
    seed: int,
    run_dir: Path | None,
    extras: Mapping[str, Any] | None = None,
) -> PromptModel:
    """The method's learner on `splits`' class names and template, wrapped by the configured plug-ins
    (`extras` goes to them as `PluginContext.extras`)."""
    learner = get_prompt_model(
        clip, cfg.method_cfg, splits.classnames, template=splits.template, method=cfg.method_name
    )
    if cfg.plugins:
        from promptclip.plugins.base import PluginContext, wrap_with_plugins

        context = PluginContext(splits=splits, seed=seed, run_dir=run_dir, extras=dict(extras or {}))
        learner = wrap_with_plugins(learner, cfg.plugins, context)
    return learner


def set_eval_subset(learner: PromptModel, which: Literal["base", "new"]) -> None:
    """Tell the learner (and the learners plug-ins wrap) whether the classes evaluated next are the ones it
    was trained on ("base") or any other set ("new"); learners that weigh their prompts by it (DPC) define
    `set_eval_subset`, the others ignore it."""
    current: Any = learner
    while isinstance(current, PromptModel):
        choose = getattr(current, "set_eval_subset", None)
        if callable(choose):
            choose(which)
        current = getattr(current, "inner", None)


def eval_subset_of(spec: RunSpec, target: EvalTarget) -> Literal["base", "new"]:
    """`base` when `target` is the dataset and class subset the run trained on, else `new`."""
    return "base" if (target.dataset, target.subsample) == (spec.dataset, spec.train_subsample) else "new"


def set_template(learner: PromptModel, template: str) -> None:
    """Give the learner (and the learners plug-ins wrap) another dataset's hand-written template."""
    current: Any = learner
    while isinstance(current, PromptModel):
        current.template = template
        current = getattr(current, "inner", None)
    learner.invalidate_cache()


def training_splits(source: DatasetSplits, spec: RunSpec, options: RunOptions) -> DatasetSplits:
    """The spec's training data: the K-shot draw of its seed (K < 1: every image), then its class subset.

    The draw comes first, over all classes, then the cut: the field's order, so base and new runs share it.
    """
    splits = (
        fewshot_splits(source, spec.shots, spec.seed, cache_dir=options.fewshot_cache_dir)
        if spec.shots >= 1
        else source
    )
    return subsample_classes(splits, spec.train_subsample)


def train_loader(
    splits: DatasetSplits, cfg: RunConfig, clip: CLIP, seed: int, device: torch.device, masks: bool
) -> Any:
    return build_loader(
        splits,
        "train",
        batch_size=cfg.data.batch_size,
        image_size=clip.image_size,
        seed=seed,
        num_workers=cfg.data.num_workers,
        with_masks=masks,
        in_memory=len(splits.train) <= IN_MEMORY_MAX_IMAGES,
        pin_memory=device.type == "cuda",
    )


def eval_loader(splits: DatasetSplits, split: str, cfg: RunConfig, clip: CLIP, device: torch.device) -> Any:
    return build_loader(
        splits,
        split,  # type: ignore[arg-type]
        batch_size=cfg.data.eval_batch_size,
        train=False,
        image_size=clip.image_size,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )


def evaluate_target(
    learner: PromptModel,
    target: EvalTarget,
    datasets: DatasetCache,
    cfg: RunConfig,
    clip: CLIP,
    device: torch.device,
    progress: bool | None,
    image_features: ImageFeatureCache | None = None,
) -> EvalCounts:
    """Evaluate on `target`: its dataset, its class subset (relabelled from 0) and split, with its names.
    `image_features` keeps the frozen image features of the target's images for later evaluations."""
    splits = subsample_classes(datasets.get(target.dataset), target.subsample)
    if learner.template != splits.template:  # a transfer target prompts hand-written parts with its own template
        set_template(learner, splits.template)
    try:
        learner.set_classnames(splits.classnames)
    except ValueError as err:  # e.g. class-specific context cannot serve another class set
        raise RunError(f"evaluation {target.key!r} on {target.dataset} [{target.subsample}]: {err}") from None
    loader = eval_loader(splits, target.split, cfg, clip, device)
    return evaluate(
        learner,
        loader,
        classnames=splits.classnames,
        device=device,
        precision=cfg.model.precision,
        progress=progress,
        desc=f"eval {target.key}",
        image_features=image_features.store(clip, image_data_key(cfg, target), cfg.model.precision, device)
        if image_features is not None
        else None,
        data_parallel=current_data_parallel(),
    )


def image_data_key(cfg: RunConfig, target: EvalTarget) -> tuple[str, ...]:
    """What names the images of `target` beyond their paths: the dataset, its root, options and split."""
    options = json.dumps(dataset_options(cfg, target.dataset), sort_keys=True, default=str)
    return (target.dataset, str(cfg.data.root), options, target.split)


# ---------------------------------------------------------------------------------------------------------
# Data-efficient selection
# ---------------------------------------------------------------------------------------------------------


def zero_shot_outputs(
    clip: CLIP, splits: DatasetSplits, cfg: RunConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, image features, logits) of zero-shot CLIP on the training images, without augmentation."""
    from promptclip.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig

    zero_shot = ZeroShotCLIP(clip, splits.classnames, ZeroShotConfig(), template=splits.template).to(device)
    zero_shot.eval()
    loader = eval_loader(splits, "train", cfg, clip, device)
    labels, features, logits = [], [], []
    with torch.no_grad():
        for batch in loader:
            output = zero_shot({"image": batch["image"].to(device)})
            labels.append(batch["label"])
            features.append(output.image_features.float().cpu())
            logits.append(output.logits.float().cpu())
    return torch.cat(labels), torch.cat(features), torch.cat(logits)


def select_training_data(
    clip: CLIP, splits: DatasetSplits, spec: RunSpec, cfg: RunConfig, device: torch.device
) -> tuple[DatasetSplits, dict[str, Any]]:
    from promptclip.data.selection import SelectionInput, select
    from promptclip.registry import SELECTORS

    assert spec.ratio is not None and spec.selector is not None
    needs = SELECTORS.get(spec.selector).needs
    if needs:
        labels, features, logits = zero_shot_outputs(clip, splits, cfg, device)
    else:
        labels, features, logits = torch.tensor([d.label for d in splits.train]), None, None
    data = SelectionInput(
        labels=labels, features=features if "features" in needs else None, logits=logits if "logits" in needs else None
    )
    result = select(spec.selector, data, spec.ratio, spec.seed)
    kept = [splits.train[i] for i in result.indices]
    record = {
        "selector": spec.selector,
        "ratio": spec.ratio,
        "seed": spec.seed,
        "scored_by": "zero-shot CLIP" if needs else None,
        "kept": len(kept),
        "pool": len(splits.train),
        "warnings": result.warnings,
    }
    return splits.replace(train=kept), record


# ---------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------


def reusable_prompt(spec: RunSpec, fingerprint: str) -> Path | None:
    """The prompt of a finished run this spec may evaluate instead of training (same configuration)."""
    if spec.prompt_from is None:
        return None
    results_path = spec.prompt_from / RESULTS_FILE
    prompt_dir = spec.prompt_from / PROMPT_DIR
    if not results_path.is_file() or not prompt_dir.is_dir():
        return None
    try:
        previous = json.loads(results_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return prompt_dir if previous.get("config_hash") == fingerprint else None


def stage1_run_dir(spec: RunSpec, method: str, recipe: str, leaf: str | None = None) -> Path:
    """Where the stage-1 run of a two-stage spec lives: where a plain run of `method` with `recipe` would
    (`<runs>/<protocol>/<dataset>/<method>/<recipe>/<leaf>/seed<s>`, the leaf `spec`'s unless given), or
    `<run folder>/stage1` when the run folder was chosen by hand."""
    parts = spec.run_dir.parts
    if len(parts) >= 7 and parts[-6:-2] == (spec.protocol, spec.dataset, spec.method, spec.recipe):
        return spec.run_dir.parents[3] / method / recipe / (leaf or parts[-2]) / parts[-1]
    return spec.run_dir / "stage1"


def prepare_stage1(spec: RunSpec, cfg: RunConfig, options: RunOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Plug-ins that tune a finished run of the learner they wrap (class attribute `requires_stage1`, e.g.
    DPC) describe that run with `stage1_config(cfg, name)` -> (config, recipe name or None) or None (no run
    needed). It is trained here as an ordinary run, or reused when its results.json exists; its folder goes
    to the plug-in as `extras["stage1_dir"]`."""
    from promptclip.plugins import load_all
    from promptclip.registry import PLUGINS

    load_all()
    for name in cfg.plugin_names:
        plugin = PLUGINS.get(name)
        if getattr(plugin, "requires_stage1", False):
            break
    else:
        return {}
    stage1 = plugin.stage1_config(cfg, name)
    if stage1 is None:
        return {}
    stage1_cfg, stage1_recipe = stage1
    recipe = stage1_recipe or spec.recipe
    changes: dict[str, Any] = {}
    if spec.protocol == "base2new" and getattr(stage1_cfg.method_cfg, "transductive", False):
        # As a plain base2new run of that method: the unlabelled images of all classes, its recipe's shots.
        changes = {"train_subsample": "all", "shots": stage1_cfg.data.shots, "transductive": True}
    leaf = shots_label(changes["shots"]) if "shots" in changes else None
    stage1_spec = replace(
        spec,
        method=stage1_cfg.method,
        recipe=recipe,
        run_dir=stage1_run_dir(spec, stage1_cfg.method, recipe, leaf),
        prompt_from=None,
        **changes,
    )
    state = "reusing the finished run" if stage1_spec.finished else "training"
    log(f"stage 1 ({stage1_cfg.method}, {recipe}): {state} in {stage1_spec.run_dir}")
    execute(stage1_spec, stage1_cfg, options)
    return {"stage1_dir": stage1_spec.run_dir}


def execute(spec: RunSpec, cfg: RunConfig, options: RunOptions | None = None) -> RunOutcome:
    """Run one spec unless its results.json exists. The run folder is locked while it runs (`.lock`): a
    folder held by another running process raises `RunBusyError`; a lock left by a dead process is taken over.

    Started by torchrun with several processes, the spec runs data-parallel (see `_execute_in_group`)."""
    options = options or RunOptions()
    group = init_data_parallel(resolve_device(cfg.device))
    if group is not None:
        return _execute_in_group(spec, cfg, options, group)
    return _execute_one(spec, cfg, options)


def _execute_one(spec: RunSpec, cfg: RunConfig, options: RunOptions) -> RunOutcome:
    if spec.finished:
        return RunOutcome(spec, "skipped", read_results(spec.results_path))
    lock = RunLock(spec.run_dir)
    try:
        acquired = lock.acquire()
    except RunLockError as err:
        raise RunError(str(err)) from None
    if not acquired:
        raise RunBusyError(lock.busy_message())
    try:
        if spec.finished:  # finished by another sweep between the first look and the lock
            return RunOutcome(spec, "skipped", read_results(spec.results_path))
        return _execute_locked(spec, cfg, options, lock)
    finally:
        lock.release()


# Data-parallel runs (torchrun): rank 0 runs a spec exactly as a single process does (the lock, the log,
# every file); the other ranks follow its decision to run or skip it, train and evaluate their shares, and
# write nothing. Rank 0 tells them once it starts the work, so every rank makes the same collective calls.
_ANNOUNCED: set[Path] = set()


def _announce_run(spec: RunSpec) -> None:
    group = current_data_parallel()
    if group is not None and group.is_main:
        group.broadcast_object("run")
        _ANNOUNCED.add(spec.run_dir)


def _execute_in_group(spec: RunSpec, cfg: RunConfig, options: RunOptions, group: DataParallel) -> RunOutcome:
    if not group.is_main:
        return _follow_main_rank(spec, cfg, options, group)
    try:
        outcome = _execute_one(spec, cfg, options)
    except Exception as err:
        if spec.run_dir not in _ANNOUNCED:  # the other ranks still wait for a decision
            group.broadcast_object("busy" if isinstance(err, RunBusyError) else "failed")
        _ANNOUNCED.discard(spec.run_dir)
        raise
    if spec.run_dir in _ANNOUNCED:
        _ANNOUNCED.discard(spec.run_dir)
        group.barrier()  # results.json and the prompt exist before any rank moves on
    else:
        group.broadcast_object("skip")
    return outcome


def _follow_main_rank(spec: RunSpec, cfg: RunConfig, options: RunOptions, group: DataParallel) -> RunOutcome:
    decision = group.broadcast_object(None)
    if decision == "skip":
        return RunOutcome(spec, "skipped")
    if decision == "busy":
        raise RunBusyError(f"{spec.run_dir}: rank 0 found this run folder locked by another process")
    if decision != "run":
        raise RunError(f"{spec.run_dir}: rank 0 stopped before the run started; its log.txt says why")
    started = time.perf_counter()
    run_cfg = spec_config(cfg, spec)
    with RunLog(None, echo=False) as log:
        _execute(spec, run_cfg, config_hash(run_cfg), options, log)
    group.barrier()
    return RunOutcome(spec, "done", seconds=round(time.perf_counter() - started, 3))


def read_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: not a readable results file ({err}); delete it to run that spec again") from None


def _execute_locked(spec: RunSpec, cfg: RunConfig, options: RunOptions, lock: RunLock) -> RunOutcome:
    started = time.perf_counter()
    run_cfg = spec_config(cfg, spec)
    text = config_text(run_cfg)
    fingerprint = config_hash(run_cfg)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec.run_dir / CONFIG_FILE, text)
    with RunLog(spec.run_dir / "log.txt", echo=options.echo) as log:
        log(f"== {spec.describe()}")
        log(f"run folder: {spec.run_dir}")
        if lock.took_over is not None:
            log(f"took over the lock left by {lock.took_over.describe()}, which is no longer running")
        for folder in (spec.run_dir, spec.run_dir / "checkpoints", spec.run_dir / PROMPT_DIR):
            remove_stale_temporaries(folder)  # half-written files of a killed attempt; the folder is ours now
        try:
            with _library_messages_to(log):
                results = _execute(spec, run_cfg, fingerprint, options, log)
        except Exception as err:
            log.to_file(f"run failed: {type(err).__name__}: {err}")
            raise
        atomic_write_json(spec.results_path, results, fault="mid_results")
        log(f"results: {spec.results_path}")
    return RunOutcome(spec, "done", results, seconds=round(time.perf_counter() - started, 3))


def _execute(
    spec: RunSpec, cfg: RunConfig, fingerprint: str, options: RunOptions, log: Callable[[str], None]
) -> dict[str, Any]:
    _announce_run(spec)
    check_dataset_options(cfg, [spec.dataset, *(t.dataset for t in spec.targets)])
    device = resolve_device(cfg.device)
    group = current_data_parallel()
    if group is not None:
        device = group.device  # cuda:LOCAL_RANK on GPUs
    reused = reusable_prompt(spec, fingerprint)
    # Every image the run will read is checked before any training (this run's or a stage 1's).
    datasets = DatasetCache(cfg)
    source = datasets.get(spec.dataset)
    splits = training_splits(source, spec, options)
    splits, skipped = screen_run_images(spec, cfg, datasets, splits, log)
    extras = prepare_stage1(spec, cfg, options, log) if reused is None and cfg.plugins else {}
    seed_everything(spec.seed)
    clip = load_backbone(cfg, device)
    data_selection = None
    if spec.ratio is not None:
        splits, data_selection = select_training_data(clip, splits, spec, cfg, device)
        log(f"selected {data_selection['kept']} of {data_selection['pool']} training images ({spec.selector})")
    classes = f"{spec.train_subsample} classes: {len(splits.classnames)}"
    log(f"training data: {spec.dataset} ({classes}), {len(splits.train)} images")

    if reused is not None:
        learner = PromptModel.from_pretrained(clip, reused, classnames=splits.classnames).to(device)
        train_info: dict[str, Any] = {
            "epochs": 0,
            "steps": 0,
            "seconds": 0.0,
            "final_loss": None,
            "reused_from": str(reused.parent),
        }
        log(f"evaluating the prompt trained in {reused.parent} (same configuration); nothing to train")
    else:
        extras["full_splits"] = subsample_classes(source, spec.train_subsample)  # before the few-shot draw
        learner = build_learner(clip, cfg, splits, spec.seed, spec.run_dir, extras).to(device)
        log(_parameter_line(learner))
        train_info = _train(learner, splits, spec, cfg, clip, device, fingerprint, options, log)
        if "stage1_dir" in extras:
            train_info["stage1_run"] = str(extras["stage1_dir"])
    if is_main_process():
        learner.save_pretrained(spec.run_dir / PROMPT_DIR)

    metrics = MetricsFile(spec.run_dir / METRICS_FILE)
    evaluations: dict[str, Any] = {}
    for target in spec.targets:
        set_eval_subset(learner, eval_subset_of(spec, target))
        counts = evaluate_target(
            learner, target, datasets, cfg, clip, device, options.progress, image_features=options.image_features
        )
        entry = {"dataset": target.dataset, "subsample": target.subsample, "split": target.split, **counts.to_dict()}
        evaluations[target.key] = entry
        if is_main_process():
            metrics.append(
                {
                    "eval": target.key,
                    "dataset": target.dataset,
                    "subsample": target.subsample,
                    "split": target.split,
                    "accuracy": entry["accuracy"],
                    "macro_accuracy": entry["macro_accuracy"],
                    "samples": counts.num_samples,
                }
            )
        log(
            f"{target.key}: {target.dataset} [{target.subsample}, {target.split}] accuracy {counts.accuracy:.2f}% "
            f"({counts.num_correct}/{counts.num_samples}), macro {counts.macro_accuracy:.2f}%"
        )
    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "protocol": spec.protocol,
        "dataset": spec.dataset,
        "method": spec.method,
        "recipe": spec.recipe,
        "shots": spec.shots,
        "seed": spec.seed,
        "transductive": spec.transductive or bool(getattr(learner, "transductive", False)),
        "config_hash": fingerprint,
        "backbone": {"arch": clip.config.name, "weights_sha256": clip.weights_sha256},
        "evaluations": evaluations,
        "train": train_info,
        "selection": {"policy": "last_epoch"},
        "promptclip_version": __version__,
    }
    if data_selection is not None:
        results["ratio"], results["selector"] = spec.ratio, spec.selector
        results["data_selection"] = data_selection
    if skipped:
        results["skipped_images"] = skipped
    return results


def screen_run_images(
    spec: RunSpec, cfg: RunConfig, datasets: DatasetCache, splits: DatasetSplits, log: Callable[[str], None]
) -> tuple[DatasetSplits, dict[str, list[str]]]:
    """Check every image the run will read, before it starts: the drawn training images and each evaluation
    split. With `data.on_bad_image error` a problem stops the run with the list of files; with `skip` those
    images are left out. Returns the training splits and {"<dataset>/<split>": ["path: problem", ...]} of
    the images left out (empty when none)."""
    what = f"training images of {spec.dataset}"
    kept, bad = screen_images(splits, splits.train, what, cfg.data.on_bad_image)
    skipped: dict[str, list[str]] = {f"{spec.dataset}/training": bad}
    if bad:
        splits = splits.replace(train=kept)
    for target in spec.targets:
        datasets.screen(target.dataset, target.split, skipped)
    skipped = {key: lines for key, lines in skipped.items() if lines}
    for key, lines in skipped.items():
        shown = "; ".join(lines[:5]) + (f"; ... ({len(lines) - 5} more)" if len(lines) > 5 else "")
        log(f"left out {len(lines)} unusable images of {key} (data.on_bad_image skip): {shown}")
    return splits, skipped


@contextlib.contextmanager
def _library_messages_to(log: RunLog) -> Iterator[None]:
    """Route the library's warnings (e.g. classes with fewer images than shots) into the run's log."""

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log(f"{record.levelname.lower()}: {record.getMessage()}")

    logger = logging.getLogger("promptclip")
    handler = Forward(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _parameter_line(learner: PromptModel) -> str:
    trainable, total = learner.num_parameters()
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def _train(
    learner: PromptModel,
    splits: DatasetSplits,
    spec: RunSpec,
    cfg: RunConfig,
    clip: CLIP,
    device: torch.device,
    fingerprint: str,
    options: RunOptions,
    log: Callable[[str], None],
) -> dict[str, Any]:
    if not learner.trainable_parameters():
        log(f"{learner.name} has no trainable parameters: nothing to train")
        return {"epochs": 0, "steps": 0, "seconds": 0.0, "final_loss": None}
    # A learner that reads foreground masks (DAPT-S) gets the dataset's: mask files on disk are found and
    # checked with the learner's mask settings (a missing mask stops here, listed); synthetic data bring theirs.
    masks = bool(getattr(learner, "needs_masks", False))
    if masks and not splits.has_masks:
        from promptclip.data.masks import attach_masks, check_mask_files

        splits = attach_masks(splits, getattr(learner, "mask_config", None))
        check_mask_files(splits)  # unreadable masks, masks of another shape, an encoding that empties them
        log(f"masks: {splits.info.get('masks', 'attached')}")
    loader = train_loader(splits, cfg, clip, spec.seed, device, masks)
    group = current_data_parallel()
    if group is not None:  # each rank takes its share of every batch
        loader = group.shard_train_loader(loader)
    trainer = Trainer(
        learner,
        loader,
        cfg.optim,
        run_dir=spec.run_dir,
        device=device,
        precision=cfg.model.precision,
        progress=options.progress,
        tensorboard=options.tensorboard,
        log=log,
        fingerprint=fingerprint,
        callbacks=options.callbacks,
        data_parallel=group,
    )
    result = trainer.fit(resume=options.resume)
    info = {"epochs": result.epochs, "steps": result.steps, "seconds": result.seconds, "final_loss": result.final_loss}
    if result.resumed_from_epoch is not None:
        info["resumed_from_epoch"] = result.resumed_from_epoch
    return info


def single_run_spec(cfg: RunConfig, recipe: str, runs_dir: str | Path, run_dir: str | Path | None = None) -> RunSpec:
    """The spec of `promptclip train`: one run on `cfg.data` (its dataset, shots, class subset), evaluated
    on the test split of the classes it trained on, and on the new half too when it trained on the base half."""
    from promptclip.protocols.spec import run_dir_for, shots_label

    subset = cfg.data.subsample
    dataset = cfg.data.dataset
    targets: tuple[EvalTarget, ...]
    if subset == "all":
        protocol, targets = "few_shot", (EvalTarget("all", dataset, "all", "test"),)
    elif subset == "base":
        protocol = "base2new"
        targets = (EvalTarget("base", dataset, "base", "test"), EvalTarget("new", dataset, "new", "test"))
    else:
        protocol, targets = "base2new", (EvalTarget("new", dataset, "new", "test"),)
    leaf = shots_label(cfg.data.shots)
    folder = (
        Path(run_dir)
        if run_dir is not None
        else run_dir_for(Path(runs_dir), protocol, dataset, cfg.method, recipe, leaf, cfg.seed)
    )
    return RunSpec(
        protocol=protocol,
        dataset=dataset,
        method=cfg.method,
        recipe=recipe,
        seed=cfg.seed,
        shots=cfg.data.shots,
        train_subsample=subset,
        targets=targets,
        run_dir=folder,
    )


# ---------------------------------------------------------------------------------------------------------
# A sweep
# ---------------------------------------------------------------------------------------------------------


def run_specs(
    specs: Sequence[RunSpec],
    cfg: RunConfig,
    options: RunOptions | None = None,
    keep_going: bool = False,
    report: Callable[[str], None] = print,
) -> list[RunOutcome]:
    """Execute `specs` in order, skipping finished ones and ones another running process holds (another
    sweep over the same runs folder: status "busy"); with `keep_going`, a failed run is reported and the
    sweep goes on."""
    if not is_main_process():
        report = _quiet  # rank 0 reports for the group
    outcomes = []
    for number, spec in enumerate(specs, 1):
        prefix = f"[{number}/{len(specs)}]"
        if spec.finished and not launched_with_torchrun():  # ranks take rank 0's word for it (execute)
            report(f"{prefix} done already, skipped: {spec.run_dir}")
            outcomes.append(RunOutcome(spec, "skipped"))
            continue
        try:
            outcome = execute(spec, cfg, options)
        except RunBusyError as err:
            report(f"{prefix} in progress elsewhere, skipped: {err}")
            outcomes.append(RunOutcome(spec, "busy", error=str(err)))
            continue
        except Exception as err:
            if not keep_going or current_data_parallel() is not None:  # ranks must not drift apart
                raise
            report(f"{prefix} FAILED {spec.run_dir}: {type(err).__name__}: {err}")
            outcomes.append(RunOutcome(spec, "failed", error=f"{type(err).__name__}: {err}"))
            continue
        outcomes.append(outcome)
        if outcome.status == "skipped":
            report(f"{prefix} finished meanwhile by another process, skipped: {spec.run_dir}")
            continue
        summary = ", ".join(
            f"{k} {v['accuracy']:.2f}" for k, v in (outcome.results or {}).get("evaluations", {}).items()
        )
        report(f"{prefix} finished {spec.run_dir} ({outcome.seconds:.1f}s): {summary}")
    return outcomes


def _quiet(message: str) -> None:
    """A report that says nothing (ranks other than 0)."""
