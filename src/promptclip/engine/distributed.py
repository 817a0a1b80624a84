"""Data-parallel training and evaluation over several processes (`torchrun --nproc_per_node N ...`).

Every rank holds the whole learner. Training: each optimiser step's batch (`data.batch_size`, the same global
batch as a one-process run) is cut into one contiguous share per rank; each rank computes the gradients of its
share, and one all-reduce averages them before the optimiser step, so every rank takes the same step.
Evaluation: every rank classifies whole batches (rank r takes batches r, r + N, ...), and the per-class counts
are summed. Rank 0 alone writes checkpoints, logs, metrics, prompts and results.

What is exact, and what is not:

* The batches are the one-process run's batches, image for image and augmentation for augmentation (the
  loader seeds each image's augmentation from its index). Each rank's loss is weighted by its share of the
  batch, so for losses that are means over the images of a batch (cross-entropy, KgCoOp, PromptSRC and
  PromptKD's distillation terms, DAPT's terms) the averaged gradient is the one-process gradient up to float
  rounding, and the runs agree to float tolerance whatever the optimiser.
* Evaluation counts are exactly the one-process counts: each image is classified in the very batch it would
  be in a one-process run.
* Losses over pairs within a batch (DPC's contrastive loss) see only the rank's share, and BatchNorm layers
  that train (PromptKD's projector) use the rank's share's statistics; their running statistics are averaged
  over ranks after each step (exact for the running mean, close for the variance).

The gradients are averaged by hand rather than through `DistributedDataParallel`: prompt tensors are small
(kilobytes to a few megabytes), so DDP's bucketing and overlap would gain nothing, and loss terms computed
outside `forward` (DAPT's background texts, DPC's negatives) need none of DDP's unused-parameter rules.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

BACKEND_ENV = "PROMPTCLIP_DIST_BACKEND"
GLOBAL_BATCH_KEY = "global_batch_size"
"""Key a sharded training batch carries: the size of the whole batch it is a share of."""

_current: DataParallel | None = None


@dataclass
class DataParallel:
    """This process's place in a data-parallel group, and the collective operations the engine needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data -----------------------------------------------------------------------------------------------
    def share(self, count: int) -> slice:
        """This rank's contiguous share of `count` items (sizes differ by at most one)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def shard_train_loader(self, loader: Any) -> ShardedTrainLoader:
        return ShardedTrainLoader(loader, self)

    def rank_batches(self, batches: Sequence[Any]) -> list[Any]:
        """The batches this rank evaluates: r, r + N, r + 2N, ..."""
        return list(batches[self.rank :: self.world_size])

    def shard_eval_loader(self, loader: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
        """This rank's whole batches of an evaluation loader; only those are read from disk when the loader is
        a promptclip loader (`build_loader`), any other iterable is read through and the rest skipped."""
        if _is_epoch_loader(loader):
            return _RankEvalLoader(loader, self)
        return (batch for index, batch in enumerate(loader) if index % self.world_size == self.rank)

    # -- training --------------------------------------------------------------------------------------------
    def loss_weight(self, batch: Mapping[str, Any]) -> float:
        """Factor on this rank's loss so that the average over ranks is the loss of the whole batch:
        N x (images here) / (images in the whole batch); 1 when the shares are equal."""
        whole = batch.get(GLOBAL_BATCH_KEY)
        if whole is None:
            return 1.0
        return self.world_size * _batch_size(batch) / int(whole)

    @torch.no_grad()
    def average_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        """Average the gradients of `parameters` over ranks (one all-reduce). A parameter without a gradient
        on every rank keeps none, as in a one-process step; one with a gradient on some ranks counts zeros
        for the others.

        Whether a parameter has a gradient somewhere is counted in the same all-reduce (one flag per
        parameter). Those counts are read back, which waits for the device, only when this rank lacks a
        gradient: a parameter with one here has one after the average whatever the other ranks did."""
        if not parameters:
            return
        device = self._comm_device
        missing = [index for index, p in enumerate(parameters) if p.grad is None]
        flags = torch.ones(len(parameters), dtype=torch.float64, device=device)
        for index in missing:
            flags[index] = 0.0
        pieces = [flags] + [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, torch.float64)
            for p in parameters
        ]
        flat = self._all_reduce(torch.cat(pieces))
        flat /= self.world_size
        counts = dict(zip(missing, flat[missing].tolist(), strict=True)) if missing else {}
        offset = len(parameters)
        for index, param in enumerate(parameters):
            size = param.numel()
            values = flat[offset : offset + size].view_as(param).to(param.device, param.dtype)
            offset += size
            if param.grad is not None:
                param.grad.copy_(values)
            elif counts[index] > 0:
                param.grad = values

    @torch.no_grad()
    def average_buffers(self, buffers: Iterable[torch.Tensor]) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks, in place."""
        for buffer in buffers:
            if buffer.is_floating_point():
                total = self._all_reduce(buffer.detach().to(self._comm_device, torch.float64))
                buffer.copy_((total / self.world_size).to(buffer.device, buffer.dtype))

    @torch.no_grad()
    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give every rank rank 0's values of `tensors` (parameters and buffers), in place."""
        for tensor in tensors:
            data = tensor.detach().to(self._comm_device).contiguous()
            dist.broadcast(data, src=0)
            tensor.copy_(data.to(tensor.device))

    def mean_over_ranks(self, values: Mapping[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (the same keys on every rank)."""
        names = sorted(values)
        local = torch.tensor([values[n] for n in names], dtype=torch.float64, device=self._comm_device)
        totals = self._all_reduce(local)
        return {name: float(total) / self.world_size for name, total in zip(names, totals.tolist(), strict=True)}

    # -- evaluation and coordination ---------------------------------------------------------------------------
    def sum_counts(self, *counts: torch.Tensor) -> list[torch.Tensor]:
        """Integer tensors summed over ranks (per-class correct and total counts)."""
        return [self._all_reduce(c.to(self._comm_device, torch.long)).to(c.device) for c in counts]

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a decision all ranks must share, e.g. whether a run is finished)."""
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self._comm_device.type == "cuda":
            dist.barrier(device_ids=[self._comm_device.index or 0])
        else:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo moves CPU tensors.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


# ---------------------------------------------------------------------------------------------------------
# Setting up
# ---------------------------------------------------------------------------------------------------------


def launched_with_torchrun() -> bool:
    """True in a process started by torchrun (or `python -m torch.distributed.run`) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_data_parallel(
    device: torch.device | str = "cpu", backend: str | None = None, timeout_s: float = 1800.0
) -> DataParallel | None:
    """The data-parallel group of this process, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); None in a plain one-process run. Set up once per process: later calls return
    the same group. On CUDA each rank takes GPU LOCAL_RANK and NCCL; on CPU, gloo (`PROMPTCLIP_DIST_BACKEND`
    overrides)."""
    global _current
    if _current is not None:
        return _current
    if not launched_with_torchrun() and not dist.is_initialized():
        return None
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank with LOCAL_RANK={local_rank} has no GPU ({torch.cuda.device_count()} visible); start at most "
                "as many processes per node as GPUs (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        chosen = backend or os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
    _current = DataParallel(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return _current


def current_data_parallel() -> DataParallel | None:
    """The group set up by `init_data_parallel`, or None."""
    return _current


def is_main_process() -> bool:
    """False only on ranks other than 0 of a data-parallel run (also before its group is set up): they must
    not write files or print results."""
    if _current is not None:
        return _current.is_main
    return not launched_with_torchrun() or int(os.environ.get("RANK", "0")) == 0


def shutdown() -> None:
    """Leave the process group (the end of a torchrun worker)."""
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None


# ---------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------


class _Indices(torch.utils.data.Dataset):
    """Stands in for a dataset of `length` items: yields the indices, so a loader's batch order can be read
    without reading any image."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


def _is_epoch_loader(loader: Any) -> bool:
    from promptclip.data.loader import EpochLoader

    return isinstance(loader, EpochLoader)


def global_batches(loader: Any, epoch: int) -> list[list[int]]:
    """The dataset indices of each batch `loader` (an `EpochLoader`) gives in `epoch`, in order."""
    from promptclip.data.loader import EpochLoader

    order = EpochLoader(
        _Indices(len(loader.dataset)),  # type: ignore[arg-type]
        loader.batch_size,
        shuffle=loader.shuffle,
        drop_last=loader.drop_last,
        seed=loader.seed,
    )
    order.set_epoch(epoch)
    return [batch.tolist() for batch in order]  # type: ignore[attr-defined]  # batches of indices here


class _FixedBatches(torch.utils.data.Sampler[list[int]]):
    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        self.batches = [list(b) for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _data_loader(loader: Any, batches: Sequence[Sequence[int]]) -> DataLoader:
    """A DataLoader over `loader`'s dataset that reads exactly `batches` (index lists), with its options."""
    from functools import partial

    from promptclip.data.loader import seed_worker

    loader.dataset.epoch = loader.epoch
    return DataLoader(
        loader.dataset,
        batch_sampler=_FixedBatches(batches),
        num_workers=loader.num_workers,
        worker_init_fn=partial(seed_worker, loader.seed, loader.epoch) if loader.num_workers else None,
        pin_memory=loader.pin_memory,
        persistent_workers=False,
    )


class ShardedTrainLoader:
    """This rank's share of every batch of a training `EpochLoader`: the same batches as the one-process
    loader (same order, same augmentations), each cut into N contiguous shares. Every rank gets as many
    batches as the one-process loader, so the ranks step together."""

    def __init__(self, loader: Any, group: DataParallel) -> None:
        if not _is_epoch_loader(loader):
            raise TypeError("data-parallel training needs a promptclip loader (promptclip.data.loader.build_loader)")
        if loader.batch_size < group.world_size:
            raise ValueError(
                f"data.batch_size {loader.batch_size} is smaller than the {group.world_size} ranks; the batch size "
                "is the global batch, cut into one share per rank: raise it or start fewer ranks"
            )
        if len(loader.dataset) < group.world_size:
            raise ValueError(
                f"the training set has {len(loader.dataset)} images, fewer than the {group.world_size} ranks"
            )
        self.loader = loader
        self.group = group

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        whole = global_batches(self.loader, self.loader.epoch)
        short = [len(batch) for batch in whole if len(batch) < self.group.world_size]
        if short:
            raise ValueError(
                f"a training batch of {short[0]} images cannot be shared among {self.group.world_size} ranks; "
                "drop the last partial batch (the training loader's drop_last) or start fewer ranks"
            )
        from promptclip.data.loader import add_pixel_keys

        mine = [batch[self.group.share(len(batch))] for batch in whole]
        for batch, indices in zip(_data_loader(self.loader, mine), whole, strict=True):
            batch[GLOBAL_BATCH_KEY] = len(indices)
            yield add_pixel_keys(batch, self.loader.dataset)  # the keys of this rank's share of the images


class _RankEvalLoader:
    """This rank's whole batches (r, r + N, ...) of an evaluation `EpochLoader`; the others are not read."""

    def __init__(self, loader: Any, group: DataParallel) -> None:
        self.loader = loader
        self.group = group

    def __len__(self) -> int:
        return len(self.group.rank_batches(range(len(self.loader))))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from promptclip.data.loader import add_pixel_keys

        batches = self.group.rank_batches(global_batches(self.loader, self.loader.epoch))
        if not batches:
            return iter(())
        loaded = iter(_data_loader(self.loader, batches))
        return (add_pixel_keys(batch, self.loader.dataset) for batch in loaded)


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("label", "image"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("a training batch needs 'image' or 'label' tensors to be shared among ranks")
