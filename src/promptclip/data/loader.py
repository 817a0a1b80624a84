"""Batches of a dataset split for training and evaluation: dicts `{image, label, index, path, mask?}`.

Reproducibility: every random number comes from seeds derived from (seed, epoch, ...):

- the shuffling order from (seed, epoch);
- each sample's crop and flip from (seed, epoch, sample index), so batches do not depend on the number of
  workers, and any epoch can be replayed on its own (resume at an epoch boundary gives the same batches);
- each worker's global generators (python, numpy, torch) from (seed, epoch, worker id), for any code that
  draws from them.

Masks (when asked for) share the image's crop and flip, and arrive as float `[B, 1, S, S]` in {0, 1}
(1 = foreground). A label-index mask's ignore pixels are background unless the mask store's
`ignore_as="foreground"`; see `promptclip.data.masks`.

A loader never has zero batches: `drop_last` applies only when the split holds at least one full batch
(the field dropped the only, partial batch of tiny few-shot sets and trained on nothing).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from promptclip.clip.transforms import EvalTransform, PairedEvalTransform, PairedTrainTransform, TrainTransform
from promptclip.data.datasets import build_dataset
from promptclip.data.datasets.base import DatasetError, DatasetSplits, Datum, SplitName
from promptclip.data.fewshot import Subset, fewshot_splits, subsample_classes
from promptclip.data.masks import MaskConfig, MaskError, align_mask, attach_masks, full_mask

logger = logging.getLogger("promptclip.data")

IN_MEMORY_WARN_ITEMS = 20_000  # decoded full-size images cost ~0.5 MB each
_SHUFFLE, _SAMPLE, _WORKER, _BASE = 1, 2, 3, 4  # streams of derived seeds


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across Python versions and machines)."""
    digest = hashlib.blake2b(repr(tuple(int(part) for part in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seed_worker(seed: int, epoch: int, worker_id: int) -> None:
    """`worker_init_fn`: seed python, numpy and torch in a worker from (seed, epoch, worker id)."""
    value = derive_seed(_WORKER, seed, epoch, worker_id)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


class SplitDataset(Dataset):
    """The items of one split as dicts; augmentation is seeded per (seed, epoch, index).

    `train` with `augment` gives random resized crops (area `scale`) flipped with probability `flip_p`;
    otherwise every item gets the deterministic evaluation crop. `in_memory=True` decodes every image (and
    mask) once, up front, and augments the decoded copy each epoch: meant for small few-shot sets.
    """

    def __init__(
        self,
        splits: DatasetSplits,
        data: Sequence[Datum],
        *,
        train: bool,
        image_size: int,
        with_masks: bool = False,
        seed: int = 0,
        in_memory: bool = False,
        scale: tuple[float, float] = (0.08, 1.0),
        flip_p: float = 0.5,
        augment: bool = True,
    ) -> None:
        if with_masks and not splits.has_masks:
            raise MaskError(
                f"dataset {splits.name!r} has no masks attached; call promptclip.data.masks.attach_masks "
                "(or pass the mask options) before asking for masks"
            )
        self.splits = splits
        self.data = list(data)
        self.train = train
        self.random_crops = train and augment
        self.with_masks = with_masks
        self.seed = seed
        self.epoch = 0
        self.transform: Any
        if self.random_crops:
            self.transform = (PairedTrainTransform if with_masks else TrainTransform)(
                image_size, scale=scale, flip_p=flip_p
            )
        else:
            self.transform = (PairedEvalTransform if with_masks else EvalTransform)(image_size)
        self._decoded: list[tuple[Image.Image, Image.Image | None]] | None = None
        if in_memory:
            self.preload()

    def preload(self) -> None:
        """Decode every image (and mask) once and keep them in memory."""
        if len(self.data) > IN_MEMORY_WARN_ITEMS:
            logger.warning("keeping %d decoded images in memory; this is meant for few-shot sets", len(self.data))
        self._decoded = [self._decode(datum) for datum in self.data]

    def _decode(self, datum: Datum) -> tuple[Image.Image, Image.Image | None]:
        image = self._load_image(datum)
        if not self.with_masks:
            return image, None
        mask = self.splits.load_mask(datum)
        return image, full_mask(image.size) if mask is None else align_mask(mask, image.size)

    def _load_image(self, datum: Datum) -> Image.Image:
        """The image of `datum`; a file that cannot be read stops with its path and the fixes, not a bare
        decoder error from inside a worker."""
        if self.splits.root is None:
            return self.splits.load_image(datum)  # rendered data: an error here is a bug, shown as it is
        try:
            return self.splits.load_image(datum)
        except DatasetError:
            raise
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            raise DatasetError(
                f"image {self.splits.root / datum.path} cannot be read ({type(err).__name__}: {err}); restore or "
                f"replace it (`promptclip data check --dataset {self.splits.name} --root {self.splits.root} "
                "--full-decode` lists every broken file), or leave such files out with --opts data.on_bad_image skip"
            ) from None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        datum = self.data[index]
        image, mask = self._decoded[index] if self._decoded is not None else self._decode(datum)
        generator = None
        if self.random_crops:
            generator = torch.Generator().manual_seed(derive_seed(_SAMPLE, self.seed, self.epoch, index))
        item: dict[str, Any] = {"label": datum.label, "index": index, "path": datum.path}
        if mask is None:
            item["image"] = self.transform(image, generator) if self.random_crops else self.transform(image)
            return item
        if self.random_crops:
            pixels, mask_values = self.transform(image, mask, generator)
        else:
            pixels, mask_values = self.transform(image, mask)
        item["image"] = pixels
        item["mask"] = (mask_values >= 128).to(torch.float32).unsqueeze(0)
        return item


class EpochLoader:
    """Iterates one epoch at a time through a fresh `DataLoader` seeded from (seed, epoch).

    Call `set_epoch(e)` before iterating epoch `e`; the same (seed, epoch) always gives the same batches,
    whatever the number of workers.
    """

    def __init__(
        self,
        dataset: SplitDataset,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        # Dropping the last partial batch must never leave a loader with no batch at all.
        self.drop_last = drop_last and len(dataset) >= batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.epoch = self.epoch
        sampler: RandomSampler | SequentialSampler
        if self.shuffle:
            order = torch.Generator().manual_seed(derive_seed(_SHUFFLE, self.seed, self.epoch))
            sampler = RandomSampler(self.dataset, generator=order)
        else:
            sampler = SequentialSampler(self.dataset)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            worker_init_fn=partial(seed_worker, self.seed, self.epoch) if self.num_workers else None,
            generator=torch.Generator().manual_seed(derive_seed(_BASE, self.seed, self.epoch)),
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        return iter(loader)


def build_loader(
    splits: DatasetSplits,
    split: SplitName | Sequence[Datum] = "train",
    *,
    batch_size: int,
    train: bool | None = None,
    image_size: int = 224,
    seed: int = 0,
    num_workers: int = 0,
    with_masks: bool | None = None,
    in_memory: bool = False,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    augment: bool = True,
    pin_memory: bool = False,
) -> EpochLoader:
    """A loader over a split (by name, or an explicit list of `Datum`).

    `train` (default: the split is "train") selects the random crop (area `scale`) + flip (`flip_p`),
    shuffling and `drop_last` (each overridable); evaluation, and training with `augment=False`, resize the
    short side and centre-crop. `with_masks` defaults to "training on a dataset with masks attached".
    """
    name = split if isinstance(split, str) else "given"
    data = splits.split(split) if isinstance(split, str) else list(split)
    if not data:
        raise DatasetError(f"the {name} split of {splits.name!r} is empty; there is nothing to load")
    is_train = (split == "train") if train is None else train
    dataset = SplitDataset(
        splits,
        data,
        train=is_train,
        image_size=image_size,
        with_masks=(is_train and splits.has_masks) if with_masks is None else with_masks,
        seed=seed,
        in_memory=in_memory,
        scale=scale,
        flip_p=flip_p,
        augment=augment,
    )
    return EpochLoader(
        dataset,
        batch_size,
        shuffle=is_train if shuffle is None else shuffle,
        drop_last=is_train if drop_last is None else drop_last,
        num_workers=num_workers,
        seed=seed,
        pin_memory=pin_memory,
    )


def prepare_splits(
    name: str,
    root: str | Path | None = None,
    *,
    options: dict[str, Any] | None = None,
    shots: int = 0,
    seed: int = 1,
    subset: Subset = "all",
    masks: MaskConfig | None = None,
    cache_dir: str | Path | None = None,
) -> DatasetSplits:
    """A run's data in the field's order: read the dataset, draw K shots per class over all classes (K < 1:
    all images), keep the base or new half of the classes, then attach and check the training masks."""
    splits = build_dataset(name, root, **(options or {}))
    splits = fewshot_splits(splits, shots, seed, cache_dir)
    splits = subsample_classes(splits, subset)
    return attach_masks(splits, masks) if masks is not None else splits
