"""Plug-ins: learners that hold an inner learner and keep the same contract, so they stack
(`maple+dapt`, `coop+dpc`) and the engine cannot tell them from a method.

`PluginModel` forwards every call of the contract to the inner learner; a plug-in overrides only what it
changes (DAPT: `loss`; DPC: the parameters the inner learner runs with). No backbone or method code is copied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptclip.config import from_dict, to_dict
from promptclip.methods.base import Batch, LearnerOutput, PromptModel


@dataclass
class PluginContext:
    """What the runner supplies to plug-ins beyond the inner learner."""

    splits: Any = None
    """The training run's DatasetSplits (after few-shot sampling and the class subset)."""
    seed: int = 1
    run_dir: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    """Protocol-specific inputs (e.g. DPC's stage-1 prompt folder)."""


class PluginModel(PromptModel):
    """Base of every plug-in: the contract of the inner learner, unchanged until overridden."""

    def __init__(self, inner: PromptModel, cfg: Any, context: PluginContext | None = None) -> None:
        super().__init__(inner.clip, inner.classnames, cfg, inner.template)
        self.inner = inner
        self.context = context or PluginContext()

    # -- the contract, forwarded --------------------------------------------------------------------------
    @property
    def has_visual_prompts(self) -> bool:  # type: ignore[override]
        return self.inner.has_visual_prompts

    @property
    def image_conditioned_text(self) -> bool:  # type: ignore[override]
        return getattr(self.inner, "image_conditioned_text", False)

    @property
    def transductive(self) -> bool:
        return bool(getattr(self.inner, "transductive", False))

    def compute_text_features(self) -> torch.Tensor:
        return self.inner.compute_text_features()

    def encode_classnames(self, names: Sequence[str]) -> torch.Tensor:
        return self.inner.encode_classnames(names)

    def text_features(self) -> torch.Tensor:
        return self.inner.text_features()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.image_features(images)

    def forward(self, batch: Batch) -> LearnerOutput:
        return self.inner(batch)

    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        return self.inner.loss(batch, output)

    def set_classnames(self, names: Sequence[str]) -> None:
        self.inner.set_classnames(names)
        super().set_classnames(names)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.inner.on_epoch_start(epoch, epochs)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        self.inner.on_epoch_end(epoch, epochs)

    def invalidate_cache(self) -> None:
        super().invalidate_cache()
        if "inner" in self._modules:
            self.inner.invalidate_cache()

    def extra_state_buffers(self) -> dict[str, torch.Tensor]:
        return {f"inner.{k}": v for k, v in self.inner.extra_state_buffers().items()}

    def describe(self) -> dict[str, Any]:
        inner = self.inner.describe()
        return {**inner, "plugins": {**inner["plugins"], self.name: to_dict(self.cfg)}}


def wrap_with_plugins(
    learner: PromptModel, plugins: Mapping[str, Any], context: PluginContext | None = None
) -> PromptModel:
    """Wrap `learner` in each plug-in of `plugins` (name -> config instance or plain mapping), in order."""
    from promptclip.plugins import load_all
    from promptclip.registry import PLUGINS

    load_all()
    for name, cfg in plugins.items():
        plugin_cls = PLUGINS.get(name)
        if isinstance(cfg, Mapping):
            cfg = from_dict(plugin_cls.Config, cfg, where=f"plugins.{name}")
        learner = plugin_cls(learner, cfg, context)
    return learner
