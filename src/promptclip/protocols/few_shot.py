"""Few-shot classification: train on K images per class (all classes) and test on the full test split.

The field sweeps K in 1, 2, 4, 8, 16 with seeds 1, 2, 3 and reports the mean over seeds per dataset and over
the 11 datasets. The K-shot draw is seeded by the run's seed (see `promptclip.data.fewshot`).
"""

from __future__ import annotations

from promptclip.config import RunConfig
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

NAME = "few_shot"
DEFAULT_SHOTS = (1, 2, 4, 8, 16)


def expand(cfg: RunConfig, sweep: Sweep) -> list[RunSpec]:
    shots_list = list(sweep.shots) if sweep.shots else list(DEFAULT_SHOTS)
    if any(k < 1 for k in shots_list):
        raise ProtocolError(f"--shots: few-shot runs need K >= 1 images per class, got {shots_list}")
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
                        train_subsample="all",
                        targets=(EvalTarget("all", dataset, "all", "test"),),
                    )
                )
    return specs
