"""Base-to-novel generalisation: train on the base half of the classes, evaluate on base and on new.

Shots: `--shots`, else the recipe's `data.shots` (16 in every base-to-novel recipe, as in the field).
The field's rule: K = 16 shots are drawn over all classes first, then the classes are cut (labels sorted,
base = the first ceil(n/2), new = the rest; each half relabelled from 0). The learner is trained with the
base class names (a transductive method such as PromptKD: on the unlabelled images of all classes) and
tested on the base test split; then its class names are switched to the new half
(`set_classnames`) and it is tested on the new test split. Per dataset the harmonic mean is
H = 2BN/(B+N) of the seed means; the average row is H of the averaged B and N.
"""

from __future__ import annotations

from promptclip.config import RunConfig
from promptclip.factory import run_needs
from promptclip.protocols.spec import (
    EvalTarget,
    ProtocolError,
    RunSpec,
    Sweep,
    check_datasets,
    check_seeds,
    shots_label,
    sweep_spec,
)

NAME = "base2new"


def expand(cfg: RunConfig, sweep: Sweep) -> list[RunSpec]:
    shots_list = list(sweep.shots) if sweep.shots else [cfg.data.shots]
    # A transductive method (PromptKD) trains on the unlabelled training images of all classes, as published;
    # its runs are marked so that reports keep them apart from the inductive ones.
    needs = run_needs(cfg)
    transductive = needs.transductive
    # A plug-in that tunes a finished stage-1 run (DPC) trains on the labelled base images itself: only its
    # stage 1 sees all classes, and the run stays marked transductive.
    all_classes = transductive and needs.stage1 is None
    if sweep.targets:
        raise ProtocolError("--targets: base2new evaluates the base and new halves of each dataset itself")
    specs = []
    for dataset in check_datasets(sweep.datasets):
        for shots in shots_list:
            for seed in check_seeds(sweep.seeds):
                specs.append(
                    sweep_spec(
                        NAME,
                        cfg,
                        sweep,
                        dataset,
                        shots_label(shots),
                        seed,
                        shots=shots,
                        train_subsample="all" if all_classes else "base",
                        transductive=transductive,
                        targets=(
                            EvalTarget("base", dataset, "base", "test"),
                            EvalTarget("new", dataset, "new", "test"),
                        ),
                    )
                )
    return specs
