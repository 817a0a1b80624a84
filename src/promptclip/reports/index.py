"""The index of a report: runs grouped by protocol, setting, series and dataset, and their seeds summarised."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from promptclip.reports.collect import (
    ZEROSHOT,
    Backbone,
    Measurement,
    Metric,
    Problem,
    RunResult,
    Setting,
    metric_value,
    sort_datasets,
    summarize,
)
from promptclip.reports.series import Series, assign_series


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
