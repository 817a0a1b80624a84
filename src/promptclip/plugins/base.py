"""Plug-ins: learners that hold an inner learner and keep the same contract, so they stack
(`maple+dapt`, `coop+dpc`) and the engine cannot tell them from a method.

`PluginModel` forwards every call of the contract to the inner learner; a plug-in overrides only what it
changes (DAPT: `loss`; DPC: the parameters the inner learner runs with). No backbone or method code is copied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from promptclip.config import to_dict
from promptclip.methods.base import (
    Batch,
    EvalSubset,
    LearnerOutput,
    PluginContext,
    PromptModel,
    wrap_with_plugins,
)

__all__ = ["PluginContext", "PluginModel", "wrap_with_plugins"]


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
    def transductive(self) -> bool:  # type: ignore[override]
        return self.inner.transductive

    @property
    def encodes_sentences(self) -> bool:  # type: ignore[override]
        return self.inner.encodes_sentences

    def encode_sentences(self, sentences: Sequence[str]) -> torch.Tensor:
        return self.inner.encode_sentences(sentences)

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

    def set_template(self, template: str) -> None:
        self.inner.set_template(template)
        super().set_template(template)

    def set_eval_subset(self, which: EvalSubset) -> None:
        self.inner.set_eval_subset(which)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The inner learner's (e.g. PromptSRC's running aggregate) under `inner.`, so a plug-in over any
        learner resumes exactly; plug-ins with state of their own add to it."""
        return {f"inner.{k}": v for k, v in self.inner.training_state().items()}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        prefix = "inner."
        self.inner.load_training_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

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

    def learning_rate_scales(self) -> dict[str, float]:
        """The inner learner's (under `inner.`, the name its tensors have here); plug-ins add their own."""
        return {f"inner.{k}": v for k, v in self.inner.learning_rate_scales().items()}

    def describe(self) -> dict[str, Any]:
        inner = self.inner.describe()
        return {**inner, "plugins": {**inner["plugins"], self.name: to_dict(self.cfg)}}
