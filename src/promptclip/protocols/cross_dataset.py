"""Cross-dataset transfer: train on a source (ImageNet, all classes, 16 shots) and evaluate the same prompt
on the full test split of every target dataset, with that target's class names.

Results hold "source" (the source test split) and one entry per target. The field reports per-target
accuracy and the mean over the ten targets. Shots: `--shots`, else the recipe's `data.shots` (16 in the field).
"""

from __future__ import annotations

from promptclip.config import RunConfig
from promptclip.protocols.spec import (
    CROSS_DATASET_TARGETS,
    RunSpec,
    Sweep,
    check_datasets,
    check_seeds,
    run_dir_for,
    shots_label,
    sweep_spec,
)
from promptclip.protocols.spec import EvalTarget as Target

NAME = "cross_dataset"
DEFAULT_SOURCES = ("imagenet",)


def transfer_specs(
    name: str,
    cfg: RunConfig,
    sweep: Sweep,
    default_targets: tuple[str, ...],
    prompt_from_protocol: str | None = None,
) -> list[RunSpec]:
    """Specs of a transfer protocol: train on each source, evaluate the source and every target."""
    sources = check_datasets(sweep.datasets or DEFAULT_SOURCES)
    targets = check_datasets(sweep.targets or default_targets, what="--targets")
    shots_list = list(sweep.shots) if sweep.shots else [cfg.data.shots]
    specs = []
    for source in sources:
        evaluations = (Target("source", source, "all", "test"), *(Target(t, t) for t in targets if t != source))
        for shots in shots_list:
            for seed in check_seeds(sweep.seeds):
                leaf = shots_label(shots)
                shared = None
                if prompt_from_protocol is not None:
                    shared = run_dir_for(
                        sweep.runs_dir, prompt_from_protocol, source, cfg.method, sweep.recipe, leaf, seed
                    )
                specs.append(
                    sweep_spec(
                        name,
                        cfg,
                        sweep,
                        source,
                        leaf,
                        seed,
                        shots=shots,
                        train_subsample="all",
                        targets=evaluations,
                        prompt_from=shared,
                    )
                )
    return specs


def expand(cfg: RunConfig, sweep: Sweep) -> list[RunSpec]:
    return transfer_specs(NAME, cfg, sweep, CROSS_DATASET_TARGETS)
