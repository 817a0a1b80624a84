"""A test hook that kills the process at named points, so the fault-injection tests can check that a run
killed at any moment loses nothing and resumes to the same numbers.

It is read here and nowhere else: `PROMPTCLIP_FAULT` holds comma-separated entries `POINT` or `POINT:N`,
meaning "send SIGKILL to this process the N-th time it reaches POINT" (N defaults to 1). The points are

* `after_step`: after an optimiser step (N counts steps taken by this process);
* `after_epoch`: after an epoch's checkpoint is written (N counts epochs finished by this process);
* `mid_checkpoint`: while `checkpoints/last.pt` is being written (N counts checkpoint writes);
* `mid_results`: while `results.json` is being written.

At the `mid_*` points the temporary file being written is first cut to half its length, as a kill in the
middle of a write leaves it. With the variable unset (every normal run) a point costs one dictionary lookup.
Nothing in the library depends on it; it exists for `tests/test_faults.py`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

FAULT_ENV = "PROMPTCLIP_FAULT"
FAULT_POINTS = ("after_step", "after_epoch", "mid_checkpoint", "mid_results")

_reached: dict[str, int] = {}


class FaultSpecError(ValueError):
    """`PROMPTCLIP_FAULT` names an unknown point or a bad count."""


def parse_fault_spec(text: str) -> dict[str, int]:
    """`"after_epoch:2,mid_results"` -> `{"after_epoch": 2, "mid_results": 1}`."""
    wanted: dict[str, int] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        point, _, count = entry.partition(":")
        if point not in FAULT_POINTS:
            raise FaultSpecError(
                f"{FAULT_ENV}={text!r}: unknown point {point!r}; choose from {', '.join(FAULT_POINTS)}"
            )
        try:
            wanted[point] = int(count) if count else 1
        except ValueError:
            raise FaultSpecError(f"{FAULT_ENV}={text!r}: {count!r} is not a count (POINT:N)") from None
    return wanted


def fault_point(point: str, partial: Path | None = None) -> None:
    """Mark that this process reached `point`; SIGKILL it there when `PROMPTCLIP_FAULT` asks for that."""
    text = os.environ.get(FAULT_ENV)
    if not text:
        return
    wanted = parse_fault_spec(text).get(point)
    if wanted is None:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] != wanted:
        return
    if partial is not None and partial.is_file():
        _cut_in_half(partial)
    os.kill(os.getpid(), signal.SIGKILL)


def _cut_in_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb+") as handle:
        handle.truncate(size // 2)
        handle.flush()
        os.fsync(handle.fileno())
