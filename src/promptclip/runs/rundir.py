"""The run folder: every path of a run, what a folder holds, and whether a new run may use it.

Layout (the only entries a run writes):

    config.yaml      the resolved configuration (what was asked for, paths included)
    identity.json    the run's identity (see `identity`), written before any work: it marks the folder as a run
    log.txt          the run's log
    metrics.jsonl    one record per epoch and per evaluation
    checkpoints/     last.pt (and previous.pt): resumable training state
    prompt/          the trained prompt (`save_pretrained`)
    results.json     written last, atomically: its presence means the run finished
    stage1/          the stage-1 run of a two-stage run whose folder was chosen by hand
    tensorboard/     with --tensorboard
    .lock            held while a process works in the folder

A folder is used by a new run only when that cannot lose anything: it is empty, or it holds a run of the same
identity (finished: skipped; interrupted: resumed with --resume, else refused). A folder holding anything else
(a user's files, a run of another identity) is refused with the fix, unless --overwrite moves it aside first.
In a sweep, a recipe folder holds one variant of the recipe (`variant.json`); another variant of the same
recipe gets its own folder `<recipe>-<fingerprint>` beside it.
"""

from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptclip.engine.checkpoint import CHECKPOINT_DIR
from promptclip.engine.train import LOG_FILE, METRICS_FILE
from promptclip.io import atomic_write_json
from promptclip.methods.base import PROMPT_DIR
from promptclip.runs.errors import RunFolderError
from promptclip.runs.identity import SHORT, RunIdentity
from promptclip.runs.results import REPLACED_MARK, RESULTS_FILE

IDENTITY_FILE = "identity.json"
CONFIG_FILE = "config.yaml"
STAGE1_DIR = "stage1"
VARIANT_FILE = "variant.json"
LAYOUT = frozenset(
    {CONFIG_FILE, IDENTITY_FILE, LOG_FILE, METRICS_FILE, CHECKPOINT_DIR, PROMPT_DIR, RESULTS_FILE, STAGE1_DIR}
    | {"tensorboard", ".lock"}
)


class RunState(enum.Enum):
    EMPTY = "empty"
    FINISHED = "finished"
    """A finished run of the same identity."""
    INTERRUPTED = "interrupted"
    """A run of the same identity that checkpointed at least one epoch and did not finish."""
    STARTED = "started"
    """An attempt that stopped before its first checkpoint (a failed input check, say): nothing to lose but
    its log, which the next attempt appends to, whatever its identity."""
    OTHER = "other"
    """A run (finished or not) of another identity, or of a promptclip that recorded none."""
    FOREIGN = "foreign"
    """Files that are not a run's."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    # -- paths ---------------------------------------------------------------------------------------------
    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def identity_file(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def prompt(self) -> Path:
        return self.path / PROMPT_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def stage1(self) -> Path:
        return self.path / STAGE1_DIR

    @property
    def finished(self) -> bool:
        """results.json is there and readable (a damaged one, cut by a crash or a full disk, is not)."""
        return self._results_data() is not None

    def results_damaged(self) -> bool:
        return self.results.is_file() and self._results_data() is None

    def _results_data(self) -> dict[str, Any] | None:
        """results.json as read, when it is an object holding evaluations; else None."""
        data = _read_json(self.results)
        return data if isinstance(data, dict) and isinstance(data.get("evaluations"), dict) else None

    def set_aside_damaged_results(self) -> Path | None:
        """Rename a damaged results.json to `results.json.damaged-<time>` (kept; the run writes a new one)."""
        if not self.results_damaged():
            return None
        target = self.results.with_name(f"{RESULTS_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(self.results, target)
        return target

    # -- what the folder holds -------------------------------------------------------------------------------
    def entries(self) -> list[str]:
        try:
            return sorted(entry.name for entry in self.path.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def recorded_identity(self, results: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The identity a run recorded here (results.json, else identity.json); None when there is none.
        `results`: results.json already read by the caller."""
        for data in (results if results is not None else _read_json(self.results), _read_json(self.identity_file)):
            identity = data.get("identity") if isinstance(data, dict) else None
            if isinstance(identity, dict):
                return identity
        return None

    def has_checkpoint(self) -> bool:
        return any((self.checkpoints / name).is_file() for name in ("last.pt", "previous.pt"))

    def state(self, identity: RunIdentity) -> RunState:
        entries = [e for e in self.entries() if e != ".lock"]
        if not entries:
            return RunState.EMPTY
        if self.path.is_symlink() or any((self.path / e).is_symlink() for e in entries):
            return RunState.FOREIGN  # a run never writes through a link: it could point outside the folder
        if any(e not in LAYOUT and not e.startswith(f"{RESULTS_FILE}.damaged-") for e in entries if e[0] != "."):
            return RunState.FOREIGN
        results = self._results_data()  # read once: a large run's results.json holds its confusion cells
        finished = results is not None
        recorded = self.recorded_identity(results)
        if recorded is None:
            return RunState.OTHER if finished else RunState.FOREIGN
        if not (finished or self.has_checkpoint() or self.prompt.exists()):
            return RunState.STARTED
        if RunIdentity(recorded).run_id != identity.run_id:
            return RunState.OTHER
        return RunState.FINISHED if finished else RunState.INTERRUPTED

    def describe_contents(self, limit: int = 6) -> str:
        entries = self.entries()
        shown = ", ".join(entries[:limit]) + (f", ... ({len(entries) - limit} more)" if len(entries) > limit else "")
        return shown or "(nothing)"

    # -- may a new run use it ----------------------------------------------------------------------------------
    def check_usable(self, identity: RunIdentity, resume: bool, overwrite: bool) -> RunState:
        """The folder's state when a run of `identity` may go on here (EMPTY, STARTED, INTERRUPTED with
        `resume`, FINISHED: skip); else `RunFolderError` with the fix, or with `overwrite` the folder is moved
        aside first and EMPTY returned."""
        state = self.state(identity)
        if state in (RunState.EMPTY, RunState.STARTED, RunState.FINISHED) and not (
            overwrite and state is RunState.FINISHED
        ):
            return state
        if state is RunState.INTERRUPTED and resume:
            return state
        if overwrite:
            moved = self.move_aside()
            return RunState.EMPTY if moved else state
        raise RunFolderError(self._refusal(state))

    def _refusal(self, state: RunState) -> str:
        fix_new = "choose another folder (--output), or add --overwrite to move this one aside and start again"
        if state is RunState.INTERRUPTED:
            damaged = " and a damaged results.json" if self.results_damaged() else ""
            return (
                f"{self.path}: holds an interrupted run of this configuration ({self._progress()}{damaged}); add "
                "--resume to continue it, or --overwrite to move it aside and start again"
            )
        if state is RunState.OTHER:
            recorded = self.recorded_identity()
            what = "a run of another configuration" if recorded is not None else "a run with no recorded identity"
            return f"{self.path}: holds {what}, which a new run must not replace; {fix_new}"
        return (
            f"{self.path}: holds files that are not a run of this configuration ({self.describe_contents()}); {fix_new}"
        )

    def _progress(self) -> str:
        epochs = 0
        try:
            with open(self.metrics, encoding="utf-8") as handle:
                epochs = sum('"epoch"' in line and '"eval"' not in line for line in handle)
        except OSError:
            pass
        return f"{epochs} epochs logged, checkpoint in {self.checkpoints.name}/"

    def move_aside(self) -> Path | None:
        """Rename the folder to `<name>.replaced-<time>` beside it (nothing is deleted); None when absent."""
        if not self.path.exists():
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}{REPLACED_MARK}{stamp}")
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.path.with_name(f"{self.path.name}{REPLACED_MARK}{stamp}-{suffix}")
        os.replace(self.path, target)
        return target

    def start(self, identity: RunIdentity) -> None:
        """Mark the folder as a run of `identity` (before any other file is written)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.identity_file, {"run_id": identity.run_id, "identity": identity.to_json()})


# -- variants of one recipe in a sweep ---------------------------------------------------------------------------
def variant_folder_name(recipe: str, identity: RunIdentity) -> str:
    return f"{recipe}-{identity.variant_id[:SHORT]}"


def _read_json(path: Path) -> Any:
    """The parsed content of a JSON file of the run layout; None when it is missing, a link or unreadable."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _claimed_variant(folder: Path) -> str | None:
    data = _read_json(folder / VARIANT_FILE)
    value = data.get("variant_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _unclaimed_and_free(folder: Path) -> bool:
    """No variant claimed `folder` and no run recorded anything in it (a folder made by a lock or an empty
    one; a recipe folder of an earlier promptclip holds results and is left to its runs)."""
    if not folder.exists():
        return True
    if not folder.is_dir() or (folder / VARIANT_FILE).exists():
        return False
    return not any(path.name in (RESULTS_FILE, IDENTITY_FILE) for path in folder.rglob("*.json"))


def locate_recipe_folder(recipe_dir: Path, identity: RunIdentity) -> Path:
    """The recipe folder a run of `identity` belongs in: `recipe_dir` when it is free or holds this variant,
    else `<recipe>-<fingerprint>` beside it. Reads only; `claim_recipe_folder` marks the choice."""
    if _unclaimed_and_free(recipe_dir) or _claimed_variant(recipe_dir) == identity.variant_id:
        return recipe_dir
    return recipe_dir.with_name(variant_folder_name(recipe_dir.name, identity))


def claim_recipe_folder(recipe_dir: Path, identity: RunIdentity) -> Path:
    """Claim the folder `locate_recipe_folder` chose (atomically: of two sweeps racing for the plain name,
    one gets it and the other goes to its fingerprinted folder)."""
    folder = locate_recipe_folder(recipe_dir, identity)
    claimed = _claimed_variant(folder)
    if claimed == identity.variant_id:
        return folder
    if claimed is not None:  # a fingerprint prefix shared by two variants: fall back to the whole fingerprint
        folder = recipe_dir.with_name(f"{recipe_dir.name}-{identity.variant_id}")
    folder.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"variant_id": identity.variant_id, "identity": identity.variant_values}, indent=1)
    try:
        fd = os.open(folder / VARIANT_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        if _claimed_variant(folder) == identity.variant_id:
            return folder
        return claim_recipe_folder(recipe_dir, identity)  # lost the race: the plain name is taken now
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(record + "\n")
    return folder
