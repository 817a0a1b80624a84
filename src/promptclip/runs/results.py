"""`results.json`: the one typed schema that runs write and reports read.

Every number a report shows comes from the integer counts stored here, never from a rounded accuracy. Schema 2
adds the run's identity (`identity`, `run_id`, `variant_id`), the backbone actually used, and each evaluation's
confusion (the non-zero off-diagonal cells; the diagonal is `correct`). Schema 1 files (no identity, no
confusion) are still read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptclip.runs.identity import RunIdentity

RESULTS_FILE = "results.json"
REPLACED_MARK = ".replaced-"
"""`RunDir.move_aside` renames a folder `<name>.replaced-<time>`: the runs in such folders were replaced."""
SCHEMA = 2
READABLE_SCHEMAS = (1, 2)


class ResultFileError(ValueError):
    """A results.json that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class Evaluation:
    """One evaluation target: per-class counts (`classnames[i]` is label i) and the confusion."""

    dataset: str
    subsample: str
    split: str
    correct: tuple[int, ...]
    total: tuple[int, ...]
    classnames: tuple[str, ...] = ()
    errors: tuple[tuple[int, int, int], ...] = ()
    """(true label, predicted label, count) of every non-zero off-diagonal cell of the confusion matrix."""
    has_confusion: bool = False

    @property
    def num_samples(self) -> int:
        return sum(self.total)

    @property
    def accuracy(self) -> float:
        """Micro accuracy in percent: every test image weighs the same."""
        return 100.0 * sum(self.correct) / sum(self.total)

    @property
    def macro_accuracy(self) -> float:
        """Mean per-class accuracy in percent, over the classes that have test images."""
        rates = [c / t for c, t in zip(self.correct, self.total, strict=True) if t > 0]
        return 100.0 * math.fsum(rates) / len(rates)

    def confusion(self) -> list[list[int]]:
        """The dense [C, C] matrix (rows: true class, columns: predicted class)."""
        size = len(self.total)
        matrix = [[0] * size for _ in range(size)]
        for label, count in enumerate(self.correct):
            matrix[label][label] = count
        for true, predicted, count in self.errors:
            matrix[true][predicted] += count
        return matrix

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "dataset": self.dataset,
            "subsample": self.subsample,
            "split": self.split,
            "classnames": list(self.classnames),
            "correct": list(self.correct),
            "total": list(self.total),
            "accuracy": round(self.accuracy, 4),
            "macro_accuracy": round(self.macro_accuracy, 4),
        }
        if self.has_confusion:
            data["errors"] = [list(cell) for cell in self.errors]
        return data


@dataclass(frozen=True)
class RunResults:
    protocol: str
    dataset: str
    """The dataset's name as shown (an own dataset's `--name`)."""
    method: str
    recipe: str
    seed: int
    shots: int | None
    evaluations: Mapping[str, Evaluation]
    transductive: bool = False
    ratio: float | None = None
    selector: str | None = None
    identity: Mapping[str, Any] = field(default_factory=dict)
    backbone: Mapping[str, Any] = field(default_factory=dict)
    """`arch`, `weights_sha256` (None for random weights) and `weights` (the file or name given)."""
    train: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Other recorded fields (data selection, skipped images, version), kept as written."""
    schema: int = SCHEMA
    path: Path | None = None

    @property
    def run_id(self) -> str:
        return RunIdentity(self.identity).run_id if self.identity else ""

    @property
    def variant_id(self) -> str:
        return RunIdentity(self.identity).variant_id if self.identity else ""

    @property
    def arch(self) -> str:
        return str(self.backbone.get("arch") or "")

    @property
    def weights_sha256(self) -> str:
        return str(self.backbone.get("weights_sha256") or "")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "protocol": self.protocol,
            "dataset": self.dataset,
            "method": self.method,
            "recipe": self.recipe,
            "shots": self.shots,
            "seed": self.seed,
            "transductive": self.transductive,
        }
        if self.ratio is not None:
            data["ratio"], data["selector"] = self.ratio, self.selector
        data.update(
            {
                "run_id": self.run_id,
                "variant_id": self.variant_id,
                "identity": dict(sorted(self.identity.items())),
                "backbone": dict(self.backbone),
                "evaluations": {key: entry.to_json() for key, entry in self.evaluations.items()},
                "train": dict(self.train),
                **self.extra,
            }
        )
        return data

    @classmethod
    def from_json(cls, data: Any, path: Path | None = None) -> RunResults:
        """Validate and read a parsed results.json; `ResultFileError` names the field that is wrong."""
        if not isinstance(data, Mapping):
            raise ResultFileError("should hold a JSON object")
        schema = _require(data, "schema", int, "the format version, an integer")
        if schema not in READABLE_SCHEMAS:
            raise ResultFileError(f"schema {schema} is not one this promptclip reads ({READABLE_SCHEMAS})")
        evaluations = _require(data, "evaluations", Mapping, "an object of evaluations")
        if not evaluations:
            raise ResultFileError("field 'evaluations' is empty: the run finished no evaluation")
        ratio, selector = data.get("ratio"), data.get("selector")
        if (ratio is None) != (selector is None) or (
            ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float))
        ):
            raise ResultFileError("fields 'ratio' (a number) and 'selector' (a name) must be given together")
        shots = data.get("shots")
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int)):
            raise ResultFileError(f"field 'shots' should be an integer, got {shots!r}")
        transductive = data.get("transductive", False)
        if not isinstance(transductive, bool):
            raise ResultFileError(f"field 'transductive' should be true or false, got {transductive!r}")
        known = {"schema", "protocol", "dataset", "method", "recipe", "shots", "seed", "transductive", "ratio"}
        known |= {"selector", "run_id", "variant_id", "identity", "backbone", "evaluations", "train"}
        return cls(
            protocol=_require(data, "protocol", str, "the protocol name"),
            dataset=_require(data, "dataset", str, "the dataset name"),
            method=_require(data, "method", str, "the method name"),
            recipe=_require(data, "recipe", str, "the recipe name"),
            seed=_require(data, "seed", int, "the seed, an integer"),
            shots=shots,
            evaluations={key: parse_evaluation(entry, f"evaluations.{key}") for key, entry in evaluations.items()},
            transductive=transductive,
            ratio=float(ratio) if ratio is not None else None,
            selector=selector,
            identity=_mapping(data, "identity"),
            backbone=_mapping(data, "backbone"),
            train=_mapping(data, "train"),
            extra={k: v for k, v in data.items() if k not in known},
            schema=schema,
            path=path,
        )


def read_results(path: str | Path) -> RunResults:
    """Read one results.json; `ResultFileError` says what is wrong and how to get a good one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ResultFileError(f"cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise ResultFileError(
            f"is not valid JSON ({err}): the file is damaged; run the command that made the run again with "
            "--resume: it evaluates the run again from its checkpoint and keeps the damaged file beside it"
        ) from None
    return RunResults.from_json(data, path)


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in data:
        raise ResultFileError(f"missing field {key!r} ({what})")
    value = data[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ResultFileError(f"field {key!r} should be {what}, got {value!r}")
    return value


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise ResultFileError(f"field {key!r} should be an object, got {value!r}")
    return value


def _int_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ResultFileError(f"{where} should be a list of integers (per-class counts)")
    if any(v < 0 for v in value):
        raise ResultFileError(f"{where} has a negative count")
    return tuple(value)


def parse_evaluation(entry: Any, where: str) -> Evaluation:
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
    errors = _errors(entry.get("errors"), len(total), f"{where}.errors")
    if errors is not None:
        wrong = [0] * len(total)
        for true, _, count in errors:
            wrong[true] += count
        if any(w + c != t for w, c, t in zip(wrong, correct, total, strict=True)):
            raise ResultFileError(f"{where}.errors: the confusion does not add up to the per-class totals")
    names = entry.get("classnames") or []
    return Evaluation(
        dataset=str(entry.get("dataset", "")),
        subsample=str(entry.get("subsample", "all")),
        split=str(entry.get("split", "test")),
        correct=correct,
        total=total,
        classnames=tuple(str(n) for n in names) if isinstance(names, list) else (),
        errors=errors or (),
        has_confusion=errors is not None,
    )


def _errors(value: Any, classes: int, where: str) -> tuple[tuple[int, int, int], ...] | None:
    if value is None:
        return None
    cells: list[tuple[int, int, int]] = []
    if not isinstance(value, list):
        raise ResultFileError(f"{where} should be a list of [true, predicted, count] cells")
    for cell in value:
        if (
            not isinstance(cell, list)
            or len(cell) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in cell)
            or cell[0] >= classes
            or cell[1] >= classes
            or cell[0] == cell[1]
        ):
            raise ResultFileError(f"{where}: {cell!r} is not a [true, predicted, count] cell off the diagonal")
        cells.append((cell[0], cell[1], cell[2]))
    return tuple(cells)


def evaluation_from_counts(
    dataset: str,
    subsample: str,
    split: str,
    classnames: Sequence[str],
    correct: Sequence[int],
    total: Sequence[int],
    errors: Sequence[tuple[int, int, int]] | None,
) -> Evaluation:
    return Evaluation(
        dataset=dataset,
        subsample=subsample,
        split=split,
        correct=tuple(correct),
        total=tuple(total),
        classnames=tuple(classnames),
        errors=tuple(errors or ()),
        has_confusion=errors is not None,
    )
