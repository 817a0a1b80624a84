"""Running experiments: plan a run (identity, needs, folder), execute it, write and read its results.

* `plan` / `identity` / `rundir`: what a run is, and where it may write;
* `execute` (a sweep and one run), `work` (the steps of one run), `stages` (runs another needs first),
  `group` (torchrun ranks), `inputs` (data, backbone, loaders), `evaluation`, `selection`;
* `results`: the `results.json` schema that runs write and reports read.
"""

from __future__ import annotations

from promptclip.runs.errors import RunBusyError, RunError, RunFolderError
from promptclip.runs.execution import RunOptions, RunOutcome, execute, execute_planned, run_specs
from promptclip.runs.plan import PlannedRun, plan_run

__all__ = [
    "PlannedRun",
    "RunBusyError",
    "RunError",
    "RunFolderError",
    "RunOptions",
    "RunOutcome",
    "execute",
    "execute_planned",
    "plan_run",
    "run_specs",
]
