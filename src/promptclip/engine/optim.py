"""Optimiser and learning-rate schedule of the field's recipe.

SGD (momentum 0.9, weight decay 5e-4, no Nesterov) or AdamW over the learner's trainable tensors only, and a
cosine schedule stepped once per epoch behind a constant warm-up. The schedule reproduces Dassl's
`ConstantWarmupScheduler` wrapped around `CosineAnnealingLR(T_max=epochs)` with `WARMUP_RECOUNT=True`:

* epochs `0 .. W-1` (0-based) run at the constant `warmup_lr`;
* epoch `e >= W` runs at `lr * (1 + cos(pi * (e - W) / epochs)) / 2`: the cosine restarts from its own first
  value when the warm-up ends and keeps `T_max = epochs`, so it never reaches 0 (the last epoch of a 50-epoch
  run with one warm-up epoch sits at `(1 + cos(48 pi / 50)) / 2 = 0.4%` of the base rate).

The value is computed in closed form from the epoch index, so a resumed run needs only that index.

A learner may train some tensors at a multiple of the recipe's rate (`learning_rate_scales`, e.g. DePT's head at
6.5x): they get a parameter group of their own whose cosine starts from `lr * scale`; the warm-up rate is the
same for every group, as in Dassl, whose constant warm-up sets one value for all groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from promptclip.config import OptimConfig

LR_SCALE = "lr_scale"
"""Key of a parameter group's multiple of the scheduled learning rate (absent: 1)."""


def parameter_groups(parameters: Mapping[str, nn.Parameter], scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """The trainable `parameters` (by name) in one group per learning-rate scale, the 1x group first; `scales`
    names the tensors that train at another multiple of the rate."""
    unknown = sorted(set(scales) - set(parameters))
    if unknown:
        raise ValueError(f"learning-rate scales name tensors that are not trainable: {unknown[:5]}")
    bad = {name: scale for name, scale in scales.items() if not (math.isfinite(scale) and scale > 0)}
    if bad:
        raise ValueError(f"learning-rate scales must be numbers greater than 0, got {bad}")
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    for name, param in parameters.items():
        groups.setdefault(float(scales.get(name, 1.0)), []).append(param)
    return [{"params": params, LR_SCALE: scale} for scale, params in groups.items() if params]


def build_optimizer(
    parameters: Iterable[nn.Parameter] | list[dict[str, Any]], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """The optimiser of `cfg` over `parameters` (the learner's trainable tensors, nothing else), or over the
    parameter groups of `parameter_groups`."""
    params: list[Any] = list(parameters)
    if params and isinstance(params[0], dict):
        params = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in params]
        params = [group for group in params if group["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to optimise: the learner has no trainable parameters")
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, dampening=0.0, nesterov=False
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name: unknown optimiser {cfg.name!r}; choose 'sgd' or 'adamw'")


def warmup_cosine_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Learning rate of 0-based `epoch` under the constant warm-up + cosine rule described above."""
    if epoch < warmup_epochs:
        return warmup_lr
    progress = (epoch - max(warmup_epochs, 0)) / max(epochs, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets every parameter group's learning rate for the current epoch; `step()` once per finished epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
        self.optimizer = optimizer
        self.base_lr = cfg.lr
        self.epochs = cfg.epochs
        self.warmup_epochs = max(cfg.warmup_epochs, 0)
        self.warmup_lr = cfg.warmup_lr
        self.epoch = 0
        self._apply()

    def lr_at(self, epoch: int, scale: float = 1.0) -> float:
        """The rate of a group whose tensors train at `scale` times the recipe's (the warm-up is not scaled)."""
        return warmup_cosine_lr(epoch, self.base_lr * scale, self.epochs, self.warmup_epochs, self.warmup_lr)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self) -> None:
        self.epoch += 1
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.epoch, group.get(LR_SCALE, 1.0))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "base_lr": self.base_lr,
            "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs,
            "warmup_lr": self.warmup_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state["base_lr"], state["epochs"], state["warmup_epochs"], state["warmup_lr"])
        current = (self.base_lr, self.epochs, self.warmup_epochs, self.warmup_lr)
        if tuple(float(v) for v in saved) != tuple(float(v) for v in current):
            raise ValueError(
                f"checkpoint schedule (lr, epochs, warmup_epochs, warmup_lr) = {saved} differs from this run's "
                f"{current}; resume with the recipe the run started with"
            )
        self.epoch = int(state["epoch"])
        self._apply()
