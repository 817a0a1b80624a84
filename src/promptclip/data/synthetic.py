"""A procedural synthetic world: coloured shapes on textured scenes, with exact masks and captions.

Every image is a pure function of its :class:`SceneSpec` (shape, colour, scene, size, position, seed), so a
data set built from it needs no download, is identical on every machine and can be rendered on the fly.
The rendering (scenes, shapes, exact foreground masks, images) is :mod:`promptclip.data.synthetic_render`,
whose public names are re-exported here; this module builds on it the captions, the downstream tasks, the
pretraining specs and the export to CoOp's folder layout.

Downstream classification tasks (:func:`build_task`):

- ``synthetic_objects``: 24 colour+shape classes (:data:`OBJECT_CLASSES`), e.g. "red star".
- ``synthetic_shapes``: the 10 shapes, in random colours.
- ``synthetic_scenes``: the 10 background scenes; the object is a random distractor.

The training split can carry a controlled spurious correlation between class and background scene
(``spurious``): the shortcut holds at training time and is absent from validation and test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptclip.data.synthetic_render import (
    COLOURS,
    SCENES,
    SHAPES,
    SIZE_RANGE,
    SceneSpec,
    check_image_size,
    contact_sheet,
    render,
    render_background,
    render_batch,
)
from promptclip.io import atomic_write_json, atomic_write_with

__all__ = [
    "COLOURS",
    "OBJECT_CLASSES",
    "SCENES",
    "SHAPES",
    "SIZE_RANGE",
    "TASK_NAMES",
    "SceneSpec",
    "SyntheticSample",
    "SyntheticTask",
    "build_task",
    "caption",
    "contact_sheet",
    "export_task",
    "position_phrase",
    "render",
    "render_background",
    "render_batch",
    "sample_pretraining_specs",
    "size_word",
    "spurious_scene",
]

TASK_NAMES: tuple[str, ...] = ("synthetic_objects", "synthetic_shapes", "synthetic_scenes")

#: The fixed (colour, shape) classes of ``synthetic_objects``. Every colour and every shape appears in at
#: least two classes, and the first and second halves share attributes but no class, so a base/new split
#: asks for new combinations of attributes already seen.
OBJECT_CLASSES: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "star"),
    ("purple", "cross"),
    ("orange", "heart"),
    ("pink", "diamond"),
    ("white", "ring"),
    ("black", "hexagon"),
    ("cyan", "crescent"),
    ("purple", "circle"),
    ("orange", "square"),
    ("pink", "triangle"),
    ("white", "star"),
    ("black", "cross"),
    ("cyan", "heart"),
    ("red", "diamond"),
    ("green", "ring"),
    ("blue", "hexagon"),
    ("yellow", "crescent"),
    ("black", "circle"),
    ("cyan", "square"),
    ("red", "triangle"),
    ("green", "star"),
)

_TEMPLATES: dict[str, str] = {
    "synthetic_objects": "a photo of a {}.",
    "synthetic_shapes": "a photo of a {}.",
    "synthetic_scenes": "a photo of a {} background.",
}

_SPLITS: tuple[str, ...] = ("train", "val", "test")


# ------------------------------------------------------------------------------------------------ captions

_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium-sized", "mid-sized"),
    "large": ("big", "large"),
}

_SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on grass", "on the grass"),
    "sky": ("in the sky", "against the sky"),
    "brick wall": ("on a brick wall", "in front of a brick wall"),
    "water": ("on water", "floating on the water"),
    "sand": ("on sand", "on the sand"),
    "snow": ("on snow", "on the snow"),
    "forest": ("in a forest", "in front of a forest"),
    "night sky": ("in the night sky", "against the night sky"),
    "road": ("on a road", "on the road"),
    "tiled floor": ("on a tiled floor", "on the tiled floor"),
}

_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {scene}.",
    "a photo of a {size} {colour} {shape} {position}, {scene}.",
    "a {colour} {shape} {position} of the picture, {scene}.",
    "there is a {size} {colour} {shape} {scene}, {position}.",
    "an image of a {colour} {shape} {scene}.",
    "a {size} {shape} in {colour}, {position}, {scene}.",
    "{scene_cap}, a {size} {colour} {shape} {position}.",
    "a rendering of a {colour} {shape}: {size}, {position}, {scene}.",
)

_POSITION_PHRASES: dict[tuple[str, str], str] = {
    ("top", "left"): "in the top left",
    ("top", "centre"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "centre"): "in the centre",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "centre"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}


def size_word(size: float) -> str:
    """Size category of a spec's ``size``: "small" (< 0.43), "large" (>= 0.57) or "medium".

    The thresholds cut :data:`SIZE_RANGE` into thirds.
    """
    if size < 0.43:
        return "small"
    return "large" if size >= 0.57 else "medium"


def position_phrase(cx: float, cy: float) -> str:
    """Where the object sits, on a 3 x 3 grid: "in the top left", "in the centre", "at the bottom", ..."""
    horizontal = "left" if cx < 0.4 else ("right" if cx > 0.6 else "centre")
    vertical = "top" if cy < 0.4 else ("bottom" if cy > 0.6 else "middle")
    return _POSITION_PHRASES[(vertical, horizontal)]


def caption(spec: SceneSpec, variant: int = 0) -> str:
    """A caption naming the colour, the shape and the scene, and in most variants the size and position.

    ``variant`` (any non-negative integer) chooses the sentence pattern and the synonyms, so a training
    loop can draw varied captions for the same image; the same variant always gives the same text.
    """
    if variant < 0:
        raise ValueError(f"caption variant must be a non-negative integer, got {variant}")
    pattern = _CAPTION_TEMPLATES[variant % len(_CAPTION_TEMPLATES)]
    synonym = (variant // len(_CAPTION_TEMPLATES)) % 2
    sizes = _SIZE_WORDS[size_word(spec.size)]
    scenes = _SCENE_PHRASES[spec.scene]
    scene_phrase = scenes[synonym % len(scenes)]
    text = pattern.format(
        size=sizes[synonym % len(sizes)],
        colour=spec.colour,
        shape=spec.shape,
        position=position_phrase(spec.cx, spec.cy),
        scene=scene_phrase,
        scene_cap=scene_phrase[0].upper() + scene_phrase[1:],
    )
    # "a orange" -> "an orange": articles follow the word that was substituted after them.
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


# ------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class SyntheticSample:
    """One labelled image of a task: render it with ``render(sample.spec, task.image_size)``."""

    spec: SceneSpec
    label: int


@dataclass
class SyntheticTask:
    """A classification data set drawn from the synthetic world, split into train/val/test.

    ``classnames[label]`` is the readable class name and ``template`` the prompt it fits into
    (``template.format(classname)``). ``spurious`` records the train-split background shortcut strength.
    """

    name: str
    classnames: list[str]
    template: str
    train: list[SyntheticSample]
    val: list[SyntheticSample]
    test: list[SyntheticSample]
    image_size: int
    spurious: float = 0.0
    seed: int = 0
    scene_of_class: list[str] = field(default_factory=list)

    def split(self, split: str) -> list[SyntheticSample]:
        """The samples of "train", "val" or "test"."""
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(_SPLITS)}")
        samples: list[SyntheticSample] = getattr(self, split)
        return samples

    def render_sample(self, sample: SyntheticSample) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of one sample at the task's image size."""
        return render(sample.spec, self.image_size)


def spurious_scene(task_name: str, label: int) -> str:
    """The background scene a class is tied to when ``spurious`` > 0: ``SCENES[label % len(SCENES)]``."""
    if task_name not in TASK_NAMES:
        raise ValueError(f"unknown synthetic task {task_name!r}; choose one of: {', '.join(TASK_NAMES)}")
    return SCENES[label % len(SCENES)]


def _classnames(name: str) -> list[str]:
    if name == "synthetic_objects":
        return [f"{colour} {shape}" for colour, shape in OBJECT_CLASSES]
    if name == "synthetic_shapes":
        return list(SHAPES)
    return list(SCENES)


def _stream(*key: int) -> np.random.Generator:
    """A generator for one named stream of draws; separate streams keep every field prefix-stable."""
    return np.random.default_rng([int(k) for k in key])


def _class_samples(
    name: str, seed: int, split_index: int, label: int, count: int, spurious: float
) -> list[SyntheticSample]:
    """``count`` samples of one class in one split.

    Each quantity has its own stream keyed by (seed, task, split, label, field), so asking for more samples
    only appends: the first k samples are the same for any count >= k.
    """
    key = (seed, TASK_NAMES.index(name), split_index, label)
    shapes = _stream(*key, 0).integers(0, len(SHAPES), count)
    colours = _stream(*key, 1).integers(0, len(COLOURS), count)
    scenes = _stream(*key, 2).integers(0, len(SCENES), count)
    shortcut = _stream(*key, 3).random(count) < spurious
    sizes = _stream(*key, 4).uniform(*SIZE_RANGE, count)
    place = _stream(*key, 5).random((count, 2))
    seeds = _stream(*key, 6).integers(0, 2**62, count)
    colour_names = tuple(COLOURS)
    samples = []
    for j in range(count):
        shape, colour, scene = SHAPES[shapes[j]], colour_names[colours[j]], SCENES[scenes[j]]
        if name == "synthetic_objects":
            colour, shape = OBJECT_CLASSES[label]
        elif name == "synthetic_shapes":
            shape = SHAPES[label]
        else:
            scene = SCENES[label]
        if shortcut[j]:
            scene = spurious_scene(name, label)
        size = float(sizes[j])
        cx, cy = (size / 2 + (1.0 - size) * place[j]).tolist()
        spec = SceneSpec(shape, colour, scene, size, cx, cy, int(seeds[j]))
        samples.append(SyntheticSample(spec, label))
    return samples


def _check_count(field_name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"build_task: {field_name} must be an integer >= {minimum}, got {value!r}")


def build_task(
    name: str,
    *,
    seed: int = 0,
    train_per_class: int = 32,
    val_per_class: int = 8,
    test_per_class: int = 32,
    image_size: int = 64,
    spurious: float = 0.0,
) -> SyntheticTask:
    """Build one of :data:`TASK_NAMES` as class-balanced train/val/test lists of specs (nothing rendered).

    ``spurious`` in [0, 1] ties background and class in the train split only: with that probability a
    training sample's scene is ``spurious_scene(name, label)``, otherwise a uniformly random scene (which may
    also be the tied one). Validation and test scenes are always uniform. ``synthetic_scenes`` accepts only
    ``spurious=0`` because its class *is* the scene. The result is a pure function of the arguments.
    """
    if name not in TASK_NAMES:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    _check_count("seed", seed, 0)
    _check_count("train_per_class", train_per_class, 1)
    _check_count("val_per_class", val_per_class, 0)
    _check_count("test_per_class", test_per_class, 1)
    check_image_size(image_size)
    if not 0.0 <= spurious <= 1.0:
        raise ValueError(f"build_task: spurious must be in [0, 1] (a probability), got {spurious}")
    if name == "synthetic_scenes" and spurious > 0:
        raise ValueError(
            "build_task: spurious > 0 is not applicable to synthetic_scenes (its label is the background "
            "scene); use synthetic_objects or synthetic_shapes, or set spurious=0"
        )
    classnames = _classnames(name)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    splits: dict[str, list[SyntheticSample]] = {}
    for split_index, split in enumerate(_SPLITS):
        strength = spurious if split == "train" else 0.0
        splits[split] = [
            sample
            for label in range(len(classnames))
            for sample in _class_samples(name, seed, split_index, label, counts[split], strength)
        ]
    return SyntheticTask(
        name=name,
        classnames=classnames,
        template=_TEMPLATES[name],
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        image_size=image_size,
        spurious=float(spurious),
        seed=int(seed),
        scene_of_class=[spurious_scene(name, label) for label in range(len(classnames))],
    )


def _block_permutation_indices(rng: np.random.Generator, count: int, period: int) -> np.ndarray:
    """Concatenated random permutations of range(period): every full block covers every value once."""
    blocks = -(-count // period)
    return np.concatenate([rng.permutation(period) for _ in range(blocks)])[:count]


def sample_pretraining_specs(count: int, seed: int) -> list[SceneSpec]:
    """``count`` random specs for image-caption pretraining over every shape, colour and scene.

    Shapes, colours and scenes each run through shuffled blocks of all their values, so each aligned block
    of 10 specs (0-9, 10-19, ...) covers every shape, colour and scene; the three attributes are paired at
    random. The list is prefix-stable: the first k specs are the same for any count >= k.
    """
    _check_count("count", count, 0)
    _check_count("seed", seed, 0)
    tag = 1_000_003  # keeps these streams apart from build_task's
    shapes = _block_permutation_indices(_stream(tag, seed, 0), count, len(SHAPES))
    colours = _block_permutation_indices(_stream(tag, seed, 1), count, len(COLOURS))
    scenes = _block_permutation_indices(_stream(tag, seed, 2), count, len(SCENES))
    sizes = _stream(tag, seed, 3).uniform(*SIZE_RANGE, count)
    place = _stream(tag, seed, 4).random((count, 2))
    seeds = _stream(tag, seed, 5).integers(0, 2**62, count)
    colour_names = tuple(COLOURS)
    specs = []
    for j in range(count):
        size = float(sizes[j])
        cx, cy = (size / 2 + (1.0 - size) * place[j]).tolist()
        specs.append(
            SceneSpec(SHAPES[shapes[j]], colour_names[colours[j]], SCENES[scenes[j]], size, cx, cy, int(seeds[j]))
        )
    return specs


# ------------------------------------------------------------------------------------------------- export


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _write_png_atomically(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    atomic_write_with(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def export_task(task: SyntheticTask, root: Path | str, *, mask_value: int = 255) -> Path:
    """Write a task to disk in the CoOp folder layout and return its data set folder.

    Layout, under ``root / task.name``::

        images/<class_dir>/<split>_<index>.png      RGB image
        mask/<class_dir>/<split>_<index>.png        8-bit mask: mask_value on the object, 0 elsewhere
        split_zhou_<CamelName>.json                 {"train"|"val"|"test": [[rel_path, label, classname]]}

    ``class_dir`` is the class name with spaces as underscores and ``rel_path`` is relative to
    ``images/``, as in CoOp's split files; the mask path mirrors the image path under ``mask/``. Every file
    is written atomically.
    """
    if not 1 <= mask_value <= 255:
        raise ValueError(f"export_task: mask_value must be in [1, 255], got {mask_value}")
    dataset_dir = Path(root) / task.name
    images_dir, masks_dir = dataset_dir / "images", dataset_dir / "mask"
    entries: dict[str, list[list[object]]] = {}
    for split in _SPLITS:
        rows: list[list[object]] = []
        for index, sample in enumerate(task.split(split)):
            classname = task.classnames[sample.label]
            rel_path = f"{classname.replace(' ', '_')}/{split}_{index:05d}.png"
            image, mask = task.render_sample(sample)
            _write_png_atomically(image, images_dir / rel_path)
            _write_png_atomically(mask.astype(np.uint8) * np.uint8(mask_value), masks_dir / rel_path)
            rows.append([rel_path, sample.label, classname])
        entries[split] = rows
    atomic_write_json(dataset_dir / f"split_zhou_{_camel(task.name)}.json", entries)
    return dataset_dir
