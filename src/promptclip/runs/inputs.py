"""What a run reads: the device, the datasets (each read once), the training draw, the backbone, the loaders,
and the check of every image before any work starts."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch

from promptclip.clip.model import CLIP
from promptclip.clip.vocabulary import NameVocabulary, name_vocabulary
from promptclip.config import RunConfig
from promptclip.data.datasets import DatasetSplits, build_dataset
from promptclip.data.datasets.base import SplitName
from promptclip.data.datasets.check import screen_images
from promptclip.data.fewshot import fewshot_splits, subsample_classes
from promptclip.data.loader import build_loader, training_augmentation
from promptclip.protocols.spec import EvalTarget, RunSpec, dataset_options
from promptclip.runs.errors import RunError

IN_MEMORY_MAX_IMAGES = 2000  # decode small (few-shot) training sets once instead of every epoch
RANDOM_BACKBONE_SEED = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RunError(
            f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N (--device, or --opts device)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} was asked for but CUDA is not available; use --opts device cpu")
    return device


# -- datasets --------------------------------------------------------------------------------------------------
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


def image_data_key(cfg: RunConfig, target: EvalTarget) -> tuple[str, ...]:
    """What names the images of `target` beyond their paths: the dataset, its root, options and split."""
    options = json.dumps(dataset_options(cfg, target.dataset), sort_keys=True, default=str)
    return (target.dataset, str(cfg.data.root), options, target.split)


def training_splits(source: DatasetSplits, spec: RunSpec, fewshot_cache_dir: Any = None) -> DatasetSplits:
    """The spec's training data: the K-shot draw of its seed (K < 1: every image), then its class subset.

    The draw comes first, over all classes, then the cut: the field's order, so base and new runs share it.
    """
    splits = fewshot_splits(source, spec.shots, spec.seed, cache_dir=fewshot_cache_dir) if spec.shots >= 1 else source
    return subsample_classes(splits, spec.train_subsample)


def screen_run_images(
    spec: RunSpec,
    cfg: RunConfig,
    datasets: DatasetCache,
    splits: DatasetSplits,
    log: Callable[[str], None],
    validation: bool = False,
) -> tuple[DatasetSplits, dict[str, list[str]]]:
    """Check every image the run will read, before it starts: the drawn training images (and the validation
    draw with `validation`: a learner chooses its hyper-parameters on it) and each evaluation split. With
    `data.on_bad_image error` a problem stops the run with the list of files; with `skip` those images are left
    out. Returns the training splits and {"<dataset>/<split>": ["path: problem", ...]} of the images left out
    (empty when none)."""
    what = f"training images of {spec.dataset}"
    kept, bad = screen_images(splits, splits.train, what, cfg.data.on_bad_image)
    skipped: dict[str, list[str]] = {f"{spec.dataset}/training": bad}
    if bad:
        splits = splits.replace(train=kept)
    if validation:
        kept, bad = screen_images(splits, splits.val, f"validation images of {spec.dataset}", cfg.data.on_bad_image)
        skipped[f"{spec.dataset}/validation"] = bad
        if bad:
            splits = splits.replace(val=kept)
    for target in spec.targets:
        datasets.screen(target.dataset, target.split, skipped)
    skipped = {key: lines for key, lines in skipped.items() if lines}
    for key, lines in skipped.items():
        shown = "; ".join(lines[:5]) + (f"; ... ({len(lines) - 5} more)" if len(lines) > 5 else "")
        log(f"left out {len(lines)} unusable images of {key} (data.on_bad_image skip): {shown}")
    return splits, skipped


def with_masks(splits: DatasetSplits, mask_config: Any, log: Callable[[str], None]) -> DatasetSplits:
    """Training splits carrying foreground masks (`RunNeeds.masks`): mask files on disk are found and checked
    with the learner's mask settings (a missing or unusable mask stops here, listed; empty and full masks are
    counted and refused beyond the setting's limit, or given its fallback); synthetic data bring their own."""
    if splits.has_masks:
        return splits
    from promptclip.data.masks import attach_masks, screen_masks

    splits, summary = screen_masks(attach_masks(splits, mask_config))
    log(f"masks: {splits.info.get('masks', 'attached')}; {summary.describe()}")
    return splits


def check_class_counts(spec: RunSpec, splits: DatasetSplits, datasets: DatasetCache) -> None:
    """Every class subset the run trains or evaluates holds at least two classes (a base or new half of a
    dataset of three classes or fewer does not): on one class any classifier scores 100%."""
    from promptclip.data.fewshot import base_new_labels

    source = datasets.get(spec.dataset)
    if source.num_classes < 2:
        where = f" in {source.root}" if source.root is not None else ""
        found = f"only the class {source.classnames[0]!r}" if source.classnames else "no class"
        raise RunError(
            f"the {source.display_name} data{where} hold {found}; a classifier needs at least 2 classes (with one it "
            "is right on every image, and its accuracy says nothing). Add the images of another class (for "
            "--dataset folder, another sub-folder)"
        )
    if len(splits.classnames) < 2:
        raise RunError(
            f"the {spec.train_subsample} classes of {source.display_name} ({source.num_classes} classes) are "
            f"{len(splits.classnames)}; a classifier needs at least 2. Train on all classes (--subsample all), or "
            "use a dataset with at least 4 classes for base and new halves"
        )
    for target in spec.targets:
        total = datasets.get(target.dataset).num_classes
        count = len(base_new_labels(total, target.subsample))
        if count < 2:
            raise RunError(
                f"evaluation {target.key}: the {target.subsample} classes of {target.dataset} ({total} classes) are "
                f"{count}; on one class every prediction is right. Evaluate on all classes, or use a dataset with "
                "at least 4 classes for base and new halves"
            )


# Cosine similarity above which two class prompts count as the same text (CLIP text features in float32).
TIED_COSINE = 1.0 - 1e-6


def tied_class_names(clip: CLIP, classnames: list[str], template: str) -> list[list[str]]:
    """Groups of class names whose zero-shot prompts (`template`) get identical, or near-identical (cosine
    above `TIED_COSINE`), text features from `clip`: one text encoding of the class names. Names outside the
    backbone's vocabulary (zero embeddings in the bundled tiny CLIP) tie this way."""
    from promptclip.methods.prompting import encode_templates

    if len(classnames) < 2:
        return []
    try:
        features = encode_templates(clip, classnames, template)
    except ValueError:
        return []  # a prompt too long for the context: the learner says so with its fix
    similar = (features @ features.T) > TIED_COSINE
    groups: list[list[str]] = []
    seen: set[int] = set()
    for label in range(len(classnames)):
        if label in seen:
            continue
        members = [other for other in similar[label].nonzero().flatten().tolist() if other not in seen]
        seen.update(members)
        if len(members) > 1:
            groups.append([classnames[other] for other in members])
    return groups


# What to do about class names a backbone does not know, for the warnings below.
RENAME_ADVICE = (
    "Use a backbone that knows these words, or give the classes names it knows (a class-name file: "
    "--classnames FILE; in a run, --opts data.options.classnames FILE)"
)


def class_vocabulary_message(vocabulary: NameVocabulary, count: int, where: str, arch: str) -> str:
    """The warning about the class names of `where` (`count` in all) that backbone `arch` lacks words for or
    cannot tell apart (`name_vocabulary`), and what to do."""
    parts = []
    unknown = vocabulary.unknown_words
    if unknown:
        shown = ", ".join(f"{name!r} ({' '.join(words)})" for name, words in list(unknown.items())[:10])
        more = f", and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        parts.append(
            f"backbone {arch} never learned words of {len(unknown)} of the {count} class names of {where} (their "
            f"token embeddings are all zero): {shown}{more}."
        )
    if vocabulary.identical:
        groups = "; ".join(" = ".join(repr(name) for name in group) for group in vocabulary.identical[:10])
        parts.append(
            f"{len(vocabulary.tied)} of the {count} class names of {where} cannot be told apart by backbone {arch} "
            f"under any prompt, learned or written (their token embeddings are identical): {groups}. Each group "
            "gets one text feature: its classes score the same on every image, and the classifier cannot tell them "
            "apart."
        )
    return " ".join([*parts, RENAME_ADVICE])


def warn_class_vocabulary(clip: CLIP, splits: DatasetSplits, arch: str) -> NameVocabulary:
    """Warn (the `promptclip` logger) when the class names hold words the backbone never learned or names it
    cannot tell apart; returns what `name_vocabulary` found."""
    vocabulary = name_vocabulary(clip, splits.classnames)
    if vocabulary:
        message = class_vocabulary_message(vocabulary, len(splits.classnames), splits.display_name, arch)
        logging.getLogger("promptclip.runs").warning("%s", message)
    return vocabulary


def warn_tied_class_names(clip: CLIP, splits: DatasetSplits, arch: str) -> list[list[str]]:
    """Warn (the `promptclip` logger: the run's log and the terminal) about class names holding words the
    backbone never learned (`warn_class_vocabulary`) and about those it cannot tell apart
    (`tied_class_names`); returns the tied groups."""
    warn_class_vocabulary(clip, splits, arch)
    groups = tied_class_names(clip, splits.classnames, splits.template)
    if groups:
        shown = "; ".join(" = ".join(repr(name) for name in group) for group in groups[:10])
        more = f"; and {len(groups) - 10} more groups" if len(groups) > 10 else ""
        count = sum(len(group) for group in groups)
        logging.getLogger("promptclip.runs").warning(
            "%d of the %d class names of %s get identical text features from backbone %s (prompt %r): %s%s. Its "
            "vocabulary does not tell these names apart (a word it never learned has no meaning to it; the bundled "
            "tiny-synthetic knows only the synthetic world's words), so their prompts start out as one class. %s",
            count,
            len(splits.classnames),
            splits.display_name,
            arch,
            splits.template,
            shown,
            more,
            RENAME_ADVICE,
        )
    return groups


# -- the backbone and the loaders ---------------------------------------------------------------------------------
def load_backbone(cfg: RunConfig, device: torch.device, allow_torchscript: bool = False) -> CLIP:
    """The frozen CLIP of `cfg.model`. Random weights (tests, smoke runs) are drawn from a fixed seed, apart
    from the global generators, so every run seed sees the same backbone. `allow_torchscript`: the command
    line named the weights path (`--opts model.weights`), so it may be a TorchScript archive; a path from a
    recipe never opens one."""
    from promptclip.clip.weights import RANDOM_WEIGHTS, load_clip

    if cfg.model.weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            return load_clip(cfg.model.arch, cfg.model.weights, device=device)
    return load_clip(cfg.model.arch, cfg.model.weights, device=device, allow_torchscript=allow_torchscript)


def train_loader(
    splits: DatasetSplits, cfg: RunConfig, clip: CLIP, seed: int, device: torch.device, masks: bool
) -> Any:
    augmentation = training_augmentation(cfg.data)
    return build_loader(
        splits,
        "train",
        batch_size=cfg.data.batch_size,
        image_size=clip.image_size,
        seed=seed,
        num_workers=cfg.data.num_workers,
        with_masks=masks,
        in_memory=len(splits.train) <= IN_MEMORY_MAX_IMAGES,
        augment=augmentation.random_crops,
        scale=augmentation.scale,
        flip_p=augmentation.flip_p,
        **device_options(cfg, device),
    )


def eval_loader(splits: DatasetSplits, split: str, cfg: RunConfig, clip: CLIP, device: torch.device) -> Any:
    return build_loader(
        splits,
        split,  # type: ignore[arg-type]
        batch_size=cfg.data.eval_batch_size,
        train=False,
        image_size=clip.image_size,
        num_workers=cfg.data.num_workers,
        **device_options(cfg, device),
    )


def device_options(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """Where batches go and what of the pixel work is left to the device (see `build_loader`); the crops of
    evaluation kept in the process's shared cache within `data.crop_cache_mb`."""
    from promptclip.data.crop_cache import SHARED_CROP_CACHE

    SHARED_CROP_CACHE.max_bytes = cfg.data.crop_cache_mb * 2**20
    pixels = "decoded" if cfg.data.crop_on_device and device.type == "cuda" else "auto"
    return {"device": device, "pixels": pixels, "crop_cache": SHARED_CROP_CACHE if cfg.data.crop_cache_mb else None}
