"""Data-parallel runs (torchrun): rank 0 runs a spec exactly as a single process does (the lock, the log, every
file); the other ranks follow its decision to run or skip it, train and evaluate their shares, and write
nothing. Rank 0 tells them once it starts the work, so every rank makes the same collective calls."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from promptclip.engine.distributed import DataParallel, current_data_parallel
from promptclip.runs.errors import RunBusyError, RunError

_ANNOUNCED: set[Path] = set()


def announce_run(run_dir: Path) -> None:
    """Rank 0 tells the other ranks that the run in `run_dir` starts (call once the work begins)."""
    group = current_data_parallel()
    if group is not None and group.is_main:
        group.broadcast_object("run")
        _ANNOUNCED.add(run_dir)


def lead(run_dir: Path, group: DataParallel, run: Callable[[], Any], skipped: Callable[[Any], bool]) -> Any:
    """Rank 0: `run()` the spec, then release the other ranks (skip, busy or failed, or after the work)."""
    try:
        outcome = run()
    except Exception as err:
        if run_dir not in _ANNOUNCED:  # the other ranks still wait for a decision
            group.broadcast_object("busy" if isinstance(err, RunBusyError) else "failed")
        _ANNOUNCED.discard(run_dir)
        raise
    if run_dir in _ANNOUNCED:
        _ANNOUNCED.discard(run_dir)
        group.barrier()  # results.json and the prompt exist before any rank moves on
    elif skipped(outcome):
        group.broadcast_object("skip")
    return outcome


def follow(run_dir: Path, group: DataParallel, work: Callable[[], object]) -> tuple[str, float]:
    """A rank other than 0: wait for rank 0's decision, and do this rank's share of the work when it runs.
    Returns ("skipped" | "done", seconds)."""
    decision = group.broadcast_object(None)
    if decision == "skip":
        return "skipped", 0.0
    if decision == "busy":
        raise RunBusyError(f"{run_dir}: rank 0 found this run folder locked by another process")
    if decision != "run":
        raise RunError(f"{run_dir}: rank 0 stopped before the run started; its log.txt says why")
    started = time.perf_counter()
    work()
    group.barrier()
    return "done", round(time.perf_counter() - started, 3)
