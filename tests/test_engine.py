"""The training engine: schedule, accumulation, frozen backbone, non-finite stop, checkpoints, evaluation."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from promptclip.config import OptimConfig
from promptclip.engine.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    load_checkpoint,
    restore_rng_state,
    seed_everything,
)
from promptclip.engine.evaluate import EvalCounts, evaluate
from promptclip.engine.optim import WarmupCosineSchedule, build_optimizer, warmup_cosine_lr
from promptclip.engine.train import NonFiniteLossError, Trainer
from promptclip.methods.base import LearnerOutput, PromptModel
from promptclip.methods.coop import CoOp, CoOpConfig

CLASSES = ["circle", "square", "star"]


def make_coop(clip, seed: int = 0) -> CoOp:
    torch.manual_seed(seed)
    return CoOp(clip, CLASSES, CoOpConfig(n_ctx=4))


def context(learner: PromptModel) -> torch.Tensor:
    return learner.trainable_state()["ctx"]


def make_batches(clip, count: int, size: int, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    side = clip.image_size
    return [
        {
            "image": torch.randn(size, 3, side, side, generator=gen),
            "label": torch.randint(0, len(CLASSES), (size,), generator=gen),
            "path": [f"img{i}_{j}" for j in range(size)],
        }
        for i in range(count)
    ]


def merge(batches: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.cat([b["image"] for b in batches]),
        "label": torch.cat([b["label"] for b in batches]),
        "path": [p for b in batches for p in b["path"]],
    }


def optim_cfg(**changes: Any) -> OptimConfig:
    values: dict[str, Any] = {"lr": 0.5, "epochs": 1, "warmup_epochs": 0}
    values.update(changes)
    return OptimConfig(**values)


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------------


def dassl_lrs(base_lr: float, epochs: int, warmup: int, warmup_lr: float) -> list[float]:
    """Dassl's ConstantWarmupScheduler around torch's CosineAnnealingLR(T_max=epochs), WARMUP_RECOUNT=True,
    stepped once per epoch: the learning rate each epoch trains at."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lrs: list[float] = []
    if warmup <= 0:
        for _ in range(epochs):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            cosine.step()
        return lrs
    last_epoch = 0  # the warm-up scheduler's counter after its construction step
    lr = warmup_lr
    for _ in range(epochs):
        opt.param_groups[0]["lr"] = lr
        lrs.append(lr)
        opt.step()
        if last_epoch >= warmup:
            cosine.step()
            lr = float(cosine.get_last_lr()[0])
        else:
            last_epoch += 1
            lr = warmup_lr if last_epoch < warmup else float(cosine.get_last_lr()[0])
    return lrs


@pytest.mark.parametrize(("epochs", "warmup"), [(10, 1), (50, 1), (7, 0), (6, 2)])
def test_schedule_matches_the_fields_constant_warmup_cosine(epochs: int, warmup: int) -> None:
    cfg = OptimConfig(lr=0.002, epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-5)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([param], cfg)
    schedule = WarmupCosineSchedule(opt, cfg)
    ours = []
    for _ in range(epochs):
        ours.append(opt.param_groups[0]["lr"])
        schedule.step()
    reference = dassl_lrs(0.002, epochs, warmup, 1e-5)
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-15)
    if warmup:
        assert ours[:warmup] == [1e-5] * warmup
        assert ours[warmup] == pytest.approx(0.002)  # the cosine restarts at its first value after warm-up


def test_schedule_values_epoch_by_epoch() -> None:
    # 5 epochs, one warm-up epoch: 1e-5, then base * (1 + cos(pi * t / 5)) / 2 for t = 0..3.
    expected = [1e-5] + [0.002 * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(4)]
    got = [warmup_cosine_lr(e, 0.002, 5, 1, 1e-5) for e in range(5)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[-1] == pytest.approx(0.002 * (1 + math.cos(3 * math.pi / 5)) / 2)


def test_optimizer_is_sgd_with_the_fields_defaults() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([param], OptimConfig())
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 5e-4, False)
    assert isinstance(build_optimizer([param], OptimConfig(name="adamw")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1), requires_grad=False)], OptimConfig())


# ---------------------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_the_large_batch(tiny_clip) -> None:
    batches = make_batches(tiny_clip, 3, 4)
    # Reference: batches 1+2 as one batch of 8, then batch 3 alone: two optimiser steps.
    big = make_coop(tiny_clip)
    Trainer(big, [merge(batches[:2]), batches[2]], optim_cfg(), progress=False).fit()
    # Accumulating two micro-batches per step; the last, partial group has one micro-batch.
    accumulated = make_coop(tiny_clip)
    result = Trainer(accumulated, batches, optim_cfg(grad_accum=2), progress=False).fit()
    assert result.steps == 2
    start = make_coop(tiny_clip).ctx.detach()
    update_big, update_accumulated = big.ctx.detach() - start, accumulated.ctx.detach() - start
    scale = update_big.abs().max()
    assert scale > 1e-3
    # Equal up to float32 summation order (relative to the size of the update).
    torch.testing.assert_close(update_accumulated, update_big, rtol=0, atol=1e-5 * float(scale))
    # Dividing every micro-batch by grad_accum (instead of by its group's size) would be far off.
    assert (update_accumulated - update_big).abs().max() < 0.01 * scale


def test_only_trainable_tensors_change_and_the_backbone_is_bitwise_unchanged(tiny_clip) -> None:
    learner = make_coop(tiny_clip)
    backbone = {k: v.clone() for k, v in learner.clip.state_dict().items()}
    ctx_before = learner.ctx.detach().clone()
    trainer = Trainer(learner, make_batches(tiny_clip, 2, 4), optim_cfg(), progress=False)
    assert [id(p) for g in trainer.optimizer.param_groups for p in g["params"]] == [id(learner.ctx)]
    trainer.fit()
    assert not torch.equal(learner.ctx, ctx_before)
    after = learner.clip.state_dict()
    assert all(torch.equal(backbone[k], after[k]) for k in backbone)


class RecordsEpochs(CoOp):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, int, int]] = []

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.events.append(("start", epoch, epochs))

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        self.events.append(("end", epoch, epochs))


def test_epoch_hooks_run_around_every_epoch_also_after_a_resume(tiny_clip, tmp_path: Path) -> None:
    learner = RecordsEpochs(tiny_clip, CLASSES, CoOpConfig(n_ctx=4))
    cfg = optim_cfg(epochs=3)
    with pytest.raises(Interrupt):
        Trainer(learner, make_batches(tiny_clip, 1, 4), cfg, run_dir=tmp_path, callbacks=[stop_after(1)]).fit()
    assert learner.events == [("start", 0, 3), ("end", 0, 3)]
    learner.events.clear()
    Trainer(learner, make_batches(tiny_clip, 1, 4), cfg, run_dir=tmp_path).fit(resume=True)
    assert learner.events == [("start", 1, 3), ("end", 1, 3), ("start", 2, 3), ("end", 2, 3)]


class NaNOnEpochLoader:
    """Batches whose images turn to NaN at (epoch, batch): the loss becomes NaN there."""

    def __init__(self, batches: list[dict[str, Any]], bad_epoch: int, bad_batch: int) -> None:
        self.batches = batches
        self.bad = (bad_epoch, bad_batch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, batch in enumerate(self.batches):
            if (self.epoch, index) == self.bad:
                batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
            yield batch


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_clip, tmp_path: Path) -> None:
    learner = make_coop(tiny_clip)
    loader = NaNOnEpochLoader(make_batches(tiny_clip, 3, 4), bad_epoch=1, bad_batch=1)
    trainer = Trainer(learner, loader, optim_cfg(epochs=3), run_dir=tmp_path, progress=False)
    after_first_epoch: list[torch.Tensor] = []
    trainer.callbacks.append(lambda epoch, t: after_first_epoch.append(context(t.learner).clone()))
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit()
    err = caught.value
    assert (err.epoch, err.batch_index, err.step) == (1, 1, 4)  # 3 steps in epoch 1, then 1 more
    assert "epoch 2, batch 1" in str(err) and "img1_0" in str(err)
    saved = load_checkpoint(checkpoint_path(tmp_path))
    assert saved.epoch == 1 and saved.global_step == 3
    assert torch.equal(saved.trainable["ctx"], after_first_epoch[0])
    assert len(after_first_epoch) == 1


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------------------


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    seed_everything(3)
    generator = torch.Generator().manual_seed(11)
    state = capture_rng_state({"loader": generator})
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    seed_everything(99)
    torch.rand(5, generator=generator)
    restore_rng_state(torch.load(path, weights_only=True), {"loader": generator})
    got = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    assert got == expected


class Interrupt(Exception):
    pass


def stop_after(epoch_count: int):
    def callback(epoch: int, trainer: Trainer) -> None:
        if epoch == epoch_count:
            raise Interrupt

    return callback


def seeded_loader(clip) -> Any:
    """A real loader over synthetic images (random crops and shuffling seeded from (seed, epoch))."""
    from promptclip.data.datasets import build_dataset
    from promptclip.data.loader import build_loader

    splits = build_dataset("synthetic_shapes", train_per_class=2, val_per_class=1, test_per_class=1, image_size=32)
    return build_loader(splits, "train", batch_size=6, image_size=clip.image_size, seed=5)


def test_resume_after_an_interruption_matches_an_uninterrupted_run_bitwise(tiny_clip, tmp_path: Path) -> None:
    cfg = OptimConfig(lr=0.05, epochs=3, warmup_epochs=1, warmup_lr=1e-3)

    def run(run_dir: Path, resume: bool, callbacks=()) -> Trainer:
        seed_everything(1)
        learner = CoOp(tiny_clip, [f"class {i}" for i in range(10)], CoOpConfig(n_ctx=4))
        trainer = Trainer(learner, seeded_loader(tiny_clip), cfg, run_dir=run_dir, progress=False, callbacks=callbacks)
        trainer.fit(resume=resume)
        return trainer

    straight = run(tmp_path / "straight", resume=False)
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", resume=False, callbacks=[stop_after(1)])
    assert load_checkpoint(checkpoint_path(tmp_path / "cut")).epoch == 1
    resumed = run(tmp_path / "cut", resume=True)
    assert torch.equal(context(resumed.learner), context(straight.learner))
    assert resumed.global_step == straight.global_step
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    (resumed_state,) = resumed.optimizer.state.values()
    (straight_state,) = straight.optimizer.state.values()
    assert torch.equal(resumed_state["momentum_buffer"], straight_state["momentum_buffer"])
    lines = [line for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(lines) == 3  # one line per epoch, none duplicated by the resume


def test_resume_refuses_a_checkpoint_of_another_configuration(tiny_clip, tmp_path: Path) -> None:
    first = Trainer(
        make_coop(tiny_clip), make_batches(tiny_clip, 1, 4), optim_cfg(), run_dir=tmp_path, fingerprint="a" * 64
    )
    first.fit()
    other = Trainer(
        make_coop(tiny_clip), make_batches(tiny_clip, 1, 4), optim_cfg(), run_dir=tmp_path, fingerprint="b" * 64
    )
    with pytest.raises(ValueError, match="another configuration"):
        other.fit(resume=True)


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


class FixedLogits(PromptModel):
    """Returns the logits carried by the batch, so the expected counts are known exactly."""

    name = "fixed"

    def __init__(self, clip, classnames) -> None:
        super().__init__(clip, classnames, cfg=None)

    def forward(self, batch):  # type: ignore[override]
        return LearnerOutput(batch["logits"], batch["logits"], batch["logits"])


def test_evaluate_returns_exact_per_class_counts(tiny_clip) -> None:
    learner = FixedLogits(tiny_clip, ["a", "b", "c"])
    eye = torch.eye(3)
    # predictions: 0, 0, 1, 2, 2, 2 ; labels: 0, 1, 1, 2, 2, 0
    batches = [
        {"logits": eye[[0, 0, 1]], "label": torch.tensor([0, 1, 1])},
        {"logits": eye[[2, 2, 2]], "label": torch.tensor([2, 2, 0])},
    ]
    counts = evaluate(learner, batches, device="cpu")
    assert counts.correct == [1, 1, 2] and counts.total == [2, 2, 2]
    assert counts.accuracy == pytest.approx(100 * 4 / 6)
    assert counts.macro_accuracy == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)
    assert EvalCounts.from_dict(counts.to_dict()) == counts


def test_evaluate_is_micro_over_imbalanced_classes_and_checks_labels(tiny_clip) -> None:
    learner = FixedLogits(tiny_clip, ["a", "b"])
    batch = {"logits": torch.eye(2)[[0, 0, 0, 1]], "label": torch.tensor([0, 0, 0, 0])}
    counts = evaluate(learner, [batch], device="cpu")
    assert (counts.accuracy, counts.macro_accuracy) == (75.0, 75.0)
    assert counts.per_class_accuracy() == [75.0, None]
    with pytest.raises(ValueError, match="outside the 2 classes"):
        evaluate(learner, [{"logits": torch.eye(2), "label": torch.tensor([0, 2])}], device="cpu")


def test_evaluate_encodes_the_class_texts_once(tiny_clip) -> None:
    learner = make_coop(tiny_clip)
    calls: list[int] = []
    original = learner.compute_text_features

    def counted() -> torch.Tensor:
        calls.append(1)
        return original()

    learner.compute_text_features = counted  # type: ignore[method-assign]
    batches = make_batches(tiny_clip, 4, 3)
    counts = evaluate(learner, batches, device="cpu")
    assert len(calls) == 1
    assert counts.num_samples == 12
    assert learner.training  # evaluation restores the mode it found
    counts_new = evaluate(learner, batches, classnames=["one", "two", "three"], device="cpu")
    assert learner.classnames == ["one", "two", "three"] and len(calls) == 2
    assert counts_new.classnames == ["one", "two", "three"]


def test_resume_restores_a_learners_training_state_bitwise(tiny_clip, tmp_path: Path) -> None:
    """PromptSRC's Gaussian prompt aggregation keeps a running sum across epochs; the checkpoint carries it, so
    a resumed run ends with exactly the aggregate of an uninterrupted one."""
    from promptclip.methods.promptsrc import PromptSRC, PromptSRCConfig

    cfg = OptimConfig(lr=0.05, epochs=3, warmup_epochs=1, warmup_lr=1e-3)
    method_cfg = PromptSRCConfig(n_ctx_text=2, n_ctx_vision=2, depth_text=2, depth_vision=2, gpa_mean=1.0, gpa_std=1.0)

    def run(run_dir: Path, resume: bool, callbacks=()) -> Trainer:
        seed_everything(1)
        learner = PromptSRC(tiny_clip, [f"class {i}" for i in range(10)], method_cfg)
        trainer = Trainer(learner, seeded_loader(tiny_clip), cfg, run_dir=run_dir, progress=False, callbacks=callbacks)
        trainer.fit(resume=resume)
        return trainer

    straight = run(tmp_path / "straight", resume=False)
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", resume=False, callbacks=[stop_after(1)])
    resumed = run(tmp_path / "cut", resume=True)
    straight_state, resumed_state = straight.learner.trainable_state(), resumed.learner.trainable_state()
    assert straight_state.keys() == resumed_state.keys()
    for key, tensor in straight_state.items():
        assert torch.equal(resumed_state[key], tensor), key
