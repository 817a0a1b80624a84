"""Seeding, random-number-generator snapshots and the per-epoch training checkpoint.

`checkpoints/last.pt` holds what a resumed run needs to continue exactly where an uninterrupted run would
be: the trainable tensors, the optimiser, the schedule, the gradient scaler, the epoch and step counters and
the states of every random number generator (python, numpy, torch CPU and CUDA, plus any named generator
such as a data loader's). It contains only tensors, numbers, strings, lists and dicts, so it is read back
with `torch.load(weights_only=True)`: no pickled objects, nothing executed on load. It is written atomically,
and only after a finished epoch, so a crash or a stop on a non-finite loss leaves the last good one in place.

The file ends with a footer holding the sha256 of everything before it, checked on load: a checkpoint cut
short or changed on disk is refused with its name instead of being resumed from. Before a new `last.pt`
replaces the one a run wrote before, that one is kept as `previous.pt` (a hard link, no copy), and a resume
whose `last.pt` is damaged continues from `previous.pt`. (Files without the footer, written before it
existed, are read unchecked.)
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptclip.io import atomic_write_bytes

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
PREVIOUS_CHECKPOINT = "previous.pt"
CHECKSUM_MARK = b"\nPROMPTCLIP-SHA256:"
FOOTER_SIZE = len(CHECKSUM_MARK) + 64 + 1  # mark, hex digest, newline


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which file and what to do."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose content does not match the checksum written with it."""


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---------------------------------------------------------------------------------------------------------
# RNG snapshots as plain tensors (loadable with weights_only=True)
# ---------------------------------------------------------------------------------------------------------


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["gauss"])))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    saved_generators = state.get("generators") or {}
    for name, gen in (generators or {}).items():
        if name in saved_generators:
            gen.set_state(saved_generators[name])


# ---------------------------------------------------------------------------------------------------------
# The checkpoint file
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainingCheckpoint:
    """Everything a resumed run restores. `epoch` counts finished epochs."""

    epoch: int
    global_step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    scaler: dict[str, Any] | None = None
    fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "trainable": {k: v.detach().to("cpu").clone() for k, v in self.trainable.items()},
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "rng": self.rng,
            "fingerprint": self.fingerprint,
            "extra": self.extra,
        }


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def previous_checkpoint_path(path: str | Path) -> Path:
    """Where the checkpoint `path` replaces is kept (`previous.pt` beside it)."""
    return Path(path).with_name(PREVIOUS_CHECKPOINT)


def encode_checkpoint(payload: Mapping[str, Any]) -> bytes:
    """`torch.save` bytes of `payload` followed by the checksum footer."""
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    body = buffer.getvalue()
    return body + CHECKSUM_MARK + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n"


def checked_body(path: Path, data: bytes) -> bytes:
    """The `torch.save` bytes of a checkpoint file, after checking its footer's sha256."""
    footer = data[-FOOTER_SIZE:]
    if len(data) < FOOTER_SIZE or not footer.startswith(CHECKSUM_MARK):
        return data  # written before checksums existed; torch.load still refuses a truncated archive
    body, recorded = data[:-FOOTER_SIZE], footer[len(CHECKSUM_MARK) : -1].decode("ascii", "replace")
    actual = hashlib.sha256(body).hexdigest()
    if actual != recorded:
        raise DamagedCheckpointError(
            f"{path}: damaged checkpoint: its content has sha256 {actual[:12]}..., not the {recorded[:12]}... "
            f"recorded when it was written (the file was cut short or changed on disk). Resume with --resume "
            f"(it falls back to {PREVIOUS_CHECKPOINT} when that is intact), or delete {path.parent} to train "
            "from the start"
        )
    return body


def save_checkpoint(path: str | Path, checkpoint: TrainingCheckpoint, keep_previous: bool = False) -> Path:
    """Write `checkpoint` atomically with its checksum; with `keep_previous`, the file it replaces is kept as
    `previous.pt` first, so one good checkpoint survives whatever happens to the new one."""
    path = Path(path)
    data = encode_checkpoint(checkpoint.to_payload())
    if keep_previous and path.is_file():
        _keep_as_previous(path)
    atomic_write_bytes(path, data, fault="mid_checkpoint")
    return path


def _keep_as_previous(path: Path) -> None:
    """Make `previous.pt` the current `path`: a hard link under a temporary name renamed into place, so both
    names always hold a complete file (a copy where the file system has no hard links)."""
    previous = previous_checkpoint_path(path)
    staging = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(path, staging)
    except OSError:
        shutil.copy2(path, staging)
    os.replace(staging, previous)


def load_checkpoint(path: str | Path) -> TrainingCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from; start the run without --resume")
    try:
        body = checked_body(path, path.read_bytes())
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except DamagedCheckpointError:
        raise
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise CheckpointError(
            f"{path}: cannot be read as a training checkpoint ({type(err).__name__}: {err}); delete it to "
            "start the run again"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a promptclip training checkpoint (format {CHECKPOINT_FORMAT})")
    return TrainingCheckpoint(
        epoch=int(payload["epoch"]),
        global_step=int(payload["global_step"]),
        trainable=dict(payload["trainable"]),
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        rng=payload["rng"],
        scaler=payload.get("scaler"),
        fingerprint=payload.get("fingerprint"),
        extra=payload.get("extra") or {},
    )


def load_resume_checkpoint(
    path: str | Path, log: Callable[[str], None] | None = None
) -> tuple[TrainingCheckpoint, Path] | None:
    """The checkpoint a resumed run continues from: `path` (`last.pt`), or `previous.pt` beside it when
    `path` is missing, damaged or unreadable (said through `log`). None when neither file exists; a
    `CheckpointError` naming both files when neither can be used."""
    path = Path(path)
    previous = previous_checkpoint_path(path)
    problems: list[str] = []
    for candidate in (path, previous):
        if not candidate.is_file():
            continue
        try:
            checkpoint = load_checkpoint(candidate)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems and log is not None:
            log(f"warning: {problems[0]}")
            log(f"resuming from the previous checkpoint instead: {candidate} (epoch {checkpoint.epoch})")
        return checkpoint, candidate
    if not problems:
        return None
    raise CheckpointError(
        "no usable checkpoint to resume from:\n  "
        + "\n  ".join(problems)
        + f"\ndelete {path.parent} and run again without --resume to train from the start"
    )
