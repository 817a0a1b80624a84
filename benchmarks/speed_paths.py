"""The naive paths the benchmarks compare promptclip's own against: how the field's code runs each method.

Each function or context manager here switches one optimisation off and computes the same thing the slow way:

* `full_context(clip)`: text sequences run over all 77 positions (no cut after the last end-of-text token);
* `reencode_text_per_batch(learner)`: evaluation encodes every class prompt again for every test batch
  (`forget_class_features` also makes training encode a frozen template at every step, as VPT's code does);
* `cocoop_one_image_at_a_time(learner, batch)`: CoCoOp's per-image prompts encoded one image per text pass
  (the official code's loop, which is why it trains at batch size 1);
* `dapt_three_passes(learner, batch)`: DAPT's whole, foreground and background views through three separate
  image passes, each with its autograd graph (the official code's);
* `dapt_targets_with_graph(learner)`: DAPT's stop-gradient views encoded with an autograd graph that is never
  used, in the same passes as promptclip's path;
* `dapt_one_graph_pass(learner)`: all three DAPT views in one batched pass with the graph (promptclip's
  earlier path);
* `dpc_rescoring(learner)`: DPC's hard-negative sampler encodes the stage-1 class features at every step
  instead of once per class set;
* `promptkd_teacher_every_epoch(learner)`: PromptKD's frozen teacher encodes the training images at every epoch
  even when their pixels repeat (no teacher feature cache).

tests/test_speed_paths.py checks that every naive path gives the optimised path's outputs and gradients
within float tolerance, so the benchmark compares two ways of computing the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from promptclip.clip.model import CLIP
from promptclip.methods.base import LearnerOutput, PromptModel
from promptclip.methods.promptkd import PromptKD, TeacherFeatureCache

Batch = Mapping[str, Any]


@contextlib.contextmanager
def full_context(clip: CLIP) -> Iterator[None]:
    """Text towers run on the full context length while inside."""
    previous = clip.truncate_text
    clip.truncate_text = False
    try:
        yield
    finally:
        clip.truncate_text = previous


def forget_class_features(learner: PromptModel) -> None:
    """Drop every cached class feature, a frozen template's too (VPT's text side): the field's code encodes
    the class prompts at every forward."""
    current: Any = learner
    while isinstance(current, PromptModel):
        current.invalidate_cache()
        if getattr(current, "_frozen_text_cache", None) is not None:
            current._frozen_text_cache = None
        current = getattr(current, "inner", None)


def reencode_text_per_batch(learner: PromptModel, batch: Batch) -> torch.Tensor:
    """Evaluation logits of one batch with the class features encoded again (the caches emptied)."""
    forget_class_features(learner)
    return learner(batch).logits


def cocoop_one_image_at_a_time(learner: PromptModel, batch: Batch) -> LearnerOutput:
    """CoCoOp's output for a batch, computed one image per pass (the logits of each image stacked)."""
    images = batch["image"]
    outputs = [learner({"image": images[i : i + 1]}) for i in range(images.shape[0])]
    return LearnerOutput(
        logits=torch.cat([o.logits for o in outputs]),
        image_features=torch.cat([o.image_features for o in outputs]),
        text_features=torch.cat([o.text_features for o in outputs]),
    )


def cocoop_loss_one_image_at_a_time(learner: PromptModel, batch: Batch) -> torch.Tensor:
    """The batch's mean loss, accumulated image by image so each image's text activations are freed after
    its own backward pass (the official loop at batch size 1, with gradient accumulation to batch B).
    Calls backward itself and returns the detached mean loss."""
    images, labels = batch["image"], batch["label"]
    count = images.shape[0]
    total = torch.zeros(())
    for i in range(count):
        single = {"image": images[i : i + 1], "label": labels[i : i + 1]}
        output = learner(single)
        loss = torch.stack([t.float() for t in learner.loss(single, output).values()]).sum() / count
        loss.backward()
        total += loss.detach()
    return total


def dapt_three_passes(learner: Any, batch: Batch) -> LearnerOutput:
    """DAPT's training output with the whole image, foreground and background in three image passes."""
    from promptclip.plugins.dapt import DAPTOutput

    mask = learner.step_mask(batch)
    if mask is None:
        return learner.inner(batch)
    images = batch["image"]
    whole = learner.inner({"image": images})
    foreground = learner.inner({"image": learner.foreground(images, mask)})
    background = learner.inner({"image": learner.background(images, mask)})
    per_image = whole.text_features.dim() == 3
    return DAPTOutput(
        logits=whole.logits,
        image_features=whole.image_features,
        text_features=whole.text_features,
        foreground_features=foreground.image_features,
        background_features=background.image_features,
        foreground_text_features=foreground.text_features if per_image else whole.text_features,
    )


@contextlib.contextmanager
def dapt_targets_with_graph(learner: Any) -> Iterator[None]:
    """DAPT's stop-gradient views keep an autograd graph while inside (detached only where the loss reads
    them), as in the official code."""
    learner.target_pass = contextlib.nullcontext  # an instance attribute shadows the method
    try:
        yield
    finally:
        del learner.target_pass


@contextlib.contextmanager
def dapt_one_graph_pass(learner: Any) -> Iterator[None]:
    """All DAPT views go through the whole image's pass, with its graph, while inside."""
    learner.views_in_graph = lambda views: views
    try:
        yield
    finally:
        del learner.views_in_graph


@contextlib.contextmanager
def dpc_rescoring(learner: Any) -> Iterator[None]:
    """DPC's sampler encodes the stage-1 class features at every step while inside."""

    def encode_every_time() -> torch.Tensor:
        with torch.no_grad():
            return learner.inner.encode_classnames(learner.classnames).float()

    learner.stage1_class_features = encode_every_time  # an instance attribute shadows the method
    try:
        yield
    finally:
        del learner.stage1_class_features


@contextlib.contextmanager
def promptkd_teacher_every_epoch(learner: PromptKD) -> Iterator[None]:
    """PromptKD's teacher encodes every training batch while inside; the features kept before stay kept."""
    kept = learner.teacher_cache
    learner.teacher_cache = TeacherFeatureCache(0)
    try:
        yield
    finally:
        learner.teacher_cache = kept
