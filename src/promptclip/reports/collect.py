"""Read the `results.json` files of runs folders and group them by protocol, setting, series and dataset.

Files are read through `promptclip.runs.results`, the one schema that runs write. Every number comes from the
integer per-class counts a run stored, never from a rounded accuracy: micro accuracy = sum(correct) /
sum(total), macro accuracy = the mean of the per-class accuracies. Seeds are summarised as mean ± population
standard deviation (ddof 0, as the field's result parser does), with the 95% interval 1.96 · std / sqrt(n) as
an option.

A *series* is what one row group (long tables) or column group (wide tables) shows: a method, split by recipe
only when one dataset and setting were run with several recipes, and split by *variant* when one dataset and
setting hold runs of several identities (another learning rate, class-specific contexts, another backbone, ...).
Variants are labelled by the identity keys that tell them apart (`coop (optim.lr=0.5)`); keys that only differ
between seeds or shot counts never split a series. No result is dropped: the only results counted once are the
same run found twice (equal `run_id`, e.g. a copied folder), and that is noted.

A file that cannot be read is reported with its path and skipped, so one broken run never hides the others.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from promptclip.runs.identity import SHORT
from promptclip.runs.results import REPLACED_MARK, RESULTS_FILE, Evaluation, ResultFileError, RunResults, read_results

Metric = Literal["accuracy", "macro_accuracy"]
METRICS: tuple[Metric, ...] = ("accuracy", "macro_accuracy")
ZEROSHOT = "zeroshot"

# A stored accuracy further than this from the one its counts give is reported (the counts are used).
_ACCURACY_TOLERANCE = 0.01
_SHOTS_FOLDER = re.compile(r"^shots(?P<shots>-?\d+)$")
_RATIO_FOLDER = re.compile(r"^ratio(?P<ratio>[0-9.eE+-]+?)-(?P<selector>.+)$")


def metric_value(evaluation: Evaluation, name: Metric) -> float:
    return evaluation.accuracy if name == "accuracy" else evaluation.macro_accuracy


# -- one run -----------------------------------------------------------------------------------------------
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
class Backbone:
    """The CLIP a run used, as its results.json recorded it."""

    arch: str
    weights_sha256: str | None
    recorded: bool = True
    """False when the file names no backbone (older files)."""
    weights_recorded: bool = True
    """False when the file names the arch but not the weights' sha256."""

    @classmethod
    def of(cls, results: RunResults) -> Backbone:
        recorded, identity = results.backbone, results.identity
        arch = recorded.get("arch") or identity.get("backbone.arch")
        if not arch:
            return cls("", None, recorded=False, weights_recorded=False)
        if "weights_sha256" in recorded:
            sha = recorded["weights_sha256"]
        elif "backbone.weights_sha256" in identity:
            sha = identity["backbone.weights_sha256"]
        else:
            return cls(str(arch), None, weights_recorded=False)
        return cls(str(arch), str(sha) if sha else None)

    @property
    def weights(self) -> str:
        """The first 8 hex digits of the weights' sha256, `random` for random weights."""
        if not self.weights_recorded:
            return "weights not recorded"
        return self.weights_sha256[:SHORT] if self.weights_sha256 else "random"

    @property
    def label(self) -> str:
        return f"{self.arch} ({self.weights})" if self.recorded else "backbone not recorded"


@dataclass(frozen=True)
class RunResult:
    """One run's results as a report uses them: the typed results, where they were found, and the setting."""

    results: RunResults
    path: Path
    root: Path
    """The runs folder the file was found under."""
    setting: Setting

    @property
    def protocol(self) -> str:
        return self.results.protocol

    @property
    def dataset(self) -> str:
        return self.results.dataset

    @property
    def method(self) -> str:
        return self.results.method

    @property
    def recipe(self) -> str:
        return self.results.recipe

    @property
    def seed(self) -> int:
        return self.results.seed

    @property
    def transductive(self) -> bool:
        return self.results.transductive

    @property
    def evaluations(self) -> Mapping[str, Evaluation]:
        return self.results.evaluations

    @property
    def identity(self) -> Mapping[str, Any]:
        return self.results.identity

    @property
    def run_id(self) -> str:
        return self.results.run_id

    @property
    def backbone(self) -> Backbone:
        return Backbone.of(self.results)

    @property
    def recipe_folder(self) -> str:
        """The recipe folder's name (`<recipe>` or a variant's `<recipe>-<fingerprint>`) in the runs layout
        `<recipe>/<setting>/seed<s>/results.json`."""
        parents = self.path.parents
        return parents[2].name if len(parents) > 2 else self.recipe

    @property
    def relative_folder(self) -> Path:
        folder = self.path.parent
        return folder.relative_to(self.root) if folder.is_relative_to(self.root) else folder


@dataclass(frozen=True)
class Problem:
    """A file that was skipped (`skipped`) or used with a caveat."""

    path: Path
    message: str
    skipped: bool = True

    def __str__(self) -> str:
        action = "skipped" if self.skipped else "note"
        return f"{action}: {self.path}: {self.message}"


# -- reading -------------------------------------------------------------------------------------------------
def find_result_files(runs_dir: str | Path) -> list[Path]:
    return sorted(Path(runs_dir).rglob(RESULTS_FILE))


def _setting_of(results: RunResults, path: Path) -> Setting:
    """The setting from the file's fields, else from its folder name (`shots16`, `ratio0.1-random`)."""
    if results.ratio is not None:
        return Setting(ratio=results.ratio, selector=results.selector)
    folder = path.parent.parent.name
    if match := _RATIO_FOLDER.match(folder):
        try:
            return Setting(ratio=float(match["ratio"]), selector=match["selector"])
        except ValueError:
            pass
    if results.shots is not None:
        return Setting(shots=results.shots)
    if match := _SHOTS_FOLDER.match(folder):
        return Setting(shots=int(match["shots"]))
    raise ResultFileError(
        "no training setting: give an integer 'shots' (or 'ratio' and 'selector'), "
        "or keep the file under a shots<k>/ or ratio<r>-<selector>/ folder"
    )


def _stored_accuracy_notes(path: Path, results: RunResults) -> list[str]:
    """Stored accuracies that disagree with the counts (a hand-edited file); the counts are what is used."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8")).get("evaluations", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    notes = []
    for key, evaluation in results.evaluations.items():
        value = stored.get(key, {}).get("accuracy") if isinstance(stored.get(key), Mapping) else None
        if isinstance(value, int | float) and abs(value - evaluation.accuracy) > _ACCURACY_TOLERANCE:
            notes.append(
                f"evaluations.{key}.accuracy is {value} but its counts give {evaluation.accuracy:.4f}; "
                "the counts are used"
            )
    return notes


def read_result(path: str | Path, root: str | Path | None = None) -> tuple[RunResult, list[str]]:
    """Read one results.json (`ResultFileError` names what is wrong); returns the run and notes about
    stored fields that disagree with its counts."""
    path = Path(path)
    results = read_results(path)
    run = RunResult(results, path, Path(root) if root is not None else path.parent, _setting_of(results, path))
    return run, _stored_accuracy_notes(path, results)


@dataclass
class Collection:
    runs: list[RunResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)


def _replaced(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts if path.is_relative_to(root) else path.parts
    return any(REPLACED_MARK in part for part in parts)


def collect_runs(runs_dirs: str | Path | Sequence[str | Path]) -> Collection:
    """Every valid results.json under the runs folder(s); the others become `problems` (never an exception).

    A file found twice (folders given twice, or one inside another) is read once; runs in folders that
    `--overwrite` moved aside (`*.replaced-<time>`) are left out."""
    roots = [Path(runs_dirs)] if isinstance(runs_dirs, str | Path) else [Path(p) for p in runs_dirs]
    collection = Collection(roots=roots)
    seen: dict[Path, Path] = {}
    for root in roots:
        for path in find_result_files(root):
            resolved = path.resolve()
            if resolved in seen:
                message = f"the same file as {seen[resolved]} (found under two runs folders); counted once"
                collection.problems.append(Problem(path, message, skipped=False))
                continue
            seen[resolved] = path
            if _replaced(path, root):
                message = "in a folder moved aside by --overwrite (a replaced run); not used"
                collection.problems.append(Problem(path, message))
                continue
            try:
                run, notes = read_result(path, root)
            except ResultFileError as err:
                collection.problems.append(Problem(path, _problem_text(err)))
                continue
            collection.runs.append(run)
            collection.problems.extend(Problem(path, note, skipped=False) for note in notes)
    return collection


def _problem_text(err: ResultFileError) -> str:
    text = str(err)
    if "not valid JSON" in text and "move it aside" not in text:
        text += ": the file is damaged; move it aside and run the same command again, which redoes that run"
    return text


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
    """One evaluation of one series on one dataset, summarised over its seeds."""

    stat: Stat
    per_seed: Mapping[int, float]
    missing_seeds: tuple[int, ...]
    transductive: bool
    classes: int = 0
    """Number of classes of the evaluation (chance accuracy is 100 / classes)."""

    @property
    def mean(self) -> float:
        return self.stat.mean


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
