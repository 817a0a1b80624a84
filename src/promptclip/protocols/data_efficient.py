"""Data-efficient tuning: keep a ratio of every class's training images, chosen by a selector, then train.

The pool is the whole training split (no few-shot draw). Selectors that need them get the image features
and logits of zero-shot CLIP (the dataset's template) on the training images, evaluated without
augmentation; the choice is seeded by the run's seed. Specs are dataset x ratio x selector x seed; the run
folder uses `ratio<r>-<selector>`. The evaluation is the full test split, all classes.
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
    ratio_label,
    sweep_spec,
)

NAME = "data_efficient"
# The ratios of DAPT's data-efficient script; uniform (class-balanced random) is its default selector.
DEFAULT_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
DEFAULT_SELECTORS = ("uniform",)


def check_selectors(names: list[str]) -> list[str]:
    from promptclip.data import selection  # noqa: F401  (fills SELECTORS)
    from promptclip.registry import SELECTORS

    unknown = [name for name in names if name not in SELECTORS]
    if unknown:
        raise ProtocolError(f"--selectors: unknown {', '.join(unknown)}; choose from {', '.join(SELECTORS)}")
    return names


def expand(cfg: RunConfig, sweep: Sweep) -> list[RunSpec]:
    ratios = list(sweep.ratios) if sweep.ratios else list(DEFAULT_RATIOS)
    if any(not 0.0 < r <= 1.0 for r in ratios):
        raise ProtocolError(f"--ratios: each ratio is a fraction in (0, 1], got {ratios}")
    selectors = check_selectors(list(sweep.selectors) if sweep.selectors else list(DEFAULT_SELECTORS))
    if sweep.shots:
        raise ProtocolError("--shots: data-efficient runs select from the whole training split; use --ratios")
    specs = []
    for dataset in check_datasets(sweep.datasets):
        for ratio in ratios:
            for selector in selectors:
                for seed in check_seeds(sweep.seeds):
                    specs.append(
                        sweep_spec(
                            NAME,
                            cfg,
                            sweep,
                            dataset,
                            ratio_label(ratio, selector),
                            seed,
                            shots=0,
                            train_subsample="all",
                            targets=(EvalTarget("all", dataset, "all", "test"),),
                            ratio=ratio,
                            selector=selector,
                        )
                    )
    return specs
