"""The one training loop. It knows no method: it only calls the learner contract (`forward`, `loss`,
`trainable_parameters`, `trainable_state` / `load_trainable_state`, `on_epoch_start`, `on_epoch_end`).

Per optimiser step: forward and loss under autocast (CUDA only), the weighted loss terms summed, divided by
the number of micro-batches in the accumulation group, backward (through a GradScaler for fp16), optional
gradient clipping, step. Per epoch: the learning rate of the warm-up + cosine rule, `on_epoch_end`, one line
in `metrics.jsonl`, a checkpoint of everything a resumed run needs, then the epoch callbacks.

A step never waits for the device: the loss terms stay on it and are read back every `log_every` batches and
at the end of the epoch (one read each time), which is also when non-finite losses are looked for. A
non-finite loss stops the run with the epoch, the batch and the step where it first appeared; the checkpoint
of the last finished epoch stays as it was.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from promptclip.config import OptimConfig
from promptclip.engine import stop
from promptclip.engine.checkpoint import (
    TrainingCheckpoint,
    capture_rng_state,
    checkpoint_path,
    load_resume_checkpoint,
    previous_checkpoint_path,
    restore_rng_state,
    save_checkpoint,
)
from promptclip.engine.compiling import CompiledTowers, CompileMode
from promptclip.engine.distributed import DataParallel
from promptclip.engine.evaluate import autocast_context, move_batch, progress_enabled, store_frozen_towers
from promptclip.engine.learner import Learner
from promptclip.engine.optim import WarmupCosineSchedule, build_optimizer, parameter_groups
from promptclip.faults import fault_point
from promptclip.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped at the next read of the losses, before the epoch's
    checkpoint."""

    def __init__(
        self,
        epoch: int,
        batch_index: int,
        step: int,
        terms: Mapping[str, float],
        paths: Sequence[str] = (),
        checkpoint: Path | None = None,
    ) -> None:
        self.epoch = epoch
        self.batch_index = batch_index
        self.step = step
        self.terms = dict(terms)
        self.paths = list(paths)
        self.checkpoint = checkpoint
        shown = ", ".join(f"{k}={v}" for k, v in self.terms.items())
        where = f" (images: {', '.join(self.paths[:4])}{', ...' if len(self.paths) > 4 else ''})" if paths else ""
        kept = (
            f"the checkpoint of the last finished epoch is kept at {checkpoint}"
            if checkpoint is not None and checkpoint.is_file()
            else "no epoch had finished, so there is no checkpoint"
        )
        super().__init__(
            f"non-finite loss at epoch {epoch + 1}, batch {batch_index} (optimiser step {step}): {shown}{where}; "
            f"{kept}. Lower optim.lr, set optim.max_grad_norm, or use model.precision fp32/bf16 instead of fp16."
        )


LOG_EVERY = 25
"""Batches between two reads of the loss terms from the device (progress bar, non-finite check)."""


@dataclass(frozen=True)
class BatchPlace:
    """Where a micro-batch was trained: named by a non-finite loss found later."""

    epoch: int
    batch_index: int
    step: int
    paths: Sequence[str] = ()


class LossTally:
    """The loss terms of an epoch's micro-batches, summed on the device.

    Reading a device value back makes the host wait for every step queued before it, so the terms are read
    only by `read()`: once per logging interval and at the end of the epoch. Each read also looks for a
    non-finite loss among the batches added since the last one (a NaN or infinity in any term reaches the sum
    and stays there), and names the first such batch."""

    def __init__(self, checkpoint: Path | None = None) -> None:
        self.checkpoint = checkpoint
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self._unread: list[tuple[BatchPlace, dict[str, torch.Tensor]]] = []

    @property
    def unread(self) -> int:
        """Batches added since the last read."""
        return len(self._unread)

    def add(self, terms: dict[str, torch.Tensor], place: BatchPlace, weight: float = 1.0) -> None:
        """One micro-batch's detached terms (with their sum as `loss`); `weight` scales its share of the sums."""
        for name, value in terms.items():
            share = value * weight if weight != 1.0 else value
            self.sums[name] = self.sums[name] + share if name in self.sums else share
        self.count += 1
        self._unread.append((place, terms))

    def read(self) -> dict[str, float]:
        """The sum of each term so far; raises `NonFiniteLossError` for the first non-finite batch."""
        names = list(self.sums)
        values = dict(zip(names, torch.stack([self.sums[n] for n in names]).tolist(), strict=True))
        if not math.isfinite(values["loss"]):
            self.raise_first_non_finite()
        self._unread.clear()
        return values

    def raise_first_non_finite(self) -> None:
        """Raise `NonFiniteLossError` for the first unread batch whose loss is not finite, if there is one."""
        if not self._unread:
            return
        losses = torch.stack([terms["loss"] for _, terms in self._unread]).tolist()
        for (place, terms), loss in zip(self._unread, losses, strict=True):
            if not math.isfinite(loss):
                values = {name: float(value) for name, value in terms.items()}
                raise NonFiniteLossError(
                    place.epoch, place.batch_index, place.step, values, place.paths, self.checkpoint
                )


# A trained tensor whose largest magnitude grows past this many times its starting scale (at least 1) has
# diverged: prompts live near the scale of CLIP's token embeddings (~1e-2..1), so a healthy run stays orders
# of magnitude below it, while a learning rate that explodes reaches it within an epoch.
DIVERGENCE_FACTOR = 1e4


class DivergedError(RuntimeError):
    """Trained tensors became non-finite or exploded although every loss was finite."""

    def __init__(self, epoch: int, name: str, magnitude: float, limit: float, lr: float) -> None:
        self.epoch, self.name, self.magnitude = epoch, name, magnitude
        what = "is not finite" if not math.isfinite(magnitude) else f"reached |x| = {magnitude:.3g} (limit {limit:.3g})"
        super().__init__(
            f"training diverged in epoch {epoch}: the trained tensor {name} {what}; its results would be "
            f"meaningless. Lower optim.lr (now {lr:g}) or set optim.max_grad_norm, and start the run again"
        )


class RunLog:
    """Prints messages and mirrors them into `log.txt` (appended, so a resumed run keeps its history)."""

    def __init__(self, path: str | Path | None = None, echo: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.echo = echo
        self._handle: TextIO | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def __call__(self, message: str) -> None:
        if self.echo:
            tqdm.write(message)
        self.to_file(message)

    def to_file(self, message: str) -> None:
        """Write to log.txt only (e.g. an error the command line reports itself)."""
        if self._handle is not None:
            self._handle.write(message + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MetricsFile:
    """`metrics.jsonl`: one JSON object per line (epochs and evaluations)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The records; a line that is not JSON (cut short by a kill or a full disk) is left out."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def keep_epochs_up_to(self, epoch: int) -> None:
        """Drop epoch lines after `epoch` (written by an interrupted run after its last checkpoint)."""
        if not self.path.is_file():
            return
        kept = [r for r in self.read() if "epoch" not in r or "eval" in r or int(r["epoch"]) <= epoch]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class TrainResult:
    epochs: int
    steps: int
    seconds: float
    final_loss: float | None
    last_lr: float | None = None
    resumed_from_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("history")
        return data


EpochCallback = Callable[[int, "Trainer"], None]
"""Called after each finished epoch (1-based count) once its checkpoint is written."""


class Trainer:
    """Trains `learner` on `loader` (an iterable of dict batches, re-iterated every epoch; `set_epoch(e)` is
    called first when the loader has it, so a seeded loader can derive its order from (seed, epoch))."""

    def __init__(
        self,
        learner: Learner,
        loader: Iterable[Mapping[str, Any]],
        optim: OptimConfig,
        *,
        run_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        progress: bool | None = None,
        tensorboard: bool = False,
        log: Callable[[str], None] | None = None,
        fingerprint: str | None = None,
        callbacks: Sequence[EpochCallback] = (),
        generators: Mapping[str, torch.Generator] | None = None,
        data_parallel: DataParallel | None = None,
        log_every: int = LOG_EVERY,
        compile_mode: CompileMode = "off",
    ) -> None:
        if optim.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be at least 1, got {optim.grad_accum}")
        if optim.epochs < 1:
            raise ValueError(f"optim.epochs must be at least 1, got {optim.epochs}")
        if log_every < 1:
            raise ValueError(f"log_every must be at least 1 batch, got {log_every}")
        self.log_every = log_every
        self.learner = learner
        self.loader = loader
        self.cfg = optim
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = torch.device(device)
        self.precision = precision
        self.progress = progress_enabled(progress)
        self.log = log or (lambda message: None)
        self.fingerprint = fingerprint
        self.callbacks = list(callbacks)
        self.generators = dict(generators or {})
        # Data-parallel ranks share each step's gradients; rank 0 alone writes checkpoints and metrics.
        self.data_parallel = data_parallel
        self.is_main = data_parallel is None or data_parallel.is_main
        learner.to(self.device)  # before the optimiser exists, so its state lives beside the parameters
        store_frozen_towers(learner, self.device, precision)
        self.compiled = CompiledTowers(learner, compile_mode)
        trainable = learner.trainable_parameters()
        self.parameters = list(trainable.values())
        self._divergence_limit = DIVERGENCE_FACTOR * max([1.0, *largest_magnitudes(self.parameters).values()])
        scales = learner.learning_rate_scales()
        # Without scales, one plain group: the optimiser state of every earlier checkpoint loads unchanged.
        self.optimizer = build_optimizer(parameter_groups(trainable, scales) if scales else self.parameters, optim)
        self.schedule = WarmupCosineSchedule(self.optimizer, optim)
        self.scaler = grad_scaler(self.device, precision)
        self.epoch = 0  # finished epochs
        self._keep_previous = False  # whether last.pt on disk is this run's own (kept as previous.pt)
        self.global_step = 0
        self.metrics = MetricsFile(self.run_dir / METRICS_FILE) if self.run_dir is not None and self.is_main else None
        self._tensorboard = _open_tensorboard(self.run_dir) if tensorboard and self.is_main else None

    # -- checkpoints ---------------------------------------------------------------------------------------
    @property
    def checkpoint_file(self) -> Path | None:
        return checkpoint_path(self.run_dir) if self.run_dir is not None else None

    def state(self) -> TrainingCheckpoint:
        return TrainingCheckpoint(
            epoch=self.epoch,
            global_step=self.global_step,
            trainable=self.learner.trainable_state(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.schedule.state_dict(),
            rng=capture_rng_state(self.generators),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            fingerprint=self.fingerprint,
            extra={"learner": self.learner.training_state()},
        )

    def restore(self, checkpoint: TrainingCheckpoint, source: str = "checkpoint") -> None:
        if self.fingerprint and checkpoint.fingerprint and checkpoint.fingerprint != self.fingerprint:
            raise ValueError(
                f"{source} was written by a run with another configuration (config hash "
                f"{checkpoint.fingerprint[:12]}..., this run {self.fingerprint[:12]}...); resume with the same "
                "recipe and options, or delete the checkpoints folder to start again"
            )
        self.learner.load_trainable_state(checkpoint.trainable, source=source)
        self.learner.load_training_state(checkpoint.extra.get("learner") or {})
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.schedule.load_state_dict(checkpoint.scheduler)
        if self.scaler is not None and checkpoint.scaler:
            self.scaler.load_state_dict(checkpoint.scaler)
        restore_rng_state(checkpoint.rng, self.generators)
        self.epoch = checkpoint.epoch
        self.global_step = checkpoint.global_step

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        resumed_from = self._start(resume)
        if self.data_parallel is not None:  # every rank starts from rank 0's tensors
            self.data_parallel.broadcast_tensors([*self.parameters, *self.learner.extra_state_buffers().values()])
        started = time.perf_counter()
        history: list[dict[str, Any]] = []
        last_loss: float | None = None
        try:
            with stop.safe_points():  # Ctrl-C / SIGTERM stop at the next step, the checkpoint kept
                while self.epoch < self.cfg.epochs:
                    record = self._run_epoch(self.epoch)
                    history.append(record)
                    last_loss = record["loss"]
                    self._check_divergence()  # before the checkpoint: last.pt stays the last sound epoch
                    self._finish_epoch(record)
                    stop.check(self.epoch, self.cfg.epochs)
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
        if last_loss is None and self.metrics is not None:
            previous = [r for r in self.metrics.read() if "loss" in r and "eval" not in r]
            last_loss = previous[-1]["loss"] if previous else None
        return TrainResult(
            epochs=self.epoch,
            steps=self.global_step,
            seconds=round(time.perf_counter() - started, 3),
            final_loss=last_loss,
            last_lr=history[-1]["lr"] if history else None,
            resumed_from_epoch=resumed_from,
            history=history,
        )

    def _start(self, resume: bool) -> int | None:
        path = self.checkpoint_file
        found = load_resume_checkpoint(path, self.log) if resume and path is not None else None
        if found is not None:
            checkpoint, source = found
            self.restore(checkpoint, source=str(source))
            # A damaged last.pt must not become previous.pt when the next checkpoint replaces it.
            self._keep_previous = source == path
            if self.metrics is not None:
                self.metrics.keep_epochs_up_to(self.epoch)
            self.log(f"resumed from {source} after epoch {self.epoch} (step {self.global_step})")
            return self.epoch
        if resume:
            self.log("no checkpoint to resume from; training from the start")
        elif path is not None and path.is_file():
            self.log(f"starting again over the checkpoint of an earlier attempt ({path}); --resume continues it")
        if path is not None:
            previous_checkpoint_path(path).unlink(missing_ok=True)  # an earlier attempt's, not this run's
        if self.metrics is not None:
            self.metrics.reset()
        return None

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        self.learner.train()
        self.learner.on_epoch_start(epoch, self.cfg.epochs)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        lr = self.schedule.get_last_lr()[0]
        num_batches = len(self.loader) if hasattr(self.loader, "__len__") else None  # type: ignore[arg-type]
        tally = LossTally(self.checkpoint_file)
        started = time.perf_counter()
        bar = tqdm(
            total=num_batches,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.optimizer.zero_grad(set_to_none=True)
        with bar, self.compiled.installed():
            try:
                for index, batch, group_size, closes_group in self._micro_batches(num_batches):
                    terms, weight = self._backward(batch, group_size)
                    tally.add(terms, BatchPlace(epoch, index, self.global_step, batch.get("path") or ()), weight)
                    if closes_group:
                        self._optimizer_step()
                        stop.check(self.epoch, self.cfg.epochs)
                    bar.update(1)
                    if tally.unread >= self.log_every:
                        bar.set_postfix(loss=f"{tally.read()['loss'] / tally.count:.4f}", refresh=False)
            except NonFiniteLossError:
                raise
            except Exception:
                # A NaN can make a later step fail in its own way: name the NaN, the cause, first.
                tally.raise_first_non_finite()
                raise
        count = tally.count
        if count == 0:
            raise ValueError(
                "the training loader gave no batches; the training set is smaller than one batch with "
                "drop_last, or empty (check data.shots, data.subsample and data.batch_size)"
            )
        sums = tally.read()
        self.learner.on_epoch_end(epoch, self.cfg.epochs)
        if self.data_parallel is not None:  # the epoch's loss over the whole batches, not this rank's share
            sums = self.data_parallel.mean_over_ranks(sums)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "steps": self.global_step}
        record.update({name: total / count for name, total in sums.items()})
        record["seconds"] = round(time.perf_counter() - started, 3)
        return record

    def _micro_batches(self, num_batches: int | None) -> Iterator[tuple[int, Mapping[str, Any], int, bool]]:
        """(batch index, batch, micro-batches in its accumulation group, whether it closes the group)."""
        accum = self.cfg.grad_accum
        iterator = iter(self.loader)
        current = next(iterator, None)
        index = 0
        while current is not None:
            following = next(iterator, None)
            group_start = index - index % accum
            group_size = min(accum, num_batches - group_start) if num_batches is not None else accum
            is_last = following is None
            closes = (index + 1) % accum == 0 or is_last
            if is_last and num_batches is None:
                group_size = index - group_start + 1
            yield index, current, group_size, closes
            current = following
            index += 1

    def _backward(self, batch: Mapping[str, Any], group_size: int) -> tuple[dict[str, torch.Tensor], float]:
        """Forward, loss and backward of one micro-batch: its detached fp32 loss terms (and their sum, `loss`),
        still on the device, and the weight of its share of the batch (data-parallel ranks)."""
        batch = move_batch(batch, self.device)
        self.compiled.step_begins()
        with autocast_context(self.device, self.precision):
            output = self.learner(batch)
            terms = self.learner.loss(batch, output)
        if not terms:
            raise ValueError(f"{type(self.learner).__name__}.loss returned no loss terms")
        loss = torch.stack([value.float() for value in terms.values()]).sum()
        values = {name: value.detach().float() for name, value in terms.items()}
        values["loss"] = loss.detach()
        scaled = loss / group_size
        weight = 1.0
        if self.data_parallel is not None:  # this rank's share of the batch, weighted by its size
            weight = self.data_parallel.loss_weight(batch)
            scaled = scaled * weight
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        return values, weight

    def _optimizer_step(self) -> None:
        if self.data_parallel is not None:
            self.data_parallel.average_gradients(self.parameters)
        if self.cfg.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.data_parallel is not None:  # e.g. BatchNorm statistics of each rank's share
            self.data_parallel.average_buffers(self.learner.extra_state_buffers().values())
        self.global_step += 1
        fault_point("after_step")

    def _check_divergence(self) -> None:
        """Stop a run whose trained tensors are non-finite or exploding (checked once per epoch: one read)."""
        for name, magnitude in largest_magnitudes(self.learner.trainable_parameters()).items():
            if not math.isfinite(magnitude) or magnitude > self._divergence_limit:
                raise DivergedError(self.epoch + 1, name, magnitude, self._divergence_limit, self.cfg.lr)

    def _finish_epoch(self, record: dict[str, Any]) -> None:
        self.schedule.step()
        self.epoch += 1
        if self.metrics is not None:
            self.metrics.append(record)
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("epoch", "steps") and isinstance(value, float | int):
                    self._tensorboard.add_scalar(f"train/{key}", value, record["epoch"])
        terms = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "lr", "steps", "seconds"))
        self.log(
            f"epoch {record['epoch']}/{self.cfg.epochs}  lr {record['lr']:.3e}  {terms}  ({record['seconds']:.1f}s)"
        )
        if self.checkpoint_file is not None and self.is_main:
            save_checkpoint(self.checkpoint_file, self.state(), keep_previous=self._keep_previous)
            self._keep_previous = True
        fault_point("after_epoch")
        for callback in self.callbacks:
            callback(self.epoch, self)


def train(
    learner: Learner,
    loader: Iterable[Mapping[str, Any]],
    optim: OptimConfig,
    resume: bool = False,
    **options: Any,
) -> TrainResult:
    """Train `learner` with the options of `Trainer`; see there."""
    return Trainer(learner, loader, optim, **options).fit(resume=resume)


def largest_magnitudes(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> dict[Any, float]:
    """The largest |x| of each non-empty tensor (by name, or by position for a sequence), read from the
    device at once."""
    named = tensors.items() if isinstance(tensors, Mapping) else enumerate(tensors)
    kept = [(key, tensor) for key, tensor in named if tensor.numel()]
    if not kept:
        return {}
    maxima = torch.stack([tensor.detach().abs().max().float() for _, tensor in kept]).tolist()
    return {key: value for (key, _), value in zip(kept, maxima, strict=True)}


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 autocast on CUDA (bf16 and fp32 keep fp32's exponent range and need none)."""
    if device.type == "cuda" and precision == "fp16":
        return torch.amp.GradScaler("cuda")
    return None


def _open_tensorboard(run_dir: Path | None) -> Any:
    if run_dir is None:
        raise ValueError("TensorBoard logging needs a run folder")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "--tensorboard needs the tensorboard package: pip install 'promptclip[tb]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
