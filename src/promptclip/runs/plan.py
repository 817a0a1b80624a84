"""Planning a run before any work: its configuration, needs, identity, stage 1, and the folder it takes.

A plan reads files but writes none, so `run --dry-run` shows exactly what a sweep would do.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from promptclip.config import RunConfig, replace, to_dict
from promptclip.factory import run_needs
from promptclip.methods.base import RunNeeds
from promptclip.protocols.spec import RunSpec, dataset_options
from promptclip.runs.identity import RunIdentity, run_identity
from promptclip.runs.rundir import PROMPT_DIR, RunDir, RunState, locate_recipe_folder
from promptclip.runs.stages import stage_spec


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    cfg: RunConfig
    """The configuration with the spec's dataset, shots, class subset and seed filled in."""
    needs: RunNeeds
    identity: RunIdentity
    run_dir: RunDir
    stage1: PlannedRun | None = None

    def state(self) -> RunState:
        return self.run_dir.state(self.identity)

    @property
    def finished(self) -> bool:
        return self.state() is RunState.FINISHED

    @property
    def sweep_folder(self) -> bool:
        """True when the folder follows the sweep layout (a variant folder may be chosen), False when it was
        chosen by hand."""
        return self.spec.runs_root is not None


def spec_config(cfg: RunConfig, spec: RunSpec) -> RunConfig:
    """`cfg` with the spec's dataset, shots, class subset and seed filled in."""
    data = replace(cfg.data, dataset=spec.dataset, shots=spec.shots, subsample=spec.train_subsample)
    return replace(cfg, data=data, seed=spec.seed)


def config_text(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def plan_run(spec: RunSpec, cfg: RunConfig) -> PlannedRun:
    run_cfg = spec_config(cfg, spec)
    needs = run_needs(run_cfg)
    stage1 = plan_run(*stage_spec(spec, needs.stage1)) if needs.stage1 is not None else None
    identity = run_identity(
        run_cfg,
        protocol=spec.protocol,
        targets=[
            {"key": t.key, "dataset": t.dataset, "subsample": t.subsample, "split": t.split} for t in spec.targets
        ],
        dataset_name=spec.folder_dataset,
        datasets=datasets_identity(run_cfg, [spec.dataset]),
        target_datasets=datasets_identity(run_cfg, [t.dataset for t in spec.targets if t.dataset != spec.dataset]),
        backbone=backbone_identity(run_cfg),
        ratio=spec.ratio,
        selector=spec.selector,
        stage1=stage1.identity if stage1 is not None else None,
        learner=needs.identity,
    )
    if spec.runs_root is None:
        folder = spec.run_dir
    else:
        recipe_dir = spec.run_dir.parents[1]
        folder = locate_recipe_folder(recipe_dir, identity) / spec.run_dir.parent.name / spec.run_dir.name
    return PlannedRun(spec, run_cfg, needs, identity, RunDir(folder), stage1)


def reusable_prompt(planned: PlannedRun) -> Path | None:
    """The prompt of a finished run that was trained exactly as this one would be (same identity but for the
    protocol and evaluation targets) at `spec.prompt_from` or in a variant folder beside it."""
    spec = planned.spec
    if spec.prompt_from is None:
        return None
    recipe_dir = spec.prompt_from.parents[1]
    leaf = Path(spec.prompt_from.parent.name) / spec.prompt_from.name
    candidates = sorted(recipe_dir.parent.glob(f"{recipe_dir.name}*")) if recipe_dir.parent.is_dir() else []
    for folder in candidates:
        if folder.name != recipe_dir.name and not folder.name.startswith(f"{recipe_dir.name}-"):
            continue
        run = RunDir(folder / leaf)
        recorded = run.recorded_identity() if run.finished else None
        if recorded is not None and RunIdentity(recorded).training_id == planned.identity.training_id:
            prompt = run.path / PROMPT_DIR
            return prompt if prompt.is_dir() else None
    return None


def datasets_identity(cfg: RunConfig, datasets: list[str]) -> dict[str, dict[str, Any]]:
    """The root-independent identity of each dataset a run reads (see `data.datasets.dataset_identity`)."""
    from promptclip.data.datasets.base import dataset_identity

    return {name: dataset_identity(name, cfg.data.root, dataset_options(cfg, name)) for name in dict.fromkeys(datasets)}


# -- the backbone's part of the identity -------------------------------------------------------------------------
def backbone_identity(cfg: RunConfig) -> dict[str, Any]:
    """`arch` and `weights_sha256` of the backbone `cfg.model` names, found before loading it (the weights
    are hashed once per file and process; None for random weights, drawn from a fixed seed)."""
    from promptclip.clip.weights import RANDOM_WEIGHTS, arch_config, canonical_name, weights_files

    arch = canonical_name(cfg.model.arch) or cfg.model.arch
    if arch.endswith(".json"):
        arch = arch_config(arch).name  # an architecture file: read (and checked) now, before any work
    if cfg.model.weights == RANDOM_WEIGHTS:
        return {"arch": arch, "weights_sha256": None}
    files = weights_files(cfg.model.arch, cfg.model.weights)
    return {"arch": arch, "weights_sha256": _hash_files(tuple((str(p), *_stamp(p)) for p in files))}


def _stamp(path: Path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    from promptclip.io import sha256_files

    return sha256_files([name for name, _, _ in files])
