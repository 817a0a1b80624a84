"""Running experiments: plan a run (identity, needs, folder), execute it, write and read its results.

* `plan` / `identity` / `rundir`: what a run is, and where it may write;
* `execution` (a sweep and one run), `work` (the steps of one run), `stages` (runs another needs first),
  `group` (torchrun ranks), `inputs` (data, backbone, loaders), `evaluation`, `selection`;
* `results`: the `results.json` schema that runs write and reports read.

Names are imported on first use, so reading results (`promptclip report`) and the command line's help do not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "PlannedRun": "promptclip.runs.plan",
    "plan_run": "promptclip.runs.plan",
    "RunBusyError": "promptclip.runs.errors",
    "RunError": "promptclip.runs.errors",
    "RunFolderError": "promptclip.runs.errors",
    "RunOptions": "promptclip.runs.execution",
    "RunOutcome": "promptclip.runs.execution",
    "execute": "promptclip.runs.execution",
    "execute_planned": "promptclip.runs.execution",
    "run_specs": "promptclip.runs.execution",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'promptclip.runs' has no attribute {name!r}")
