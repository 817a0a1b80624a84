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

Given a `device`, a loader hands out batches already on it, their pixels finished there (`pixels`, see
`promptclip.data.device_pixels`: 8-bit crops normalised on a GPU by default, or decoded images cropped there).
Deterministic crops (evaluation, training without augmentation) are kept in a memory-bounded `CropCache`
(`promptclip.data.crop_cache`), so an image evaluated again is neither decoded nor resized again; the batches
are bitwise those of the uncached path.

Batches whose pixels are the same at every epoch (deterministic crops: evaluation, training without
augmentation) also carry `PIXELS_KEY`: one int per image naming its pixels within the process, so that a
learner may keep what it derives from them across epochs (PromptKD's frozen teacher features).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from promptclip.clip.pixels import to_rgb
from promptclip.clip.transforms import (
    Augmentation,
    EvalTransform,
    PairedEvalTransform,
    PairedTrainTransform,
    TrainTransform,
    mask_to_tensor,
    pil_to_uint8,
)
from promptclip.data.crop_cache import SHARED_CROP_CACHE, CropCache, CropStore, Signature
from promptclip.data.datasets import build_dataset
from promptclip.data.datasets.base import DatasetError, DatasetSplits, Datum, SplitName
from promptclip.data.device_pixels import CROP_KEY, PIXEL_FORMATS, PixelFormat, collate_decoded, finish_batch
from promptclip.data.fewshot import Subset, fewshot_splits, subsample_classes
from promptclip.data.masks import MaskConfig, MaskError, align_mask, attach_masks, full_mask

if TYPE_CHECKING:
    from promptclip.config import DataConfig

logger = logging.getLogger("promptclip.data")

IN_MEMORY_WARN_ITEMS = 20_000  # decoded full-size images cost ~0.5 MB each
MAX_AUTO_WORKERS = 16
_SHUFFLE, _SAMPLE, _WORKER, _BASE = 1, 2, 3, 4  # streams of derived seeds

PIXELS_KEY = "pixels_key"
"""Batch entry of a batch whose pixels repeat at every epoch: a list of ints, one per image, equal for the same
image at every epoch and never equal for two images of the process (another dataset, another index). A list,
not a tensor, so it stays on the host when the batch moves to a device and reading it waits for nothing. Absent
when the crops are random. Code that changes a batch's images must drop it."""
_INDEX_BITS = 32  # a pixel key is (the dataset's token << 32) | the image's index
_DATASET_TOKENS = itertools.count()


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
        self.pixels_token = next(_DATASET_TOKENS)  # this dataset's part of its images' pixel keys
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
        return self.item(index)

    def item(self, index: int, pixels: PixelFormat = "float") -> dict[str, Any]:
        """Item `index` with its pixels taken as far as `pixels` says (see `promptclip.data.device_pixels`)."""
        datum = self.data[index]
        image, mask = self._decoded[index] if self._decoded is not None else self._decode(datum)
        generator = None
        if self.random_crops:
            generator = torch.Generator().manual_seed(derive_seed(_SAMPLE, self.seed, self.epoch, index))
        item: dict[str, Any] = {"label": datum.label, "index": index, "path": datum.path}
        if pixels == "decoded":
            return self._decoded_item(item, image, mask, generator)
        if pixels == "uint8":
            pixels_u8, mask_values = self._crops(image, mask, generator)
            item["image"] = pixels_u8
        elif mask is None:
            item["image"] = self.transform(image, generator) if self.random_crops else self.transform(image)
            return item
        elif self.random_crops:
            item["image"], mask_values = self.transform(image, mask, generator)
        else:
            item["image"], mask_values = self.transform(image, mask)
        if mask_values is not None:
            item["mask"] = (mask_values >= 128).to(torch.float32).unsqueeze(0)
        return item

    def _crops(
        self, image: Image.Image, mask: Image.Image | None, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The transform's 8-bit crop of the image (and of the mask's raw values), before any float step."""
        transform = self.transform
        if not self.random_crops:
            crop = pil_to_uint8(transform.crop(image))
            if mask is None:
                return crop, None
            return crop, mask_to_tensor(transform.resize_and_crop(mask, Image.Resampling.NEAREST))
        rgb = to_rgb(image)
        box, flip = transform.draw(rgb.width, rgb.height, generator)
        crop = pil_to_uint8(transform.apply(rgb, box, flip, Image.Resampling.BICUBIC))
        if mask is None:
            return crop, None
        return crop, mask_to_tensor(transform.apply(mask, box, flip, Image.Resampling.NEAREST))

    def _decoded_item(
        self, item: dict[str, Any], image: Image.Image, mask: Image.Image | None, generator: torch.Generator | None
    ) -> dict[str, Any]:
        """The decoded image (and the mask's raw values) at full size, with the drawn crop box and flip."""
        item["image"] = pil_to_uint8(image)
        if mask is not None:
            item["mask"] = mask_to_tensor(mask)
        if self.random_crops:
            (top, left, height, width), flip = self.transform.draw(image.width, image.height, generator)
            item[CROP_KEY] = torch.tensor([top, left, height, width, int(flip)])
        return item

    def pixel_keys(self, indices: Sequence[int]) -> list[int] | None:
        """The `PIXELS_KEY` entries of items `indices`; None when the crops are random (new pixels each epoch)."""
        if self.random_crops:
            return None
        base = self.pixels_token << _INDEX_BITS
        return [base | int(index) for index in indices]

    def crop_source(self) -> tuple[Any, object] | None:
        """(a name of where the images come from, an object to keep alive with it) for a `CropCache`, or None
        when this dataset's crops are not kept: random crops, masks, or no folder and no reader."""
        if self.random_crops or self.with_masks:
            return None
        if self.splits.reader is not None:
            return ("reader", id(self.splits.reader)), self.splits.reader
        if self.splits.root is not None:
            return ("folder", str(self.splits.root)), None
        return None

    def signatures(self, indices: Sequence[int]) -> list[Signature]:
        """What tells the versions of the images' files apart: (modification time, size); None when rendered."""
        if self.splits.reader is not None or self.splits.root is None:
            return [None] * len(indices)
        root = str(self.splits.root)
        out: list[Signature] = []
        for index in indices:
            try:
                status = os.stat(os.path.join(root, self.data[index].path))
                out.append((status.st_mtime_ns, status.st_size))
            except OSError:
                out.append(("missing", index))  # never equal to a stored signature: read (and fail) as usual
        return out


class _PixelView(Dataset):
    """A `SplitDataset` whose items carry pixels in another format (for one iteration of a loader)."""

    def __init__(self, dataset: SplitDataset, pixels: PixelFormat) -> None:
        self.dataset = dataset
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset.item(index, self.pixels)


class _FixedBatches(Sampler[list[int]]):
    def __init__(self, batches: Sequence[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EpochLoader:
    """Iterates one epoch at a time through a fresh `DataLoader` seeded from (seed, epoch).

    Call `set_epoch(e)` before iterating epoch `e`; the same (seed, epoch) always gives the same batches,
    whatever the number of workers. With a `device`, batches arrive on it with their pixels finished there
    (`pixels`); with a `crop_cache`, deterministic crops are served from memory when kept.
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
        pixels: PixelFormat = "float",
        device: torch.device | None = None,
        crop_cache: CropCache | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pixels not in PIXEL_FORMATS:
            raise ValueError(f"pixels must be one of {', '.join(PIXEL_FORMATS)}, got {pixels!r}")
        if pixels != "float" and device is None:
            raise ValueError(f"pixels={pixels!r} finishes the pixels on a device: give the loader its device")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        # Dropping the last partial batch must never leave a loader with no batch at all.
        self.drop_last = drop_last and len(dataset) >= batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.pixels = pixels
        self.device = device
        self.crop_cache = crop_cache
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.epoch = self.epoch
        store = self._crop_store()
        if self.pixels == "float" and self.device is None and store is None:
            loaded = iter(self._data_loader(self.dataset, sampler=self._sampler()))
            if not isinstance(self.dataset, SplitDataset):  # a stand-in that yields bare indices
                return loaded
            return (add_pixel_keys(batch, self.dataset) for batch in loaded)
        return self._batches(store)

    def _sampler(self) -> RandomSampler | SequentialSampler:
        if self.shuffle:
            order = torch.Generator().manual_seed(derive_seed(_SHUFFLE, self.seed, self.epoch))
            return RandomSampler(self.dataset, generator=order)
        return SequentialSampler(self.dataset)

    def _data_loader(self, dataset: Dataset, **batching: Any) -> DataLoader:
        if "batch_sampler" not in batching:
            batching.update(batch_size=self.batch_size, drop_last=self.drop_last)
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            worker_init_fn=partial(seed_worker, self.seed, self.epoch) if self.num_workers else None,
            generator=torch.Generator().manual_seed(derive_seed(_BASE, self.seed, self.epoch)),
            pin_memory=self.pin_memory,
            persistent_workers=False,
            **batching,
        )

    def _crop_store(self) -> CropStore | None:
        source = self.dataset.crop_source() if self.crop_cache is not None else None
        if self.crop_cache is None or source is None:
            return None
        name, owner = source
        return self.crop_cache.store(name, self.dataset.transform.image_size, owner)

    def _batches(self, store: CropStore | None) -> Iterator[dict[str, Any]]:
        """The epoch's batches, the kept ones from `store`, the others through a DataLoader, finished on the
        device when the loader has one."""
        order = [list(batch) for batch in BatchSampler(self._sampler(), self.batch_size, self.drop_last)]
        data = self.dataset.data
        paths = [[data[i].path for i in batch] for batch in order]
        signatures = [self.dataset.signatures(batch) if store is not None else [] for batch in order]
        kept = [store is not None and store.has_all(p, s) for p, s in zip(paths, signatures, strict=True)]
        # Crops to keep must arrive as 8-bit crops; a kept crop replaces decoding, so never ask for decoded.
        pixels: PixelFormat = "uint8" if store is not None else self.pixels
        to_read = [batch for batch, hit in zip(order, kept, strict=True) if not hit]
        loaded = iter(())
        if to_read:
            view = _PixelView(self.dataset, pixels)
            collate = collate_decoded if pixels == "decoded" else None
            loaded = iter(self._data_loader(view, batch_sampler=_FixedBatches(to_read), collate_fn=collate))
        size = self.dataset.transform.image_size
        for batch_paths, batch_signatures, indices, hit in zip(paths, signatures, order, kept, strict=True):
            if hit:
                assert store is not None
                batch = self._kept_batch(store, indices, batch_paths)
            else:
                batch = next(loaded)
                if store is not None:
                    store.put(batch_paths, batch_signatures, batch["image"])
            add_pixel_keys(batch, self.dataset)
            yield finish_batch(batch, size, self.device) if self.device is not None or pixels != "float" else batch

    def _kept_batch(self, store: CropStore, indices: list[int], paths: list[str]) -> dict[str, Any]:
        """A batch of kept crops, laid out as the DataLoader lays out read ones (pinned as it pins them: a copy
        from pageable memory would wait for the GPU's queue)."""
        batch: dict[str, Any] = {
            "label": torch.tensor([self.dataset.data[i].label for i in indices]),
            "index": torch.tensor(indices),
            "path": paths,
            "image": store.get(paths),
        }
        if self.pin_memory:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch


def add_pixel_keys(batch: dict[str, Any], dataset: SplitDataset) -> dict[str, Any]:
    """`batch` (of `dataset`, its indices still on the host) with its `PIXELS_KEY` entry when its pixels repeat
    at every epoch; changed in place."""
    keys = dataset.pixel_keys(batch["index"].tolist())
    if keys is not None:
        batch[PIXELS_KEY] = keys
    return batch


def training_augmentation(data: DataConfig) -> Augmentation:
    """The augmentation of a run's training images (`data.augment`, `data.crop_scale`, `data.flip`)."""
    scale = (float(data.crop_scale[0]), float(data.crop_scale[1]))
    return Augmentation(data.augment != "none", scale, 0.5 if data.flip else 0.0)


def resolve_num_workers(num_workers: int, device: torch.device | str | None) -> int:
    """`num_workers` itself, or for -1 (auto) `default_num_workers(device)`."""
    return default_num_workers(device) if num_workers < 0 else num_workers


def default_num_workers(device: torch.device | str | None) -> int:
    """Auto workers: on a GPU every CPU core this process may use but one (kept for the training loop), at most
    `MAX_AUTO_WORKERS`; on a CPU none, since the model's own threads use the cores (see docs/performance.md for
    the images per second a worker gives)."""
    if device is None or torch.device(device).type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, cores - 1))


def build_loader(
    splits: DatasetSplits,
    split: SplitName | Sequence[Datum] = "train",
    *,
    batch_size: int,
    train: bool | None = None,
    image_size: int = 224,
    seed: int = 0,
    num_workers: int = -1,
    with_masks: bool | None = None,
    in_memory: bool = False,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    augment: bool = True,
    pin_memory: bool | None = None,
    device: torch.device | str | None = None,
    pixels: PixelFormat | Literal["auto"] = "auto",
    crop_cache: CropCache | None = SHARED_CROP_CACHE,
) -> EpochLoader:
    """A loader over a split (by name, or an explicit list of `Datum`).

    `train` (default: the split is "train") selects the random crop (area `scale`) + flip (`flip_p`),
    shuffling and `drop_last` (each overridable); evaluation, and training with `augment=False`, resize the
    short side and centre-crop. `with_masks` defaults to "training on a dataset with masks attached".

    `device`: batches arrive on it, copied from pinned memory (`pin_memory`, default: on CUDA) without
    blocking; `pixels` says how much of the pixel work is left to it (`auto`: `uint8` on a GPU, `float`
    otherwise; see `promptclip.data.device_pixels`). `num_workers=-1` (auto): see `default_num_workers`.
    `crop_cache`: where deterministic crops are kept across iterations and loaders (the process's shared
    cache by default; None keeps none).
    """
    name = split if isinstance(split, str) else "given"
    data = splits.split(split) if isinstance(split, str) else list(split)
    if not data:
        raise DatasetError(f"the {name} split of {splits.name!r} is empty; there is nothing to load")
    is_train = (split == "train") if train is None else train
    target = torch.device(device) if device is not None else None
    on_gpu = target is not None and target.type == "cuda"
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
        num_workers=resolve_num_workers(num_workers, target),
        seed=seed,
        pin_memory=on_gpu if pin_memory is None else pin_memory,
        pixels=("uint8" if on_gpu else "float") if pixels == "auto" else pixels,
        device=target,
        crop_cache=crop_cache,
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
