"""Seeding, random-number-generator snapshots and the per-epoch training checkpoint.

`checkpoints/last.pt` holds what a resumed run needs to continue exactly where an uninterrupted run would
be: the trainable tensors, the optimiser, the schedule, the gradient scaler, the epoch and step counters and
the states of every random number generator (python, numpy, torch CPU and CUDA, plus any named generator
such as a data loader's). It contains only tensors, numbers, strings, lists and dicts, so it is read back
with `torch.load(weights_only=True)`: no pickled objects, nothing executed on load. It is written atomically,
and only after a finished epoch, so a crash or a stop on a non-finite loss leaves the last good one in place.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptclip.io import atomic_write_with

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which file and what to do."""


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


def save_checkpoint(path: str | Path, checkpoint: TrainingCheckpoint) -> Path:
    path = Path(path)
    payload = checkpoint.to_payload()
    atomic_write_with(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_checkpoint(path: str | Path) -> TrainingCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from; start the run without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
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
