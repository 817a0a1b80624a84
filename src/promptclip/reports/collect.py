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
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from promptclip.runs.identity import SHORT, RunIdentity, differing_keys, fingerprint, variant_label
from promptclip.runs.results import Evaluation, ResultFileError, RunResults, read_results

RESULTS_FILE = "results.json"
REPLACED_MARK = ".replaced-"
"""`RunDir.move_aside` renames a folder `<name>.replaced-<time>`: runs in such folders were replaced."""
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


# -- series: methods, recipes and variants ---------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One row group (long tables) or column group (wide tables): a method, split by recipe only when the
    method used several recipes for the same dataset and setting, and by variant when one dataset and setting
    hold runs of several identities (`variant` holds the values that tell them apart, `detail` shows them)."""

    method: str
    recipe: str | None = None
    variant: tuple[tuple[str, str], ...] = ()
    detail: str = ""

    @property
    def label(self) -> str:
        name = self.method if self.recipe is None else f"{self.method}/{self.recipe}"
        return f"{name} ({self.detail})" if self.detail else name

    @property
    def sort_key(self) -> tuple[str, str, str]:
        return (self.method, self.recipe or "", self.detail)


# Identity keys that repeat another key's difference: left out of a label when the other key differs too and
# the label still tells every variant apart. (`model.*` is what was asked for, `backbone.*` what was used.)
_MIRRORS: dict[str, tuple[str, ...]] = {
    "model.arch": ("backbone.arch",),
    "model.weights": ("backbone.weights_sha256", "backbone.arch"),
    "backbone.weights_sha256": ("backbone.arch",),
}
# Keys whose value comes with the dataset and protocol: they label a variant only where they split a cell
# (two own datasets shown under one name), else every dataset would become a series of its own.
_DATASET_BOUND = frozenset({"data.dataset", "targets", "protocol"})
_MISSING = "\0missing"


def _bound(key: str) -> bool:
    return key.removeprefix("stage1.") in _DATASET_BOUND


def _variant_values(run: RunResult) -> dict[str, Any]:
    return RunIdentity(run.identity).variant_values if run.identity else {}


def _variant_key(run: RunResult) -> tuple[str, ...]:
    """What tells two runs of one method on one dataset and setting apart: the variant fingerprint, or for a
    schema-1 file (no identity) its runs folder and recipe folder."""
    if run.identity:
        return ("variant", run.results.variant_id)
    return ("folder", str(run.root), run.recipe_folder)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _project(values: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(_canonical(values[k]) if k in values else _MISSING for k in keys)


def _tells_apart(cells: Sequence[Sequence[Mapping[str, Any]]], keys: Sequence[str]) -> bool:
    return all(len({_project(values, keys) for values in variants}) == len(variants) for variants in cells)


def _label_keys(cells: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """The identity keys that differ between the variants of some cell, without the ones that only repeat
    another's difference (`model.arch` beside `backbone.arch`, `stage1.optim.lr` beside `optim.lr`)."""
    keys: set[str] = set()
    for variants in cells:
        keys |= set(differing_keys(variants))
    chosen = sorted(keys)
    for key in sorted(keys, key=lambda k: (not k.startswith("stage1."), k)):
        primaries = _MIRRORS.get(key, (key.removeprefix("stage1."),) if key.startswith("stage1.") else ())
        if any(p in chosen and p != key for p in primaries):
            trial = [k for k in chosen if k != key]
            if _tells_apart(cells, trial):
                chosen = trial
    return chosen


def _shown_values(values: Mapping[str, Any]) -> dict[str, Any]:
    shown = dict(values)
    if "backbone.weights_sha256" in shown and shown["backbone.weights_sha256"] is None:
        shown["backbone.weights_sha256"] = "random"
    return shown


def _root_names(roots: Iterable[str]) -> dict[str, str]:
    """A short name for each runs folder: its own name, or its path where two share a name."""
    roots = sorted(set(roots))
    names = [Path(r).name or r for r in roots]
    return {r: (n if names.count(n) == 1 else r) for r, n in zip(roots, names, strict=True)}


def _variant_series(method: str, recipe: str | None, runs: Sequence[RunResult]) -> dict[int, Series]:
    """Split one method (and recipe) into variants where a dataset and setting hold several identities; every
    run of the method is then labelled by the keys that tell those apart, so one variant is one series over
    all datasets and settings."""
    cells: dict[tuple[Setting, str], dict[tuple[str, ...], RunResult]] = defaultdict(dict)
    for run in runs:
        cells[(run.setting, run.dataset)].setdefault(_variant_key(run), run)
    crowded = {cell: variants for cell, variants in cells.items() if len(variants) > 1}
    if not crowded:
        plain = Series(method, recipe)
        return {id(run): plain for run in runs}
    identities = {
        cell: [_variant_values(r) for r in variants.values() if r.identity] for cell, variants in crowded.items()
    }
    chosen = _label_keys(list(identities.values()))
    shared = [k for k in chosen if not _bound(k)]
    split_here = {cell: set(differing_keys(values)) for cell, values in identities.items()}
    root_names = _root_names(str(run.root) for run in runs if not run.identity)
    series_of: dict[int, Series] = {}
    for run in runs:
        if run.identity:
            here = split_here.get((run.setting, run.dataset), set())
            keys = sorted([*shared, *(k for k in chosen if _bound(k) and k in here)])
            values = _variant_values(run)
            variant = tuple(zip(keys, _project(values, keys), strict=True))
            detail = variant_label(_shown_values(values), keys) if keys else ""
        else:
            variant = (("folder", str(run.root)), ("recipe folder", run.recipe_folder))
            parts = [root_names[str(run.root)]] if len(root_names) > 1 else []
            parts += [run.recipe_folder] if run.recipe_folder != run.recipe else []
            detail = ", ".join(parts) or "schema 1 file"
        series_of[id(run)] = Series(method, recipe, variant, detail)
    # Labels that still collide (keys cut at the label's limit, a schema-1 file beside a schema-2 run, ...)
    # get the variant's fingerprint.
    by_label: dict[str, set[Series]] = defaultdict(set)
    for series in series_of.values():
        by_label[series.label].add(series)
    for run_key, series in series_of.items():
        if len(by_label[series.label]) > 1:
            mark = fingerprint(dict(series.variant))[:6]
            detail = f"{series.detail}, #{mark}" if series.detail else f"#{mark}"
            series_of[run_key] = Series(series.method, series.recipe, series.variant, detail)
    return series_of


def assign_series(runs: Iterable[RunResult]) -> dict[int, Series]:
    """The series of every run (keyed by `id(run)`): per protocol and method, split by recipe where a dataset
    and setting hold several recipes, then by variant where they hold several identities."""
    by_method: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for run in runs:
        by_method[(run.protocol, run.method)].append(run)
    series_of: dict[int, Series] = {}
    for (_, method), group in by_method.items():
        recipes: dict[tuple[Setting, str], set[str]] = defaultdict(set)
        for run in group:
            recipes[(run.setting, run.dataset)].add(run.recipe)
        split = any(len(names) > 1 for names in recipes.values())
        by_recipe: dict[str | None, list[RunResult]] = defaultdict(list)
        for run in group:
            by_recipe[run.recipe if split else None].append(run)
        for recipe, members in by_recipe.items():
            series_of.update(_variant_series(method, recipe, members))
    return series_of


# -- the index -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellKey:
    protocol: str
    setting: Setting
    series: Series
    dataset: str


def _same_counts(a: RunResult, b: RunResult) -> bool:
    return {k: (e.correct, e.total, e.errors) for k, e in a.evaluations.items()} == {
        k: (e.correct, e.total, e.errors) for k, e in b.evaluations.items()
    }


class ResultIndex:
    """Runs grouped by (protocol, setting, series, dataset) and seed, with the seed set each cell should have.
    Of the same run found twice, the one that comes first in `runs` (as `collect_runs` found them: runs folders
    in the order given) is used."""

    def __init__(self, runs: Iterable[RunResult]) -> None:
        self.problems: list[Problem] = []
        self.all_runs: list[RunResult] = self._one_per_run(list(runs))
        series_of = assign_series(self.all_runs)
        self.cells: dict[CellKey, dict[int, RunResult]] = defaultdict(dict)
        for run in self.all_runs:
            key = CellKey(run.protocol, run.setting, series_of[id(run)], run.dataset)
            seeds = self.cells[key]
            if run.seed in seeds:  # only files that disagree with their folders get here
                first = seeds[run.seed].path
                self.problems.append(Problem(run.path, f"same series, dataset and seed as {first}; that one is used"))
                continue
            seeds[run.seed] = run
        self._seeds: dict[str, tuple[int, ...]] = {}
        for key, seeds in self.cells.items():
            self._seeds[key.protocol] = tuple(sorted({*self._seeds.get(key.protocol, ()), *seeds}))
        self._check_backbones()

    def _one_per_run(self, runs: Sequence[RunResult]) -> list[RunResult]:
        """The same run found twice (equal run_id: a copied folder, two runs folders holding it) counts once."""
        first: dict[str, RunResult] = {}
        kept = []
        for run in runs:
            if not run.run_id:
                kept.append(run)
                continue
            if run.run_id in first:
                other = first[run.run_id]
                message = f"the same run (run_id {run.run_id[:12]}) as {other.path}; counted once"
                if not _same_counts(run, other):
                    message += " (its counts differ: the run is not deterministic on this machine)"
                self.problems.append(Problem(run.path, message, skipped=False))
                continue
            first[run.run_id] = run
            kept.append(run)
        return kept

    def _check_backbones(self) -> None:
        for key, seeds in self.cells.items():
            labels = sorted({run.backbone.label for run in seeds.values()})
            if len(labels) > 1:
                path = next(iter(seeds.values())).path.parent.parent
                message = f"{key.series.label} on {key.dataset} mixes backbones {', '.join(labels)} across seeds"
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
        return sorted(found, key=lambda s: s.sort_key)

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

    def series_runs(self, protocol: str, series: Series, settings: Iterable[Setting] | None = None) -> list[RunResult]:
        wanted = None if settings is None else set(settings)
        return [
            run
            for key, seeds in self.cells.items()
            if key.protocol == protocol and key.series == series and (wanted is None or key.setting in wanted)
            for run in seeds.values()
        ]

    def recipes(self, protocol: str, series: Series) -> list[str]:
        return sorted({run.recipe for run in self.series_runs(protocol, series)})

    def backbones(self, runs: Iterable[RunResult]) -> list[Backbone]:
        return sorted({run.backbone for run in runs}, key=lambda b: b.label)

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

    def class_count(self, protocol: str, setting: Setting | None, dataset: str, evaluation: str) -> int | None:
        """How many classes `evaluation` of `dataset` has (the most common count over its runs); None when no
        run has it. With `setting` None, over every setting of the protocol."""
        counts: dict[int, int] = defaultdict(int)
        for key, seeds in self.cells.items():
            if key.protocol != protocol or key.dataset != dataset or setting not in (None, key.setting):
                continue
            for run in seeds.values():
                if evaluation in run.evaluations:
                    counts[len(run.evaluations[evaluation].total)] += 1
        return max(counts, key=lambda c: (counts[c], c)) if counts else None

    def measure(self, key: CellKey, evaluation: str, metric: Metric = "accuracy") -> Measurement | None:
        """Mean ± std over the seeds of one cell that have `evaluation`; None when no seed has it."""
        runs = {seed: run for seed, run in self.runs(key).items() if evaluation in run.evaluations}
        if not runs:
            return None
        per_seed = {seed: metric_value(run.evaluations[evaluation], metric) for seed, run in sorted(runs.items())}
        # Zero-shot CLIP trains nothing: its numbers do not depend on the seed, so one seed is never "missing".
        expected = () if key.series.method == ZEROSHOT else self.expected_seeds(key.protocol)
        missing = tuple(seed for seed in expected if seed not in runs)
        return Measurement(
            stat=summarize(list(per_seed.values())),
            per_seed=per_seed,
            missing_seeds=missing,
            transductive=any(run.transductive for run in runs.values()),
            classes=len(next(iter(runs.values())).evaluations[evaluation].total),
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
