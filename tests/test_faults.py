"""Fault injection: a run killed at any moment (SIGKILL mid-epoch, mid-checkpoint write, mid-results write)
resumes to bitwise the same numbers; damaged checkpoints are refused and the previous one is used; a full
disk leaves every file as it was and says so; a non-finite loss stops with the step named.

The kills are real: `promptclip train` runs in a subprocess with `PROMPTCLIP_FAULT` set (see
`promptclip.faults`), which sends SIGKILL to the process at the named point.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import promptclip.io as io_module
from promptclip.config import OptimConfig
from promptclip.engine.checkpoint import (
    FOOTER_SIZE,
    CheckpointError,
    DamagedCheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_resume_checkpoint,
    previous_checkpoint_path,
    seed_everything,
)
from promptclip.engine.train import MetricsFile, NonFiniteLossError, Trainer
from promptclip.faults import FaultSpecError, parse_fault_spec
from promptclip.io import DiskFullError, atomic_write_json, atomic_write_with
from promptclip.locks import pid_is_running
from promptclip.methods.coop import CoOp, CoOpConfig
from promptclip.recipes import resolve_recipe

RECIPE = resolve_recipe("smoke/coop")
# 3 epochs of 2 optimiser steps (10 classes x 2 shots, batch 8, last partial batch dropped).
OPTS = ["optim.epochs", "3", "optim.lr", "0.05"]


# ---------------------------------------------------------------------------------------------------------
# Real kills of `promptclip train` in a subprocess
# ---------------------------------------------------------------------------------------------------------


def promptclip_train(run_dir: Path, cache: Path, *flags: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PROMPTCLIP_CACHE"] = str(cache)
    env.pop("PROMPTCLIP_FAULT", None)
    if fault is not None:
        env["PROMPTCLIP_FAULT"] = fault
    argv = ["train", "--recipe", str(RECIPE), "--output", str(run_dir), "--quiet", "--no-progress", *flags]
    return subprocess.run(
        [sys.executable, "-m", "promptclip.cli", *argv, "--opts", *OPTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every killed-and-resumed run is compared with."""
    base = tmp_path_factory.mktemp("straight")
    done = promptclip_train(base / "run", base / "cache")
    assert done.returncode == 0, done.stderr
    return base / "run"


def epoch_lines(run_dir: Path) -> list[tuple[int, float, float, int]]:
    records = MetricsFile(run_dir / "metrics.jsonl").read()
    return [(r["epoch"], r["lr"], r["loss"], r["steps"]) for r in records if "epoch" in r and "eval" not in r]


def temporaries(run_dir: Path) -> list[Path]:
    folders = (run_dir, run_dir / "checkpoints", run_dir / "prompt")
    return sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_same_run(resumed: Path, straight: Path) -> None:
    a, b = json.loads((resumed / "results.json").read_text()), json.loads((straight / "results.json").read_text())
    assert a["evaluations"] == b["evaluations"]  # per-class integer counts
    assert a["run_id"] == b["run_id"] and a["train"]["steps"] == b["train"]["steps"] == 6
    assert a["train"]["final_loss"] == b["train"]["final_loss"]
    prompt_a = load_file(str(resumed / "prompt" / "prompt.safetensors"))
    prompt_b = load_file(str(straight / "prompt" / "prompt.safetensors"))
    assert prompt_a.keys() == prompt_b.keys() and all(torch.equal(prompt_a[k], prompt_b[k]) for k in prompt_a)
    assert epoch_lines(resumed) == epoch_lines(straight)
    assert [line[0] for line in epoch_lines(resumed)] == [1, 2, 3]


def check_killed_mid_epoch(run_dir: Path) -> None:
    assert load_checkpoint(checkpoint_path(run_dir)).epoch == 1  # the step of epoch 2 is lost, nothing else
    assert [line[0] for line in epoch_lines(run_dir)] == [1]


def check_killed_mid_checkpoint(run_dir: Path) -> None:
    # The half-written epoch-2 checkpoint stayed a temporary file; last.pt is still the intact epoch 1.
    (half,) = [p for p in temporaries(run_dir) if p.name.startswith(".last.pt.")]
    assert half.stat().st_size > 0
    assert load_checkpoint(checkpoint_path(run_dir)).epoch == 1
    assert [line[0] for line in epoch_lines(run_dir)] == [1, 2]  # epoch 2's line came before its checkpoint


def check_killed_mid_results(run_dir: Path) -> None:
    (half,) = [p for p in temporaries(run_dir) if p.name.startswith(".results.json.")]
    with pytest.raises(json.JSONDecodeError):
        json.loads(half.read_text())  # what a non-atomic writer would have left as results.json
    assert load_checkpoint(checkpoint_path(run_dir)).epoch == 3
    assert (run_dir / "prompt" / "prompt.safetensors").is_file()


KILLS = {
    "after_step:3": check_killed_mid_epoch,  # the first step of epoch 2
    "mid_checkpoint:2": check_killed_mid_checkpoint,
    "mid_results": check_killed_mid_results,
}


@pytest.mark.parametrize("fault", list(KILLS))
def test_a_run_killed_at_any_point_resumes_to_the_same_numbers(fault: str, straight: Path, tmp_path: Path) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    killed = promptclip_train(run_dir, cache, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run_dir / "results.json").exists()  # the run does not count as finished
    KILLS[fault](run_dir)
    assert not pid_is_running(json.loads((run_dir / ".lock").read_text())["pid"])  # left by the dead process

    resumed = promptclip_train(run_dir, cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "log.txt").read_text()
    assert "took over the lock left by pid" in log
    assert_same_run(run_dir, straight)
    assert temporaries(run_dir) == []  # the killed attempt's half-written files are cleaned up
    assert not (run_dir / ".lock").exists()


# ---------------------------------------------------------------------------------------------------------
# Damaged checkpoints (in-process, on the tiny CLIP)
# ---------------------------------------------------------------------------------------------------------


def seeded_loader(clip) -> Any:
    from promptclip.data.datasets import build_dataset
    from promptclip.data.loader import build_loader

    splits = build_dataset("synthetic_shapes", train_per_class=2, val_per_class=1, test_per_class=1, image_size=32)
    return build_loader(splits, "train", batch_size=6, image_size=clip.image_size, seed=5)


class Interrupt(Exception):
    pass


def stop_after(count: int):
    def callback(epoch: int, trainer: Trainer) -> None:
        if epoch == count:
            raise Interrupt

    return callback


CFG = OptimConfig(lr=0.05, epochs=3, warmup_epochs=1, warmup_lr=1e-3)


def trainer_for(clip, run_dir: Path, callbacks=(), messages: list[str] | None = None, **options: Any) -> Trainer:
    seed_everything(1)
    learner = CoOp(clip, [f"class {i}" for i in range(10)], CoOpConfig(n_ctx=4))
    log = messages.append if messages is not None else None
    return Trainer(
        learner, seeded_loader(clip), CFG, run_dir=run_dir, progress=False, callbacks=callbacks, log=log, **options
    )


def flip_byte_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[(len(data) - FOOTER_SIZE) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_last_checkpoint_is_refused_and_the_previous_one_resumes_bitwise(tiny_clip, tmp_path: Path) -> None:
    straight = trainer_for(tiny_clip, tmp_path / "straight")
    straight.fit()
    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        trainer_for(tiny_clip, cut, callbacks=[stop_after(2)]).fit()
    last, previous = checkpoint_path(cut), previous_checkpoint_path(checkpoint_path(cut))
    assert (load_checkpoint(last).epoch, load_checkpoint(previous).epoch) == (2, 1)

    flip_byte_in_the_middle(last)
    body = last.read_bytes()[:-FOOTER_SIZE]
    torch.load(io.BytesIO(body), weights_only=True)  # torch itself does not notice: only the checksum does
    with pytest.raises(DamagedCheckpointError, match=rf"{last}: damaged checkpoint.*previous\.pt"):
        load_checkpoint(last)

    def previous_stays_the_good_one(epoch: int, trainer: Trainer) -> None:
        if epoch == 2:  # the first checkpoint after the resume must not keep the damaged file as previous.pt
            assert load_checkpoint(previous).epoch == 1

    messages: list[str] = []
    resumed = trainer_for(tiny_clip, cut, callbacks=[previous_stays_the_good_one], messages=messages)
    result = resumed.fit(resume=True)
    assert result.resumed_from_epoch == 1
    assert any(f"resuming from the previous checkpoint instead: {previous} (epoch 1)" in m for m in messages)
    assert torch.equal(resumed.learner.trainable_state()["ctx"], straight.learner.trainable_state()["ctx"])
    assert resumed.global_step == straight.global_step
    assert epoch_lines(cut) == epoch_lines(tmp_path / "straight")
    # The damaged file was replaced by good ones, not kept as previous.pt.
    assert (load_checkpoint(last).epoch, load_checkpoint(previous).epoch) == (3, 2)


def draw_from_every_generator(learner: CoOp) -> None:
    """Make the loss depend on python's, numpy's and torch's global generators (as dropout or noise would)."""
    import random

    import numpy as np

    real_loss = learner.loss

    def loss(batch, output):
        terms = real_loss(batch, output)
        noise = random.random() + float(np.random.rand()) + float(torch.rand(()))
        return {**terms, "noise": 0.01 * noise * terms["ce"]}

    learner.loss = loss  # type: ignore[method-assign]


def test_a_resumed_run_continues_every_random_generator(tiny_clip, tmp_path: Path) -> None:
    straight = trainer_for(tiny_clip, tmp_path / "straight")
    draw_from_every_generator(straight.learner)
    straight.fit()
    interrupted = trainer_for(tiny_clip, tmp_path / "cut", callbacks=[stop_after(1)])
    draw_from_every_generator(interrupted.learner)
    with pytest.raises(Interrupt):
        interrupted.fit()
    seed_everything(12345)  # a new process starts with other generator states
    resumed = trainer_for(tiny_clip, tmp_path / "cut")
    draw_from_every_generator(resumed.learner)
    seed_everything(999)
    resumed.fit(resume=True)
    assert torch.equal(resumed.learner.trainable_state()["ctx"], straight.learner.trainable_state()["ctx"])
    assert epoch_lines(tmp_path / "cut") == epoch_lines(tmp_path / "straight")


def test_a_truncated_checkpoint_is_refused_with_its_name_and_the_fix(tiny_clip, tmp_path: Path) -> None:
    trainer_for(tiny_clip, tmp_path).fit()
    last = checkpoint_path(tmp_path)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{last}: cannot be read.*delete it"):
        load_checkpoint(last)
    previous = previous_checkpoint_path(last)
    previous.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint[\s\S]*last\.pt[\s\S]*previous\.pt[\s\S]*delete"):
        load_resume_checkpoint(last)


def test_a_fresh_start_discards_an_earlier_attempts_previous_checkpoint(tiny_clip, tmp_path: Path) -> None:
    trainer_for(tiny_clip, tmp_path).fit()
    previous = previous_checkpoint_path(checkpoint_path(tmp_path))
    assert load_checkpoint(previous).epoch == 2
    with pytest.raises(Interrupt):
        trainer_for(tiny_clip, tmp_path, callbacks=[stop_after(1)]).fit(resume=False)
    # After one epoch of the new attempt there is no previous.pt of the old attempt to fall back to.
    assert not previous.exists() and load_checkpoint(checkpoint_path(tmp_path)).epoch == 1


def test_a_torn_metrics_line_is_left_out_and_dropped_on_resume(tiny_clip, tmp_path: Path) -> None:
    with pytest.raises(Interrupt):
        trainer_for(tiny_clip, tmp_path, callbacks=[stop_after(1)]).fit()
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as handle:
        handle.write('{"epoch": 2, "lr": 0.0')  # a kill in the middle of the append
    assert [r["epoch"] for r in MetricsFile(metrics).read()] == [1]
    trainer_for(tiny_clip, tmp_path).fit(resume=True)
    assert [r["epoch"] for r in MetricsFile(metrics).read()] == [1, 2, 3]
    assert all(json.loads(line) for line in metrics.read_text().splitlines())


def test_the_fault_hook_reads_only_known_points() -> None:
    assert parse_fault_spec("after_epoch:2, mid_results") == {"after_epoch": 2, "mid_results": 1}
    with pytest.raises(FaultSpecError, match="unknown point 'mid_air'"):
        parse_fault_spec("mid_air")
    with pytest.raises(FaultSpecError, match="not a count"):
        parse_fault_spec("after_step:x")


# ---------------------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_disk_on(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[None]:
    """Every atomic write of a file called `name` gets half its bytes onto the disk, then ENOSPC."""
    real = io_module.atomic_path

    @contextlib.contextmanager
    def atomic_path(path: str | Path, fault: str | None = None) -> Iterator[Path]:
        with real(path, fault) as tmp:
            yield tmp
            if Path(path).name == name:
                tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_module, "atomic_path", atomic_path)
    yield
    monkeypatch.setattr(io_module, "atomic_path", real)


def test_a_full_disk_leaves_the_previous_file_and_says_where(tmp_path: Path) -> None:
    target = tmp_path / "out" / "data.json"
    atomic_write_json(target, {"version": 1})

    def half_then_full(tmp: Path) -> None:
        tmp.write_text('{"version": 2, "pad')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFullError) as caught:
        atomic_write_with(target, half_then_full)
    message = str(caught.value)
    assert message.startswith(f"the disk is full: writing {target} failed")
    assert f"free on the file system of {target.parent}" in message and "unchanged" in message
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.json"]  # no temporary left behind


def test_a_full_disk_during_a_checkpoint_stops_training_and_keeps_the_last_good_one(
    tiny_clip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fill_disk_after(count: int):
        def callback(epoch: int, trainer: Trainer) -> None:
            if epoch == count:
                monkeypatch.setattr(io_module, "atomic_path", full_atomic_path)

        return callback

    real = io_module.atomic_path

    @contextlib.contextmanager
    def full_atomic_path(path: str | Path, fault: str | None = None) -> Iterator[Path]:
        with real(path, fault) as tmp:
            yield tmp
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    last = checkpoint_path(tmp_path)
    with pytest.raises(DiskFullError, match=rf"the disk is full: writing {last} failed"):
        trainer_for(tiny_clip, tmp_path, callbacks=[fill_disk_after(1)]).fit()
    monkeypatch.setattr(io_module, "atomic_path", real)
    assert load_checkpoint(last).epoch == 1  # checksum intact, epoch 2 not half-written over it
    assert temporaries(tmp_path) == []


def test_a_full_disk_at_the_results_is_reported_by_the_cli_and_resume_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from promptclip.cli import main

    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    argv = ["train", "--recipe", str(RECIPE), "--output", str(run_dir), "--quiet", "--no-progress"]
    with full_disk_on(monkeypatch, "results.json"):
        assert main([*argv, "--opts", "optim.epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"the disk is full: writing {run_dir / 'results.json'} failed" in err
    assert "--resume" in err
    assert not (run_dir / "results.json").exists() and temporaries(run_dir) == []
    assert main([*argv, "--resume", "--opts", "optim.epochs", "1"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["resumed_from_epoch"] == 1  # nothing trained twice


# ---------------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_with_the_step_and_batch_named_and_keeps_the_last_checkpoint(
    tiny_clip, tmp_path: Path
) -> None:
    trainer = trainer_for(tiny_clip, tmp_path)
    learner = trainer.learner
    real_loss = learner.loss
    calls = {"count": 0}

    def loss(batch, output):  # 3 batches per epoch: the 2nd batch of epoch 2 is the 5th overall
        calls["count"] += 1
        terms = real_loss(batch, output)
        if calls["count"] == 5:
            terms["ce"] = terms["ce"] * float("nan")
        return terms

    learner.loss = loss  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit()
    error = caught.value
    assert (error.epoch, error.batch_index, error.step) == (1, 1, 4)
    assert "non-finite loss at epoch 2, batch 1 (optimiser step 4)" in str(error)
    assert f"the checkpoint of the last finished epoch is kept at {checkpoint_path(tmp_path)}" in str(error)
    assert len(error.paths) == 6 and "Lower optim.lr" in str(error)
    saved = load_checkpoint(checkpoint_path(tmp_path))
    assert saved.epoch == 1 and saved.global_step == 3
    assert torch.isfinite(saved.trainable["ctx"]).all()
