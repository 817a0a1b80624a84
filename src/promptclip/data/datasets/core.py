"""The records every dataset reader shares: one labelled image (`Datum`) and the readers' error."""

from __future__ import annotations

from dataclasses import dataclass


class DatasetError(ValueError):
    """A dataset cannot be read as laid out; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class Datum:
    """One labelled image.

    `path` is POSIX and relative to the dataset folder (`DatasetSplits.root`), or a virtual id for data that
    has no files (synthetic datasets). `classname` is the name as the dataset's split file spells it.
    """

    path: str
    label: int
    classname: str
    domain: int = 0
