"""Deterministic crops kept in memory: an image evaluated again is not decoded and resized again.

The evaluation transform (and training with `data.augment none`) gives every image the same crop each time,
so its 8-bit pixels can be kept and served to the next evaluation of the same images: the later runs of a
sweep (seeds x shots x methods on one test set) or a loader iterated twice. A crop of 224 px takes 147 KiB.

A `CropCache` holds one `CropStore` per image source (a folder on disk, or a rendering reader) and crop size,
within a byte budget: adding to a full cache first drops the stores used longest ago, and a store that alone
fills the budget keeps the crops it has (a test set larger than the budget is served from memory up to the
budget and read from disk beyond it, rather than evicting its own first images each time).

Images on disk are named by their folder and relative path, and a crop is served only while the file keeps
the modification time and size it had when it was read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

DEFAULT_CROP_CACHE_MIB = 1024
"""Default budget: about 7,100 crops of 224 px."""


Signature = Hashable
"""What tells a file's versions apart (its modification time and size); None for rendered images."""


class CropStore:
    """uint8 crops ``[3, S, S]`` of one image source and size, by image path (with the file's signature)."""

    def __init__(self, cache: CropCache, key: Hashable, owner: object) -> None:
        self._cache = cache
        self.key = key
        self.owner = owner  # keeps a reader alive while its id names this store
        self.crops: dict[str, tuple[Signature, torch.Tensor]] = {}
        self.nbytes = 0

    def has_all(self, paths: Sequence[str], signatures: Sequence[Signature]) -> bool:
        """Whether every path is stored, from the same version of its file."""
        return bool(paths) and all(
            path in self.crops and self.crops[path][0] == signature
            for path, signature in zip(paths, signatures, strict=True)
        )

    def get(self, paths: Sequence[str]) -> torch.Tensor:
        """The crops of `paths` stacked ``[B, 3, S, S]`` (every one must be stored)."""
        self._cache.hits += len(paths)
        return torch.stack([self.crops[path][1] for path in paths])

    def put(self, paths: Sequence[str], signatures: Sequence[Signature], crops: torch.Tensor) -> None:
        """Keep the uint8 crops ``[B, 3, S, S]`` of `paths`, as far as the budget allows."""
        self._cache.misses += len(paths)
        for path, signature, crop in zip(paths, signatures, crops, strict=True):
            size = crop.numel() * crop.element_size()
            if path in self.crops:
                self.nbytes -= size
                del self.crops[path]
            if not self._cache.make_room(size, keep=self):
                return
            self.crops[path] = (signature, crop.clone())  # not a view that would keep the whole batch alive
            self.nbytes += size


class CropCache:
    """Crops of deterministic transforms by (image source, size), at most `max_bytes` in all (see the module)."""

    def __init__(self, max_bytes: int = DEFAULT_CROP_CACHE_MIB * 2**20) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._stores: OrderedDict[Hashable, CropStore] = OrderedDict()

    def store(self, source: Hashable, image_size: int, owner: object = None) -> CropStore:
        """The store of `source` (a hashable name of where the images come from) at `image_size`."""
        key = (source, image_size)
        if key not in self._stores:
            self._stores[key] = CropStore(self, key, owner)
        self._stores.move_to_end(key)
        return self._stores[key]

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self._stores.values())

    def make_room(self, size: int, keep: CropStore) -> bool:
        """Whether `size` more bytes fit, after dropping the stores other than `keep` used longest ago."""
        while self.nbytes + size > self.max_bytes:
            others = [key for key in self._stores if key != keep.key]
            if not others:
                return False
            del self._stores[others[0]]
        return True

    def clear(self) -> None:
        self._stores.clear()


SHARED_CROP_CACHE = CropCache()
"""The process's cache, used by `build_loader` unless it is given another one or None."""
