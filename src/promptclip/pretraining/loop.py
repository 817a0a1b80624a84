"""The pretraining loop: resumable (a checkpoint every `checkpoint_every` steps, refused when the settings
that shape the weights differ), with periodic zero-shot checks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from promptclip.clip.model import CLIP
from promptclip.engine.evaluate import autocast_context
from promptclip.io import atomic_write_json, atomic_write_with
from promptclip.pretraining.batches import CaptionedBatch, caption_batch, images_to_pixels
from promptclip.pretraining.config import PretrainConfig, PretrainError
from promptclip.pretraining.objective import MAX_LOGIT_SCALE, build_optimizer, clip_loss, learning_rate
from promptclip.pretraining.probes import build_probes, zero_shot_accuracy

__all__ = ["CHECKPOINT_FILE", "METRICS_FILE", "PretrainResult", "pretrain", "set_threads"]

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------


def _save_checkpoint(
    path: Path, model: CLIP, optimizer: torch.optim.Optimizer, step: int, cfg: PretrainConfig, history: list
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "model": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "history": json.dumps(history),
    }
    atomic_write_with(path, lambda tmp: torch.save(payload, tmp))


# Settings that do not change the weights, so a resumed run may choose them anew.
_BOOKKEEPING = frozenset({"eval_every", "eval_per_class", "checkpoint_every"})


def _load_checkpoint(path: Path, cfg: PretrainConfig) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file
        raise PretrainError(
            f"{path}: cannot be read as a pretraining checkpoint ({type(err).__name__}: {err}); delete it or "
            "choose another output folder to start afresh"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise PretrainError(f"{path}: not a promptclip pretraining checkpoint (format {CHECKPOINT_FORMAT})")
    saved, current = json.loads(payload["config"]), cfg.to_dict()
    keys = (saved.keys() | current.keys()) - _BOOKKEEPING
    differing = sorted(k for k in keys if saved.get(k) != current.get(k))
    if differing:
        raise PretrainError(
            f"{path}: was written by a run with other settings ({', '.join(differing)} differ); resume with the "
            "same settings, or choose another output folder (or pass --no-resume) to start afresh"
        )
    return payload


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    model: CLIP
    history: list[dict[str, Any]]
    steps_run: int
    seconds: float
    trained_tokens: torch.Tensor | None = None
    """Bool mask over the vocabulary: token ids that received a gradient during training."""

    @property
    def last_eval(self) -> dict[str, Any] | None:
        return next((h for h in reversed(self.history) if "zero_shot" in h), None)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The engine's autocast on CUDA (and no autocast for fp32); bf16 autocast on other devices too, which the
    engine never enables: the bundled model was trained under CPU bf16 autocast (docs/tiny-clip.md)."""
    if precision == "bf16" and device.type != "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return autocast_context(device, precision)


def _train_step(
    model: CLIP, optimizer: torch.optim.Optimizer, batch: CaptionedBatch, cfg: PretrainConfig, step: int
) -> dict[str, float]:
    device = model.token_embedding.weight.device
    lr = learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    pixels = images_to_pixels(batch.images, model.image_size).to(device)
    with _autocast(device, cfg.precision):
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(batch.tokens.to(device))
    loss = clip_loss(image_features, text_features, model.logit_scale, batch.matches)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite pretraining loss at step {step}; lower lr or use fp32")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))
    return {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "logit_scale": model.logit_scale.exp().item()}


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = tqdm.write,
) -> PretrainResult:
    """Pretrain a CLIP of `cfg.arch` from scratch (or resume `out_dir/checkpoint.pt`).

    `out_dir` receives `checkpoint.pt` (every `checkpoint_every` steps and at the end, written atomically)
    and `metrics.json`. `stop_after` ends the run after that many steps of this call (the checkpoint lets a
    later call continue). The returned model is in eval mode with gradients still enabled.
    """
    cfg.check()
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = CLIP(cfg.arch_config()).to(device)
    if cfg.init is not None:
        _load_init(model, cfg.init)
    model.train()
    optimizer = build_optimizer(model, cfg)
    history: list[dict[str, Any]] = []
    start = 0
    ckpt_path = Path(out_dir) / CHECKPOINT_FILE if out_dir is not None else None
    if ckpt_path is not None and resume and ckpt_path.is_file():
        payload = _load_checkpoint(ckpt_path, cfg)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        history = json.loads(payload["history"])
        start = int(payload["step"])
        if log:
            log(f"resuming from {ckpt_path} at step {start}/{cfg.steps}")
    probes = build_probes("val", cfg.eval_per_class, seed=0) if cfg.eval_every <= cfg.steps else []
    began = time.time()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(total=cfg.steps, initial=start, desc="pretrain", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, end):
            batch = caption_batch(cfg, step, model.context_length)
            record: dict[str, Any] = {"step": step + 1, **_train_step(model, optimizer, batch, cfg, step)}
            done = step + 1
            if probes and (done % cfg.eval_every == 0 or done == cfg.steps):
                record["zero_shot"] = zero_shot_accuracy(model, probes)
                if log:
                    log(f"step {done}: loss {record['loss']:.3f} zero-shot " + _format_eval(record["zero_shot"]))
            history.append(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", scale=f"{record['logit_scale']:.1f}", lr=f"{record['lr']:.1e}"
            )
            if ckpt_path is not None and (done % cfg.checkpoint_every == 0 or done == end):
                _save_checkpoint(ckpt_path, model, optimizer, done, cfg, history)
                atomic_write_json(ckpt_path.with_name(METRICS_FILE), history)
    finally:
        bar.close()
    model.eval()
    steps_run = max(0, end - start)
    return PretrainResult(model, history, steps_run, time.time() - began, _trained_tokens(model, optimizer))


def _load_init(model: CLIP, path: str) -> None:
    """Start from the weights of `path` (same architecture), read as fp32."""
    from promptclip.clip.weights import load_clip

    try:
        start = load_clip(path)
    except (OSError, ValueError) as err:
        raise PretrainError(f"pretrain config: init {path!r} cannot be loaded ({err})") from None
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    given = {key: tuple(value.shape) for key, value in start.state_dict().items()}
    differing = sorted(key for key in expected.keys() | given.keys() if expected.get(key) != given.get(key))
    if differing:
        shown = ", ".join(f"{key} {given.get(key)} (training {expected.get(key)})" for key in differing[:3])
        raise PretrainError(
            f"pretrain config: init {path!r} is another architecture ({len(differing)} tensors differ: {shown}); "
            "give a weights file of the architecture being trained"
        )
    model.load_state_dict(start.state_dict())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.requires_grad_(True)


def _trained_tokens(model: CLIP, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Rows of the token embedding that ever had a gradient: Adam's second moment is non-zero exactly there."""
    state = optimizer.state.get(model.token_embedding.weight, {})
    second_moment = state.get("exp_avg_sq")
    return None if second_moment is None else (second_moment != 0).any(dim=1).cpu()


def _format_eval(results: Mapping[str, Mapping[str, float]]) -> str:
    return ", ".join(f"{task}: base {r['base']:.1f} new {r['new']:.1f}" for task, r in results.items())


def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads (and OpenMP's, for libraries that read the variable late)."""
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
