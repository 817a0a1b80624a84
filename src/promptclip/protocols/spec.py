"""Run specifications: what one run trains and evaluates, and where it writes.

A protocol turns a `RunConfig` and the sweep arguments (`Sweep`) into a list of `RunSpec`s, in a fixed order,
so `--shard i/n` picks the same runs on every machine. Each spec names its training set (dataset, class
subset, shots or selection ratio, seed), every evaluation target with its class subset spelled out, and the
run folder `<runs>/<protocol>/<dataset>/<method>/<recipe>/shots<k>/seed<s>/` (data-efficient runs use
`ratio<r>-<selector>` in place of `shots<k>`). A spec whose `results.json` exists is finished.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from promptclip.config import RunConfig

Subset = Literal["all", "base", "new"]
RESULTS_FILE = "results.json"

PROTOCOL_MODULES = {
    "few_shot": "promptclip.protocols.few_shot",
    "base2new": "promptclip.protocols.base2new",
    "cross_dataset": "promptclip.protocols.cross_dataset",
    "domain_generalization": "promptclip.protocols.domain_generalization",
    "data_efficient": "promptclip.protocols.data_efficient",
}
PROTOCOL_NAMES = tuple(PROTOCOL_MODULES)

DEFAULT_SEEDS = (1, 2, 3)

# The field's transfer benchmarks: the ten targets of cross-dataset transfer (ImageNet is the source) and the
# four ImageNet variants of domain generalisation.
CROSS_DATASET_TARGETS = (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


class ProtocolError(ValueError):
    """A sweep that cannot be expanded; the message names the argument and the fix."""


@dataclass(frozen=True)
class EvalTarget:
    """One evaluation of a run: `key` in results.json, the dataset, its class subset and split."""

    key: str
    dataset: str
    subsample: Subset = "all"
    split: Literal["train", "val", "test"] = "test"


@dataclass(frozen=True)
class RunSpec:
    protocol: str
    dataset: str
    method: str
    recipe: str
    seed: int
    shots: int
    train_subsample: Subset
    targets: tuple[EvalTarget, ...]
    run_dir: Path
    ratio: float | None = None
    selector: str | None = None
    transductive: bool = False
    prompt_from: Path | None = None
    """A run folder whose trained prompt this run evaluates instead of training its own (domain
    generalisation evaluates the cross-dataset ImageNet prompts, as the field does), when it is finished."""

    @property
    def results_path(self) -> Path:
        return self.run_dir / RESULTS_FILE

    @property
    def finished(self) -> bool:
        return self.results_path.is_file()

    def describe(self) -> str:
        amount = f"ratio {self.ratio:g} {self.selector}" if self.ratio is not None else f"{shots_label(self.shots)}"
        targets = ", ".join(t.key for t in self.targets)
        return f"{self.protocol} {self.dataset} {self.method}/{self.recipe} {amount} seed {self.seed} -> {targets}"


@dataclass
class Sweep:
    """The sweep arguments of `promptclip run`; None means the protocol's default."""

    datasets: Sequence[str]
    seeds: Sequence[int] = DEFAULT_SEEDS
    shots: Sequence[int] | None = None
    targets: Sequence[str] | None = None
    ratios: Sequence[float] | None = None
    selectors: Sequence[str] | None = None
    runs_dir: Path = field(default_factory=lambda: Path("runs"))
    recipe: str = "default"


def shots_label(shots: int) -> str:
    return f"shots{shots}" if shots >= 1 else "shotsall"


def ratio_label(ratio: float, selector: str) -> str:
    return f"ratio{ratio:g}-{selector}"


def run_dir_for(runs_dir: Path, protocol: str, dataset: str, method: str, recipe: str, leaf: str, seed: int) -> Path:
    return Path(runs_dir) / protocol / dataset / method / recipe / leaf / f"seed{seed}"


def sweep_spec(
    protocol: str,
    cfg: RunConfig,
    sweep: Sweep,
    dataset: str,
    leaf: str,
    seed: int,
    **fields: Any,
) -> RunSpec:
    """A spec of `sweep` for one dataset, setting (`leaf`: shots or ratio folder) and seed, in its run folder."""
    return RunSpec(
        protocol=protocol,
        dataset=dataset,
        method=cfg.method,
        recipe=sweep.recipe,
        seed=seed,
        run_dir=run_dir_for(sweep.runs_dir, protocol, dataset, cfg.method, sweep.recipe, leaf, seed),
        **fields,
    )


def get_protocol(name: str) -> Callable[[RunConfig, Sweep], list[RunSpec]]:
    """The `expand(cfg, sweep)` function of protocol `name`."""
    if name not in PROTOCOL_MODULES:
        raise ProtocolError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOL_NAMES)}")
    return importlib.import_module(PROTOCOL_MODULES[name]).expand  # type: ignore[no-any-return]


def expand(protocol: str, cfg: RunConfig, sweep: Sweep) -> list[RunSpec]:
    specs = get_protocol(protocol)(cfg, sweep)
    if not specs:
        raise ProtocolError(f"{protocol}: the sweep is empty (no datasets or seeds given)")
    return specs


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` -> (i, n), with 0 <= i < n (0-based: shards 0/4, 1/4, 2/4, 3/4 cover a sweep)."""
    index_text, sep, count_text = text.partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise ProtocolError(
            f"--shard {text!r}: expected i/n with 0 <= i < n (0-based), e.g. --shard 0/4 ... --shard 3/4"
        )
    return index, count


def take_shard(specs: Sequence[RunSpec], index: int, count: int) -> list[RunSpec]:
    """Every `count`-th spec starting at `index`: the shards of one sweep are disjoint and cover it."""
    return list(specs[index::count])


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ProtocolError("--seeds: give at least one seed, e.g. --seeds 1,2,3")
    if any(seed < 0 for seed in seeds):
        raise ProtocolError(f"--seeds: seeds are non-negative integers, got {seeds}")
    return seeds


def check_datasets(datasets: Sequence[str], what: str = "--datasets") -> list[str]:
    from promptclip.data.datasets import DatasetError, make_builder

    datasets = [d for d in datasets if d]
    if not datasets:
        raise ProtocolError(f"{what}: give at least one dataset (see `promptclip list datasets`)")
    for name in datasets:
        try:
            make_builder(name)
        except DatasetError as err:
            raise ProtocolError(f"{what}: {err}") from None
    return datasets
