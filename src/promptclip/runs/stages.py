"""Runs that must finish before another starts (`RunNeeds.stage1`, e.g. DPC's stage 1), for any plug-in.

A stage is an ordinary run: its own spec (this run's protocol, dataset, seed and evaluation targets; its own
method and recipe), its own identity and folder, reused when finished. Where a plain run of it would live
(`<runs>/<protocol>/<dataset>/<method>/<recipe>/...`) is where it lives; a run whose folder was chosen by hand
keeps its stage in `<run folder>/stage1`.
"""

from __future__ import annotations

from dataclasses import replace

from promptclip.config import RunConfig
from promptclip.factory import run_needs
from promptclip.methods.base import StagePlan
from promptclip.protocols.spec import RunSpec, run_dir_for
from promptclip.runs.rundir import STAGE1_DIR


def stage_spec(spec: RunSpec, plan: StagePlan) -> tuple[RunSpec, RunConfig]:
    """The spec and config of the stage `plan` describes, for the run `spec`."""
    stage_cfg: RunConfig = plan.config
    recipe = plan.recipe or spec.recipe
    stage = replace(spec, method=stage_cfg.method, recipe=recipe, prompt_from=None)
    if spec.protocol == "base2new" and run_needs(stage_cfg).transductive:
        # As a plain base2new run of that method: the unlabelled images of all classes, its recipe's shots.
        stage = replace(stage, train_subsample="all", shots=stage_cfg.data.shots, transductive=True)
    if spec.runs_root is None:
        folder = spec.run_dir / STAGE1_DIR
    else:
        dataset = spec.folder_dataset
        folder = run_dir_for(spec.runs_root, spec.protocol, dataset, stage.method, recipe, stage.leaf, spec.seed)
    stage = replace(stage, run_dir=folder)
    return stage, stage_cfg
