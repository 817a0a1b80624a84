"""Executing planned runs: lock the folder, check it may be used, train, save the prompt, evaluate every
target, write `results.json` (atomically, last, so its presence means the run is complete).

A sweep skips a run only when a finished run of the same identity exists; a folder holding anything else is
never written over (see `rundir`). Started by torchrun with several processes, a run is data-parallel
(see `group`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from promptclip import __version__
from promptclip.config import RunConfig
from promptclip.engine.distributed import (
    current_data_parallel,
    init_data_parallel,
    is_main_process,
)
from promptclip.engine.evaluate import ImageFeatureCache
from promptclip.engine.stop import Stopped
from promptclip.engine.train import EpochCallback, RunLog
from promptclip.io import atomic_write_json, atomic_write_text, remove_stale_temporaries
from promptclip.locks import RunLock, RunLockError
from promptclip.protocols.spec import RunSpec
from promptclip.runs import group as rank_group
from promptclip.runs.errors import RunBusyError, RunError
from promptclip.runs.plan import PlannedRun, config_text, plan_run
from promptclip.runs.results import RunResults, read_results
from promptclip.runs.rundir import RunDir, RunState, claim_recipe_folder


@dataclass
class RunOptions:
    resume: bool = False
    overwrite: bool = False
    """Move a folder that a run may not use (a user's files, a run of another identity, an interrupted run)
    aside to `<folder>.replaced-<time>` and start again there; nothing is deleted."""
    progress: bool | None = None
    tensorboard: bool = False
    echo: bool = True
    callbacks: Sequence[EpochCallback] = ()
    allow_torchscript: bool = False
    """The command line named the backbone's weights path (`--opts model.weights FILE`), so it may open a
    TorchScript archive (with a warning); a path read from a recipe never does."""
    fewshot_cache_dir: Any = None
    image_features: ImageFeatureCache = field(default_factory=ImageFeatureCache)
    """Frozen image features of evaluation images, shared by the runs these options execute (a sweep's runs
    on one dataset and backbone encode each test image once; see `PromptModel.cacheable_image_features`)."""


@dataclass
class RunOutcome:
    spec: RunSpec
    status: Literal["done", "skipped", "failed", "busy"]
    results: RunResults | None = None
    error: str | None = None
    seconds: float = 0.0
    run_dir: RunDir | None = None


def execute(spec: RunSpec, cfg: RunConfig, options: RunOptions | None = None) -> RunOutcome:
    """Plan and run one spec (skipped when a finished run of its identity exists)."""
    return execute_planned(plan_run(spec, cfg), options or RunOptions())


def execute_planned(planned: PlannedRun, options: RunOptions) -> RunOutcome:
    from promptclip.runs.inputs import resolve_device

    group = init_data_parallel(resolve_device(planned.cfg.device))
    if group is None:
        return _execute_one(planned, options)
    if not group.is_main:
        from promptclip.runs.work import run_work

        status, seconds = rank_group.follow(
            planned.run_dir.path, group, lambda: run_work(planned, options, RunLog(None, echo=False))
        )
        return RunOutcome(planned.spec, status, seconds=seconds, run_dir=planned.run_dir)  # type: ignore[arg-type]
    return rank_group.lead(  # type: ignore[no-any-return]
        planned.run_dir.path, group, lambda: _execute_one(planned, options), lambda o: o.status == "skipped"
    )


def _skipped(planned: PlannedRun, run_dir: RunDir) -> RunOutcome:
    return RunOutcome(planned.spec, "skipped", _read(run_dir), run_dir=run_dir)


def _execute_one(planned: PlannedRun, options: RunOptions) -> RunOutcome:
    run_dir = planned.run_dir
    if planned.finished and not options.overwrite:
        return _skipped(planned, run_dir)
    if planned.sweep_folder:  # mark the recipe folder as this variant's (or move to this variant's own folder)
        recipe_dir = planned.spec.run_dir.parents[1]
        folder = claim_recipe_folder(recipe_dir, planned.identity)
        run_dir = RunDir(folder / run_dir.path.parent.name / run_dir.path.name)
        planned = _with_run_dir(planned, run_dir)
    state = run_dir.state(planned.identity)
    # A folder no run of this identity may use is refused (or moved aside) before its lock is touched; an
    # interrupted run of this identity may be running right now in another sweep, which only its lock tells.
    if state in (RunState.OTHER, RunState.FOREIGN) or (
        options.overwrite and state in (RunState.INTERRUPTED, RunState.FINISHED)
    ):
        _check_or_move(planned, options)
    lock = RunLock(run_dir.path)
    try:
        acquired = lock.acquire()
    except RunLockError as err:
        raise RunError(str(err)) from None
    if not acquired:
        raise RunBusyError(lock.busy_message())
    try:
        state = run_dir.check_usable(planned.identity, options.resume, overwrite=False)
        if state is RunState.FINISHED:  # finished by another sweep between the first look and the lock
            return _skipped(planned, run_dir)
        return _execute_locked(planned, options, lock)
    finally:
        lock.release()


def _check_or_move(planned: PlannedRun, options: RunOptions) -> None:
    """Before the lock: refuse a folder the run may not use, or (--overwrite) move it aside, unless another
    running process works in it."""
    if not options.overwrite:
        planned.run_dir.check_usable(planned.identity, options.resume, overwrite=False)
        return
    lock = RunLock(planned.run_dir.path)
    if not lock.acquire():
        raise RunBusyError(lock.busy_message())
    lock.release()
    planned.run_dir.move_aside()


def _with_run_dir(planned: PlannedRun, run_dir: RunDir) -> PlannedRun:
    from dataclasses import replace

    return replace(planned, run_dir=run_dir)


def _read(run_dir: RunDir) -> RunResults | None:
    from promptclip.runs.results import ResultFileError

    try:
        return read_results(run_dir.results)
    except ResultFileError as err:
        raise RunError(f"{run_dir.results}: {err}") from None


def _execute_locked(planned: PlannedRun, options: RunOptions, lock: RunLock) -> RunOutcome:
    from promptclip.runs.work import run_work

    started = time.perf_counter()
    run_dir = planned.run_dir
    damaged = run_dir.set_aside_damaged_results()
    run_dir.start(planned.identity)
    atomic_write_text(run_dir.config, config_text(planned.cfg))
    with RunLog(run_dir.log, echo=options.echo) as log:
        log(f"== {planned.spec.describe()}")
        log(f"run folder: {run_dir.path} (run {planned.identity.run_id[:12]})")
        if damaged is not None:
            log(f"the damaged results.json of an earlier attempt is kept as {damaged.name}")
        if lock.took_over is not None:
            log(f"took over the lock left by {lock.took_over.describe()}, which is no longer running")
        for folder in (run_dir.path, run_dir.checkpoints, run_dir.prompt):
            remove_stale_temporaries(folder)  # half-written files of a killed attempt; the folder is ours now
        try:
            with _library_messages_to(log):
                results = run_work(planned, options, log)
        except Stopped as stopped:
            stopped.run_dir = stopped.run_dir or run_dir.path
            log.to_file(f"{stopped} after {stopped.epochs_done} epochs; continue with --resume")
            raise
        except Exception as err:
            log.to_file(f"run failed: {type(err).__name__}: {err}")
            raise
        data = results.to_json()
        data["promptclip_version"] = __version__
        atomic_write_json(run_dir.results, data, fault="mid_results")
        log(f"results: {run_dir.results}")
    return RunOutcome(planned.spec, "done", results, seconds=round(time.perf_counter() - started, 3), run_dir=run_dir)


@contextlib.contextmanager
def _library_messages_to(log: RunLog) -> Iterator[None]:
    """Route the library's warnings (e.g. classes with fewer images than shots) into the run's log; they
    reach the terminal also when the log does not echo (--quiet)."""

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = f"{record.levelname.lower()}: {record.getMessage()}"
            log(message)
            if not log.echo:
                print(message, file=sys.stderr)

    logger = logging.getLogger("promptclip")
    handler = Forward(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


# -- a sweep ----------------------------------------------------------------------------------------------------
def run_specs(
    specs: Sequence[RunSpec],
    cfg: RunConfig,
    options: RunOptions | None = None,
    keep_going: bool = False,
    report: Callable[[str], None] = print,
) -> list[RunOutcome]:
    """Execute `specs` in order, skipping finished ones and ones another running process holds (another
    sweep over the same runs folder: status "busy"); with `keep_going`, a failed run (or a folder that may
    not be used) is reported and the sweep goes on."""
    options = options or RunOptions()
    if not is_main_process():
        report = _quiet  # rank 0 reports for the group
    outcomes = []
    for number, spec in enumerate(specs, 1):
        prefix = f"[{number}/{len(specs)}]"
        try:
            outcome = execute(spec, cfg, options)
        except RunBusyError as err:
            report(f"{prefix} in progress elsewhere, skipped: {err}")
            outcomes.append(RunOutcome(spec, "busy", error=str(err)))
            continue
        except Exception as err:
            if not keep_going or current_data_parallel() is not None:  # ranks must not drift apart
                raise
            report(f"{prefix} FAILED {spec.run_dir}: {type(err).__name__}: {err}")
            outcomes.append(RunOutcome(spec, "failed", error=f"{type(err).__name__}: {err}"))
            continue
        outcomes.append(outcome)
        where = outcome.run_dir.path if outcome.run_dir is not None else spec.run_dir
        if outcome.status == "skipped":
            report(f"{prefix} done already, skipped: {where}")
            continue
        summary = ", ".join(
            f"{k} {v.accuracy:.2f}" for k, v in (outcome.results.evaluations if outcome.results else {}).items()
        )
        report(f"{prefix} finished {where} ({outcome.seconds:.1f}s): {summary}")
    return outcomes


def _quiet(message: str) -> None:
    """A report that says nothing (ranks other than 0)."""
