"""The checks every dataset's labels and class names pass when it is read (`DatasetBuilder.finish`).

- Labels run 0..n-1 without gaps, each label with one name; an error names the file the labels come from
  (a split file, a CSV file), the entry and the fix.
- Distinct names in prompts: two classes whose names read the same once written for a prompt (underscores
  as spaces, see `promptclip.classnames`; case and runs of spaces, which CLIP's tokenizer drops) get identical
  prompts, and no text classifier can tell them apart. Your own data (`folder`, `csv`) are refused, naming
  both classes; the field's datasets only warn, since their names come with the published split files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from promptclip.classnames import prompt_name
from promptclip.data.datasets.core import DatasetError, Datum

logger = logging.getLogger("promptclip.data")

LISTED = 10  # how many labels or classes a message names


def classnames_from_data(data: Iterable[Datum], num_classes: int | None = None, prefix: str = "") -> list[str]:
    """Label -> raw class name, checked for consistency; labels must be 0..n-1 without gaps. Messages name
    entries without `prefix` (the image folder a split file's paths are below), as the file writes them."""
    names: dict[int, str] = {}
    first: dict[int, Datum] = {}
    for datum in data:
        known = names.setdefault(datum.label, datum.classname)
        first.setdefault(datum.label, datum)
        if known != datum.classname:
            raise DatasetError(
                f"label {datum.label} has two class names, {known!r} and {datum.classname!r} "
                f"(e.g. at {_entry(datum, prefix)!r}); each label needs exactly one name in the split file"
            )
    negative = sorted(label for label in names if label < 0)
    if negative:
        label = negative[0]
        entry = _entry(first[label], prefix)
        raise DatasetError(f"{entry!r} has label {label}; labels run 0..n-1. Fix the entry's label column")
    count = num_classes if num_classes is not None else (max(names) + 1 if names else 0)
    absent = [label for label in range(count) if label not in names]
    beyond = sorted(label for label in names if label >= count)
    if beyond:
        outside = _at(beyond, first, prefix)
        raise DatasetError(
            f"labels must run 0..{count - 1} ({count} classes), but {outside} lie outside. Fix these entries' label "
            "column"
        )
    if absent:
        above = _at([label for label in sorted(names) if label > absent[0]], first, prefix)
        raise DatasetError(
            f"labels must run 0..{count - 1} without gaps, but labels {_listed(absent)} have no entry; the labels "
            f"above the gap: {above}. Fix these entries' label column (a typo?), or give each class its own label "
            "from 0 up"
        )
    return [names[label] for label in range(count)]


def check_labels(splits: dict[str, Sequence[Datum]], num_classes: int, prefix: str = "") -> None:
    """Every label within 0..num_classes-1; the error names the entry, its split and the range."""
    for split, data in splits.items():
        for datum in data:
            if not 0 <= datum.label < num_classes:
                raise DatasetError(
                    f"{split} entry {_entry(datum, prefix)!r} has label {datum.label}, outside 0..{num_classes - 1} "
                    f"({num_classes} classes); fix the entry's label column"
                )


def prompt_key(name: str) -> str:
    """What a class name reads as in a prompt, as CLIP's tokenizer sees it (lower case, single spaces)."""
    return " ".join(prompt_name(name).lower().split())


def same_prompt_groups(names: Sequence[str]) -> list[list[int]]:
    """Groups (of two or more labels) whose names read the same in a prompt (`prompt_key`)."""
    groups: dict[str, list[int]] = {}
    for label, name in enumerate(names):
        groups.setdefault(prompt_key(name), []).append(label)
    return [labels for labels in groups.values() if len(labels) > 1]


def check_distinct_names(names: Sequence[str], keys: Sequence[str] | None, where: str, refuse: bool) -> None:
    """Refuse (`refuse`) or warn about classes whose names read the same in prompts. `keys` says what the
    data call each label (class folders, CSV labels), to name both classes as the user wrote them."""
    groups = same_prompt_groups(names)
    if not groups:
        return

    def described(label: int) -> str:
        origin = f" ({keys[label]})" if keys is not None and keys[label] != names[label] else ""
        return f"label {label} {names[label]!r}{origin}"

    clashes = "; ".join(
        " and ".join(described(label) for label in labels) + f", all {prompt_key(names[labels[0]])!r} in prompts"
        for labels in groups[:LISTED]
    )
    more = f"; and {len(groups) - LISTED} more" if len(groups) > LISTED else ""
    said = f"{where}: classes with the same name in prompts: {clashes}{more}"
    if refuse:
        raise DatasetError(
            f"{said}. Their prompts are identical, so no text classifier can tell them apart. Rename one of "
            "each pair (its folder or label), or give distinct names in a class-name file (--classnames FILE; in a "
            "run, --opts data.options.classnames FILE)"
        )
    logger.warning("%s; their prompts are identical, so these classes cannot be told apart", said)


def _entry(datum: Datum, prefix: str) -> str:
    """The datum's path as its split file writes it: below the image folder `prefix`."""
    start = prefix.strip("/") + "/" if prefix else ""
    return datum.path[len(start) :] if start and datum.path.startswith(start) else datum.path


def _at(labels: Sequence[int], first: dict[int, Datum], prefix: str) -> str:
    shown = ", ".join(f"{label} at {_entry(first[label], prefix)!r}" for label in labels[:LISTED])
    return shown + (" ..." if len(labels) > LISTED else "")


def _listed(labels: Sequence[int]) -> str:
    shown = ", ".join(str(label) for label in labels[:LISTED])
    return shown + (f" and {len(labels) - LISTED} more" if len(labels) > LISTED else "")
