"""Series: what one row (or column) group of a table shows, a method split by recipe and by variant, with
labels from the identity keys that tell variants apart."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptclip.reports.collect import RunResult, Setting
from promptclip.runs.identity import RunIdentity, differing_keys, fingerprint, variant_label


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


def _reference_values(runs: Sequence[RunResult], keys: Sequence[str]) -> dict[str, Any]:
    """The values of the reference variant, against which the others are labelled: the one that took the
    recipe's own folder (a sweep gives later variants `<recipe>-<fingerprint>`), else the one with most runs."""
    if not runs:
        return {}
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        counts[run.results.variant_id] += 1

    def rank(run: RunResult) -> tuple[bool, int, str]:
        return (run.recipe_folder != run.recipe, -counts[run.results.variant_id], run.results.variant_id)

    values = _variant_values(min(runs, key=rank))
    return {k: values[k] for k in keys if k in values}


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
    reference = _reference_values([run for run in runs if run.identity], chosen)
    series_of: dict[int, Series] = {}
    for run in runs:
        if run.identity:
            here = split_here.get((run.setting, run.dataset), set())
            keys = sorted([*shared, *(k for k in chosen if _bound(k) and k in here)])
            values = _variant_values(run)
            variant = tuple(zip(keys, _project(values, keys), strict=True))
            # Labelled by what sets it apart from the reference variant (which goes by the method's name).
            own = [k for k in keys if _project(values, [k]) != _project(reference, [k])]
            detail = variant_label(_shown_values(values), own) if own else ""
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
