"""Run specifications: what one run trains and evaluates, and where it writes.

A protocol turns a `RunConfig` and the sweep arguments (`Sweep`) into a list of `RunSpec`s, in a fixed order,
so `--shard i/n` picks the same runs on every machine. Each spec names its training set (dataset, class
subset, shots or selection ratio, seed), every evaluation target with its class subset spelled out, and its
place `<runs>/<protocol>/<dataset>/<method>/<recipe>/shots<k>/seed<s>/` (data-efficient runs use
`ratio<r>-<selector>` in place of `shots<k>`). Whether a spec is finished, and which variant folder of the
recipe it takes, depends on its identity: see `promptclip.runs`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from promptclip.config import RunConfig

Subset = Literal["all", "base", "new"]

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
    """Where the run whose trained prompt this run evaluates instead of training its own would live (domain
    generalisation evaluates the cross-dataset ImageNet prompts, as the field does); used when a finished run
    there (or in a variant folder beside it) was trained exactly as this one would be."""
    runs_root: Path | None = None
    """The sweep's runs folder: `run_dir` is this spec's place in it, and another variant of the recipe goes
    to `<recipe>-<fingerprint>` beside it. None: `run_dir` was chosen by hand and is used as it is."""
    dataset_name: str | None = None
    """The dataset's name in folders and reports when it is not `dataset` (an own dataset's `--name`)."""

    @property
    def folder_dataset(self) -> str:
        return self.dataset_name or self.dataset

    @property
    def leaf(self) -> str:
        """The setting's folder name: `shots16`, `ratio0.1-uniform`."""
        return ratio_label(self.ratio, self.selector or "") if self.ratio is not None else shots_label(self.shots)

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
    name = dataset_folder_name(cfg, dataset)
    return RunSpec(
        protocol=protocol,
        dataset=dataset,
        method=cfg.method,
        recipe=sweep.recipe,
        seed=seed,
        run_dir=run_dir_for(sweep.runs_dir, protocol, name, cfg.method, sweep.recipe, leaf, seed),
        runs_root=Path(sweep.runs_dir),
        dataset_name=name if name != dataset else None,
        **fields,
    )


def dataset_folder_name(cfg: RunConfig, dataset: str) -> str:
    """The name `dataset` goes by in run folders and reports: its own for the field's datasets, the user's
    `--name` (default: the data folder's name) for own folder/CSV datasets."""
    from promptclip.data.datasets.base import dataset_display_name

    return dataset_display_name(dataset, cfg.data.root, dataset_options(cfg, dataset))


def dataset_options(cfg: RunConfig, dataset: str) -> dict[str, Any]:
    """Options for `dataset`: `data.options` entries it accepts, then `data.options.<dataset>` overrides.

    A run touches several datasets (cross-dataset targets); a shared option applies to every dataset that
    has it, and an option no dataset of the run accepts is an error raised by `check_dataset_options`.
    """
    options = cfg.data.options or {}
    per_dataset = options.get(dataset)
    shared = {k: v for k, v in options.items() if not isinstance(v, Mapping)}
    from promptclip.data.datasets.base import builder_options, make_builder

    accepted = builder_options(type(make_builder(dataset)))
    chosen = {k: v for k, v in shared.items() if k in accepted}
    if isinstance(per_dataset, Mapping):
        chosen.update(per_dataset)
    return chosen


def check_dataset_options(cfg: RunConfig, datasets: Sequence[str]) -> None:
    options = cfg.data.options or {}
    shared = [k for k, v in options.items() if not isinstance(v, Mapping)]
    from promptclip.data.datasets.base import builder_options, make_builder

    accepted: set[str] = set()
    for name in datasets:
        accepted |= set(builder_options(type(make_builder(name))))
    unused = [k for k in shared if k not in accepted]
    if unused:
        raise ProtocolError(
            f"data.options: {', '.join(unused)} is not an option of {', '.join(sorted(set(datasets)))}; "
            "see `promptclip data info --dataset NAME` for each dataset's options"
        )


def single_run_spec(cfg: RunConfig, recipe: str, runs_dir: str | Path, run_dir: str | Path | None = None) -> RunSpec:
    """The spec of `promptclip train`: one run on `cfg.data` (its dataset, shots, class subset), evaluated
    on the test split of the classes it trained on, and on the new half too when it trained on the base half.
    `run_dir` (`--output`) is used as it is; without it the run takes its place under `runs_dir`."""
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
    sweep = Sweep(datasets=[dataset], runs_dir=Path(runs_dir), recipe=recipe)
    spec = sweep_spec(
        protocol,
        cfg,
        sweep,
        dataset,
        shots_label(cfg.data.shots),
        cfg.seed,
        shots=cfg.data.shots,
        train_subsample=subset,
        targets=targets,
    )
    if run_dir is not None:
        spec = dataclasses.replace(spec, run_dir=Path(run_dir), runs_root=None)
    return spec


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
