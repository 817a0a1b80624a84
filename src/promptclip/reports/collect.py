"""Read the `results.json` files of a runs folder and summarise them over seeds.

Every number comes from the integer per-class counts a run stored, never from a rounded accuracy: micro
accuracy = sum(correct) / sum(total), macro accuracy = the mean of the per-class accuracies. Seeds are
summarised as mean ± population standard deviation (ddof 0, as the field's result parser does), with the
95% interval 1.96 · std / sqrt(n) as an option.

A file that cannot be read is reported with its path and skipped, so one broken run never hides the others.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1
Metric = Literal["accuracy", "macro_accuracy"]
METRICS: tuple[Metric, ...] = ("accuracy", "macro_accuracy")

# A stored accuracy further than this from the one its counts give is reported (the counts are used).
_ACCURACY_TOLERANCE = 0.01
_SHOTS_FOLDER = re.compile(r"^shots(?P<shots>-?\d+)$")
_RATIO_FOLDER = re.compile(r"^ratio(?P<ratio>[0-9.eE+-]+?)-(?P<selector>.+)$")


class ResultFileError(ValueError):
    """A results.json that cannot be used; the message names the field and the fix."""


# -- one run -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Counts:
    """Per-class correct / total counts of one evaluation."""

    correct: tuple[int, ...]
    total: tuple[int, ...]

    @property
    def accuracy(self) -> float:
        """Micro accuracy in percent: every test image weighs the same."""
        return 100.0 * sum(self.correct) / sum(self.total)

    @property
    def macro_accuracy(self) -> float:
        """Mean per-class accuracy in percent, over the classes that have test images."""
        rates = [c / t for c, t in zip(self.correct, self.total, strict=True) if t > 0]
        return 100.0 * math.fsum(rates) / len(rates)

    def metric(self, name: Metric) -> float:
        return self.accuracy if name == "accuracy" else self.macro_accuracy


@dataclass(frozen=True)
class Setting:
    """The training-data setting of a run: `shots` per class, or a `ratio` of the data chosen by `selector`."""

    shots: int | None = None
    ratio: float | None = None
    selector: str | None = None

    @property
    def sort_key(self) -> tuple[Any, ...]:
        if self.ratio is None:
            return (0, "", self.shots if self.shots is not None and self.shots > 0 else math.inf)
        return (1, self.selector or "", self.ratio)

    @property
    def slug(self) -> str:
        """Folder-style name, also used in file names: `shots16`, `ratio0.1-random`."""
        if self.ratio is not None:
            return f"ratio{self.ratio:g}-{self.selector}"
        return f"shots{self.shots}"

    @property
    def label(self) -> str:
        if self.ratio is not None:
            return f"{self.selector} {self.ratio:g}"
        if self.shots is None or self.shots <= 0:
            return "all images"
        return f"{self.shots} shot" + ("" if self.shots == 1 else "s")


@dataclass(frozen=True)
class RunResult:
    path: Path
    protocol: str
    dataset: str
    method: str
    recipe: str
    setting: Setting
    seed: int
    transductive: bool
    evaluations: Mapping[str, Counts]
    backbone: str = ""


@dataclass(frozen=True)
class Problem:
    """A file that was skipped (`skipped`) or used with a caveat."""

    path: Path
    message: str
    skipped: bool = True

    def __str__(self) -> str:
        action = "skipped" if self.skipped else "note"
        return f"{action}: {self.path}: {self.message}"


# -- reading and validating ----------------------------------------------------------------------------------
def find_result_files(runs_dir: str | Path) -> list[Path]:
    return sorted(Path(runs_dir).rglob(RESULTS_FILE))


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in data:
        raise ResultFileError(f"missing field {key!r} ({what})")
    value = data[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ResultFileError(f"field {key!r} should be {what}, got {value!r}")
    return value


def _int_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ResultFileError(f"{where} should be a list of integers (per-class counts)")
    if any(v < 0 for v in value):
        raise ResultFileError(f"{where} has a negative count")
    return tuple(value)


def parse_counts(entry: Any, where: str) -> Counts:
    if not isinstance(entry, Mapping):
        raise ResultFileError(f"{where} should be an object with 'correct' and 'total' lists")
    correct = _int_list(entry.get("correct"), f"{where}.correct")
    total = _int_list(entry.get("total"), f"{where}.total")
    if len(correct) != len(total):
        raise ResultFileError(f"{where}: 'correct' has {len(correct)} classes but 'total' has {len(total)}")
    if any(c > t for c, t in zip(correct, total, strict=True)):
        raise ResultFileError(f"{where}: a class has more correct predictions than test images")
    if sum(total) == 0:
        raise ResultFileError(f"{where}: no test images (every 'total' is 0)")
    return Counts(correct, total)


def _setting_from(data: Mapping[str, Any], path: Path) -> Setting:
    """The setting from the file's fields, else from its folder name (`shots16`, `ratio0.1-random`)."""
    folder = path.parent.parent.name
    ratio, selector = data.get("ratio"), data.get("selector")
    if ratio is not None or selector is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not isinstance(selector, str):
            raise ResultFileError("fields 'ratio' (a number) and 'selector' (a name) must be given together")
        return Setting(ratio=float(ratio), selector=selector)
    if match := _RATIO_FOLDER.match(folder):
        try:
            return Setting(ratio=float(match["ratio"]), selector=match["selector"])
        except ValueError:
            pass
    shots = data.get("shots")
    if isinstance(shots, int) and not isinstance(shots, bool):
        return Setting(shots=shots)
    if match := _SHOTS_FOLDER.match(folder):
        return Setting(shots=int(match["shots"]))
    raise ResultFileError(
        "no training setting: give an integer 'shots' (or 'ratio' and 'selector'), "
        "or keep the file under a shots<k>/ or ratio<r>-<selector>/ folder"
    )


def _check_stored_accuracy(entry: Mapping[str, Any], counts: Counts, where: str) -> str | None:
    stored = entry.get("accuracy")
    if isinstance(stored, int | float) and abs(stored - counts.accuracy) > _ACCURACY_TOLERANCE:
        return f"{where}.accuracy is {stored} but its counts give {counts.accuracy:.4f}; the counts are used"
    return None


def read_result(path: str | Path) -> tuple[RunResult, list[str]]:
    """Read and validate one results.json; returns the run and notes about fields that disagree."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ResultFileError(f"cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise ResultFileError(f"is not valid JSON ({err}); the run was cut short: run it again") from None
    if not isinstance(data, Mapping):
        raise ResultFileError("should hold a JSON object")
    schema = _require(data, "schema", int, "the format version, an integer")
    if schema != SCHEMA_VERSION:
        raise ResultFileError(f"schema {schema} is not the one this promptclip reads ({SCHEMA_VERSION})")
    evaluations = _require(data, "evaluations", Mapping, "an object of evaluations")
    if not evaluations:
        raise ResultFileError("field 'evaluations' is empty: the run finished no evaluation")
    counts: dict[str, Counts] = {}
    notes: list[str] = []
    for key, entry in evaluations.items():
        counts[key] = parse_counts(entry, f"evaluations.{key}")
        if note := _check_stored_accuracy(entry, counts[key], f"evaluations.{key}"):
            notes.append(note)
    transductive = data.get("transductive", False)
    if not isinstance(transductive, bool):
        raise ResultFileError(f"field 'transductive' should be true or false, got {transductive!r}")
    backbone = data.get("backbone")
    run = RunResult(
        path=path,
        protocol=_require(data, "protocol", str, "the protocol name"),
        dataset=_require(data, "dataset", str, "the dataset name"),
        method=_require(data, "method", str, "the method name"),
        recipe=_require(data, "recipe", str, "the recipe name"),
        setting=_setting_from(data, path),
        seed=_require(data, "seed", int, "the seed, an integer"),
        transductive=transductive,
        evaluations=counts,
        backbone=str(backbone.get("arch", "")) if isinstance(backbone, Mapping) else "",
    )
    return run, notes


@dataclass
class Collection:
    runs: list[RunResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def collect_runs(runs_dir: str | Path) -> Collection:
    """Every valid results.json under `runs_dir`; the others become `problems` (never an exception)."""
    collection = Collection()
    for path in find_result_files(runs_dir):
        try:
            run, notes = read_result(path)
        except ResultFileError as err:
            collection.problems.append(Problem(path, str(err)))
            continue
        collection.runs.append(run)
        collection.problems.extend(Problem(path, note, skipped=False) for note in notes)
    return collection


# -- statistics over seeds -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    """Population standard deviation (ddof 0)."""
    n: int

    @property
    def ci95(self) -> float:
        return 1.96 * self.std / math.sqrt(self.n)


def summarize(values: Sequence[float]) -> Stat:
    if not values:
        raise ValueError("no values to summarise")
    mean = math.fsum(values) / len(values)
    variance = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return Stat(mean, math.sqrt(variance), len(values))


def harmonic_mean(base: float, new: float) -> float:
    """H = 2BN / (B + N), the field's summary of base and new accuracy."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


@dataclass(frozen=True)
class Measurement:
    """One evaluation of one method on one dataset, summarised over its seeds."""

    stat: Stat
    per_seed: Mapping[int, float]
    missing_seeds: tuple[int, ...]
    transductive: bool

    @property
    def mean(self) -> float:
        return self.stat.mean


# -- grouping --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One column group of a table: a method, split by recipe only when the method used several recipes for
    the same dataset and setting."""

    method: str
    recipe: str | None = None

    @property
    def label(self) -> str:
        return self.method if self.recipe is None else f"{self.method}/{self.recipe}"


@dataclass(frozen=True)
class CellKey:
    protocol: str
    setting: Setting
    series: Series
    dataset: str


def assign_series(runs: Iterable[RunResult]) -> dict[Path, Series]:
    """A method is one series unless some (protocol, setting, dataset) of it was run with several recipes."""
    runs = list(runs)
    recipes: dict[tuple[str, str, Setting, str], set[str]] = defaultdict(set)
    for run in runs:
        recipes[(run.protocol, run.method, run.setting, run.dataset)].add(run.recipe)
    split = {(protocol, method) for (protocol, method, _, _), names in recipes.items() if len(names) > 1}
    return {run.path: Series(run.method, run.recipe if (run.protocol, run.method) in split else None) for run in runs}


class ResultIndex:
    """Runs grouped by (protocol, setting, series, dataset) and seed, with the seed set each cell should have."""

    def __init__(self, runs: Iterable[RunResult]) -> None:
        self.problems: list[Problem] = []
        runs = sorted(runs, key=lambda r: str(r.path))
        series_of = assign_series(runs)
        self.cells: dict[CellKey, dict[int, RunResult]] = defaultdict(dict)
        for run in runs:
            key = CellKey(run.protocol, run.setting, series_of[run.path], run.dataset)
            seeds = self.cells[key]
            if run.seed in seeds:
                first = seeds[run.seed].path
                self.problems.append(Problem(run.path, f"same run and seed as {first}; that one is used"))
                continue
            seeds[run.seed] = run
        self._seeds: dict[str, tuple[int, ...]] = {}
        for key, seeds in self.cells.items():
            self._seeds[key.protocol] = tuple(sorted({*self._seeds.get(key.protocol, ()), *seeds}))
        self._check_backbones()

    def _check_backbones(self) -> None:
        for key, seeds in self.cells.items():
            arches = sorted({run.backbone for run in seeds.values() if run.backbone})
            if len(arches) > 1:
                path = next(iter(seeds.values())).path.parent.parent
                message = f"{key.series.label} on {key.dataset} mixes backbones {', '.join(arches)} across seeds"
                self.problems.append(Problem(path, message, skipped=False))

    def protocols(self) -> list[str]:
        return sorted({key.protocol for key in self.cells})

    def settings(self, protocol: str) -> list[Setting]:
        found = {key.setting for key in self.cells if key.protocol == protocol}
        return sorted(found, key=lambda s: s.sort_key)

    def series(self, protocol: str, settings: Iterable[Setting] | None = None) -> list[Series]:
        wanted = None if settings is None else set(settings)
        found = {
            key.series for key in self.cells if key.protocol == protocol and (wanted is None or key.setting in wanted)
        }
        return sorted(found, key=lambda s: (s.method, s.recipe or ""))

    def datasets(self, protocol: str, settings: Iterable[Setting] | None = None) -> list[str]:
        wanted = None if settings is None else set(settings)
        found = {
            key.dataset for key in self.cells if key.protocol == protocol and (wanted is None or key.setting in wanted)
        }
        return sort_datasets(found)

    def expected_seeds(self, protocol: str) -> tuple[int, ...]:
        """Every seed seen anywhere in the protocol: a cell without one of them is marked as missing it."""
        return self._seeds.get(protocol, ())

    def runs(self, key: CellKey) -> Mapping[int, RunResult]:
        return self.cells.get(key, {})

    def recipes(self, protocol: str, series: Series) -> list[str]:
        return sorted(
            {
                run.recipe
                for key, seeds in self.cells.items()
                if key.protocol == protocol and key.series == series
                for run in seeds.values()
            }
        )

    def evaluation_keys(self, protocol: str, setting: Setting, dataset: str | None = None) -> list[str]:
        return sorted(
            {
                name
                for key, seeds in self.cells.items()
                if key.protocol == protocol and key.setting == setting and dataset in (None, key.dataset)
                for run in seeds.values()
                for name in run.evaluations
            }
        )

    def measure(self, key: CellKey, evaluation: str, metric: Metric = "accuracy") -> Measurement | None:
        """Mean ± std over the seeds of one cell that have `evaluation`; None when no seed has it."""
        runs = {seed: run for seed, run in self.runs(key).items() if evaluation in run.evaluations}
        if not runs:
            return None
        per_seed = {seed: run.evaluations[evaluation].metric(metric) for seed, run in sorted(runs.items())}
        missing = tuple(seed for seed in self.expected_seeds(key.protocol) if seed not in runs)
        return Measurement(
            stat=summarize(list(per_seed.values())),
            per_seed=per_seed,
            missing_seeds=missing,
            transductive=any(run.transductive for run in runs.values()),
        )


# -- dataset names -------------------------------------------------------------------------------------------
# The order and names the papers use; other datasets follow in alphabetical order under their own name.
DATASET_LABELS: dict[str, str] = {
    "imagenet": "ImageNet",
    "caltech101": "Caltech101",
    "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars",
    "oxford_flowers": "Flowers102",
    "food101": "Food101",
    "fgvc_aircraft": "FGVCAircraft",
    "sun397": "SUN397",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "ucf101": "UCF101",
    "imagenetv2": "ImageNet-V2",
    "imagenet_sketch": "ImageNet-Sketch",
    "imagenet_a": "ImageNet-A",
    "imagenet_r": "ImageNet-R",
}


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def sort_datasets(names: Iterable[str]) -> list[str]:
    order = {name: i for i, name in enumerate(DATASET_LABELS)}
    return sorted(set(names), key=lambda n: (order.get(n, len(order)), n))
