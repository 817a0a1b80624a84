"""The synthetic world's classification tasks as datasets: rendered on the fly, with exact masks, no files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from promptclip.data import synthetic
from promptclip.data.datasets.base import (
    SPLIT_NAMES,
    DatasetBuilder,
    DatasetError,
    DatasetSplits,
    Datum,
    ExpectedLayout,
    register,
)

_RENDER_CACHE_IMAGES = 20_000  # about 250 MB at 64 px; the cache starts afresh when full


@dataclass
class SyntheticRenderer:
    """Renders a synthetic `Datum` (virtual id `<split>/<index>`) and its exact foreground mask."""

    task: synthetic.SyntheticTask
    description: str = "exact masks from the synthetic renderer"

    def _sample(self, datum: Datum) -> synthetic.SyntheticSample:
        split, _, index = datum.path.partition("/")
        try:
            return self.task.split(split)[int(index)]
        except (ValueError, IndexError):
            raise DatasetError(f"{datum.path!r} is not an image id of {self.task.name}") from None

    def __post_init__(self) -> None:
        self._rendered: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _render(self, datum: Datum) -> tuple[np.ndarray, np.ndarray]:
        """The image and mask of `datum`, rendered once: every epoch would otherwise draw them again."""
        if datum.path not in self._rendered:
            if len(self._rendered) >= _RENDER_CACHE_IMAGES:
                self._rendered.clear()
            self._rendered[datum.path] = self.task.render_sample(self._sample(datum))
        return self._rendered[datum.path]

    def load_image(self, datum: Datum) -> Image.Image:
        return Image.fromarray(self._render(datum)[0], mode="RGB")

    def load(self, datum: Datum) -> Image.Image:
        return Image.fromarray(np.where(self._render(datum)[1], 255, 0).astype(np.uint8), mode="L")

    def missing(self, data: Sequence[Datum]) -> list[Datum]:
        return []


class SyntheticDataset(DatasetBuilder):
    """A task of the procedural synthetic world (`root` is not needed and ignored)."""

    needs_root: ClassVar[bool] = False

    def __init__(
        self,
        *,
        seed: int = 0,
        train_per_class: int = 32,
        val_per_class: int = 8,
        test_per_class: int = 32,
        image_size: int = 64,
        spurious: float | None = None,
        style: str | None = None,
        style_strength: float | None = None,
        test_scenes: str | None = None,
    ) -> None:
        given: dict[str, tuple[object, type]] = {
            "seed": (seed, int),
            "train_per_class": (train_per_class, int),
            "val_per_class": (val_per_class, int),
            "test_per_class": (test_per_class, int),
            "image_size": (image_size, int),
            "spurious": (spurious, float),
            "style": (style, str),
            "style_strength": (style_strength, float),
            "test_scenes": (test_scenes, str),
        }
        self.task_options: dict[str, int | float | str] = {}
        for option, (value, kind) in given.items():
            if value is None:  # the task's own default
                continue
            try:
                self.task_options[option] = kind(value)
            except (TypeError, ValueError):
                what, example = ("an integer", "64") if kind is int else ("a number", "0.5")
                raise DatasetError(
                    f"{self.name}: option {option}={value!r} is not {what}; give one, e.g. --set {option}={example} "
                    f"(data.options.{option} in a recipe)"
                ) from None

    def build(self, root: str | Path | None) -> DatasetSplits:
        try:
            task = synthetic.build_task(self.name, **self.task_options)  # type: ignore[arg-type]
        except ValueError as err:
            raise DatasetError(f"{self.name}: {err}") from None
        splits = {
            split: [
                Datum(f"{split}/{index:06d}", sample.label, task.classnames[sample.label])
                for index, sample in enumerate(task.split(split))
            ]
            for split in SPLIT_NAMES
        }
        renderer = SyntheticRenderer(task)
        counts = self.task_options
        num_classes = len(task.classnames)
        return DatasetSplits(
            name=self.name,
            root=None,
            classnames=list(task.classnames),
            template=task.template,
            train=splits["train"],
            val=splits["val"],
            test=splits["test"],
            reader=renderer,
            masks=renderer,
            expected=ExpectedLayout(
                num_classes, {split: num_classes * int(counts[f"{split}_per_class"]) for split in SPLIT_NAMES}
            ),
            info={"split_source": f"synthetic world, seed {counts['seed']}", "task_options": dict(counts)},
        )


@register
class SyntheticObjects(SyntheticDataset):
    """Synthetic objects: 24 colour+shape classes rendered on the fly, exact masks, 'a photo of a {}.'"""

    name: ClassVar[str] = "synthetic_objects"


@register
class SyntheticShapes(SyntheticDataset):
    """Synthetic shapes: 10 shapes in random colours rendered on the fly, exact masks, 'a photo of a {}.'"""

    name: ClassVar[str] = "synthetic_shapes"


@register
class SyntheticScenes(SyntheticDataset):
    """Synthetic scenes: 10 background scenes rendered on the fly, exact masks, 'a photo of a {} background.'"""

    name: ClassVar[str] = "synthetic_scenes"


@register
class SyntheticKinds(SyntheticDataset):
    """Synthetic kinds: 30 pseudo-word kinds (a silhouette and a marking) in random colours, no style."""

    name: ClassVar[str] = "synthetic_kinds"


@register
class SyntheticKindsPixel(SyntheticDataset):
    """Synthetic kinds in a pixelated style that pretraining rarely shows; its own base/new split."""

    name: ClassVar[str] = "synthetic_kinds_pixel"


@register
class SyntheticKindsNoise(SyntheticDataset):
    """Synthetic kinds under heavy pixel noise that pretraining rarely shows; its own base/new split."""

    name: ClassVar[str] = "synthetic_kinds_noise"


@register
class SyntheticKindsFaded(SyntheticDataset):
    """Synthetic kinds in a faded, low-contrast style that pretraining rarely shows; its own base/new split."""

    name: ClassVar[str] = "synthetic_kinds_faded"


@register
class SyntheticKindsSpurious(SyntheticDataset):
    """10 synthetic kinds, each always on its own scene at training and on another class's scene at test."""

    name: ClassVar[str] = "synthetic_kinds_spurious"
