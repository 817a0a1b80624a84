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
    ALL_SCENES,
    ALL_SHAPES,
    COLOURS,
    KINDS,
    PLAIN_SCENE,
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
from promptclip.data.synthetic_style import STYLES, apply_style, check_style
from promptclip.io import atomic_write_json, atomic_write_with

__all__ = [
    "ALL_SCENES",
    "ALL_SHAPES",
    "COLOURS",
    "KINDS",
    "KIND_TASKS",
    "OBJECT_CLASSES",
    "PLAIN_SCENE",
    "SCENES",
    "SHAPES",
    "SIZE_RANGE",
    "STYLES",
    "TASK_NAMES",
    "SceneSpec",
    "SyntheticSample",
    "SyntheticTask",
    "build_task",
    "caption",
    "caption_scene_phrase",
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

#: The tuning world: kinds (pseudo-word names, see KINDS) rendered in a style that pretraining rarely shows.
#: Each has its own class order, so its base and new halves are another random split of the kinds.
KIND_TASKS: tuple[str, ...] = (
    "synthetic_kinds",
    "synthetic_kinds_pixel",
    "synthetic_kinds_noise",
    "synthetic_kinds_faded",
    "synthetic_kinds_spurious",
)

TASK_NAMES: tuple[str, ...] = ("synthetic_objects", "synthetic_shapes", "synthetic_scenes", *KIND_TASKS)

TEST_SCENES: tuple[str, ...] = ("uniform", "flipped")


@dataclass(frozen=True)
class _KindTaskDefaults:
    class_order_seed: int  # 0: the order of KINDS
    classes: int
    style: str = "none"
    style_strength: float = 0.0
    spurious: float = 0.0
    test_scenes: str = "uniform"


_KIND_TASK_DEFAULTS: dict[str, _KindTaskDefaults] = {
    "synthetic_kinds": _KindTaskDefaults(0, 30),
    "synthetic_kinds_pixel": _KindTaskDefaults(1, 30, "pixelate", 7.0),
    "synthetic_kinds_noise": _KindTaskDefaults(2, 30, "noise", 0.35),
    "synthetic_kinds_faded": _KindTaskDefaults(3, 30, "faded", 0.9),
    "synthetic_kinds_spurious": _KindTaskDefaults(4, 10, "pixelate", 7.0, spurious=1.0, test_scenes="flipped"),
}

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
    **{name: "a photo of a {}." for name in KIND_TASKS},
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
    PLAIN_SCENE: ("on plain grey", "against plain grey"),
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

# A kind's colour is part of what its name means (a flamingo is pink), so its captions never say the colour:
# the name alone has to carry it, as a class name in a prompt does.
_KIND_CAPTION_TEMPLATES: tuple[str, ...] = tuple(
    pattern.replace("{colour} ", "").replace(" in {colour},", ",") for pattern in _CAPTION_TEMPLATES
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


def caption_scene_phrase(scene: str, synonym: int) -> str:
    """How captions say where the object is: "on grass", "in front of a brick wall", ..."""
    phrases = _SCENE_PHRASES[scene]
    return phrases[synonym % len(phrases)]


def caption(spec: SceneSpec, variant: int = 0) -> str:
    """A caption naming the colour, the shape and the scene, and in most variants the size and position (a
    kind's caption names the kind, whose colour is its own, without the colour word).

    ``variant`` (any non-negative integer) chooses the sentence pattern and the synonyms, so a training
    loop can draw varied captions for the same image; the same variant always gives the same text.
    """
    if variant < 0:
        raise ValueError(f"caption variant must be a non-negative integer, got {variant}")
    patterns = _KIND_CAPTION_TEMPLATES if spec.shape in KINDS else _CAPTION_TEMPLATES
    pattern = patterns[variant % len(patterns)]
    synonym = (variant // len(_CAPTION_TEMPLATES)) % 2
    sizes = _SIZE_WORDS[size_word(spec.size)]
    scene_phrase = caption_scene_phrase(spec.scene, synonym)
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
    style: str = "none"
    style_strength: float = 0.0
    test_scenes: str = "uniform"

    def split(self, split: str) -> list[SyntheticSample]:
        """The samples of "train", "val" or "test"."""
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(_SPLITS)}")
        samples: list[SyntheticSample] = getattr(self, split)
        return samples

    def render_sample(self, sample: SyntheticSample) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of one sample at the task's image size, in the task's style."""
        image, mask = render(sample.spec, self.image_size)
        return apply_style(image, self.style, self.style_strength, sample.spec.seed), mask


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
    if name in _KIND_TASK_DEFAULTS:
        return _kind_classes(_KIND_TASK_DEFAULTS[name])
    return list(SCENES)


def _kind_classes(defaults: _KindTaskDefaults) -> list[str]:
    """The task's kinds in its own order: the first half is its base split, the second its new split."""
    names = list(KINDS)
    if defaults.class_order_seed:
        order = np.random.default_rng([defaults.class_order_seed, 5153]).permutation(len(names))
        names = [names[int(i)] for i in order]
    return names[: defaults.classes]


def _test_scene(label: int) -> str:
    """The scene of a test image under ``test_scenes="flipped"``: the one tied to the next class."""
    return SCENES[(label + 1) % len(SCENES)]


def _stream(*key: int) -> np.random.Generator:
    """A generator for one named stream of draws; separate streams keep every field prefix-stable."""
    return np.random.default_rng([int(k) for k in key])


def _class_samples(
    name: str, classnames: list[str], seed: int, split_index: int, label: int, count: int, rule: _SceneRule
) -> list[SyntheticSample]:
    """``count`` samples of one class in one split.

    Each quantity has its own stream keyed by (seed, task, split, label, field), so asking for more samples
    only appends: the first k samples are the same for any count >= k.
    """
    key = (seed, TASK_NAMES.index(name), split_index, label)
    shapes = _stream(*key, 0).integers(0, len(SHAPES), count)
    colours = _stream(*key, 1).integers(0, len(COLOURS), count)
    scenes = _stream(*key, 2).integers(0, len(SCENES), count)
    shortcut = _stream(*key, 3).random(count) < rule.spurious
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
        elif name in _KIND_TASK_DEFAULTS:
            shape = classnames[label]
            colour = KINDS[shape].colour
        else:
            scene = SCENES[label]
        if shortcut[j]:
            scene = spurious_scene(name, label)
        elif rule.flipped:
            scene = _test_scene(label)
        size = float(sizes[j])
        cx, cy = (size / 2 + (1.0 - size) * place[j]).tolist()
        spec = SceneSpec(shape, colour, scene, size, cx, cy, int(seeds[j]))
        samples.append(SyntheticSample(spec, label))
    return samples


@dataclass(frozen=True)
class _SceneRule:
    """How one split chooses scenes: tied to the class with probability ``spurious``, else uniform, or
    (``flipped``) always the scene tied to another class."""

    spurious: float = 0.0
    flipped: bool = False


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
    spurious: float | None = None,
    style: str | None = None,
    style_strength: float | None = None,
    test_scenes: str | None = None,
) -> SyntheticTask:
    """Build one of :data:`TASK_NAMES` as class-balanced train/val/test lists of specs (nothing rendered).

    ``spurious`` in [0, 1] ties background and class in the train split only: with that probability a
    training sample's scene is ``spurious_scene(name, label)``, otherwise a uniformly random scene (which may
    also be the tied one). Validation and test scenes are uniform, or with ``test_scenes="flipped"`` the scene
    tied to the next class, so that the shortcut points to a wrong class. ``style`` and ``style_strength``
    render every image of the task in one of :data:`STYLES`. ``None`` takes the task's own default (a kind
    task's style and shortcut; otherwise no style, no shortcut). ``synthetic_scenes`` accepts neither a
    shortcut nor flipped scenes, because its class *is* the scene. The result is a pure function of the
    arguments.
    """
    if name not in TASK_NAMES:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    defaults = _KIND_TASK_DEFAULTS.get(name, _KindTaskDefaults(0, 0))
    spurious = defaults.spurious if spurious is None else spurious
    style = defaults.style if style is None else style
    style_strength = defaults.style_strength if style_strength is None else style_strength
    test_scenes = defaults.test_scenes if test_scenes is None else test_scenes
    _check_task_options(name, seed, (train_per_class, val_per_class, test_per_class), image_size, spurious)
    check_style(style, style_strength)
    if test_scenes not in TEST_SCENES:
        raise ValueError(f"build_task: test_scenes must be one of {', '.join(TEST_SCENES)}, got {test_scenes!r}")
    if name == "synthetic_scenes" and test_scenes != "uniform":
        raise ValueError("build_task: synthetic_scenes needs test_scenes='uniform' (its label is the scene)")
    classnames = _classnames(name)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    rules = {
        "train": _SceneRule(spurious=spurious),
        "val": _SceneRule(),
        "test": _SceneRule(flipped=test_scenes == "flipped"),
    }
    splits: dict[str, list[SyntheticSample]] = {}
    for split_index, split in enumerate(_SPLITS):
        splits[split] = [
            sample
            for label in range(len(classnames))
            for sample in _class_samples(name, classnames, seed, split_index, label, counts[split], rules[split])
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
        style=style,
        style_strength=float(style_strength) if style != "none" else 0.0,
        test_scenes=test_scenes,
    )


def _check_task_options(
    name: str, seed: int, per_class: tuple[int, int, int], image_size: int, spurious: float
) -> None:
    _check_count("seed", seed, 0)
    for field_name, value, minimum in zip(
        ("train_per_class", "val_per_class", "test_per_class"), per_class, (1, 0, 1), strict=True
    ):
        _check_count(field_name, value, minimum)
    check_image_size(image_size)
    if not 0.0 <= spurious <= 1.0:
        raise ValueError(f"build_task: spurious must be in [0, 1] (a probability), got {spurious}")
    if name == "synthetic_scenes" and spurious > 0:
        raise ValueError(
            "build_task: spurious > 0 is not applicable to synthetic_scenes (its label is the background "
            "scene); use synthetic_objects or synthetic_shapes, or set spurious=0"
        )


def _block_permutation_indices(rng: np.random.Generator, count: int, period: int) -> np.ndarray:
    """Concatenated random permutations of range(period): every full block covers every value once."""
    blocks = -(-count // period)
    return np.concatenate([rng.permutation(period) for _ in range(blocks)])[:count]


def sample_pretraining_specs(count: int, seed: int, *, kinds: bool = True) -> list[SceneSpec]:
    """``count`` random specs for image-caption pretraining over every shape and kind, colour and scene.

    Shapes (with the kinds), colours and scenes (with the plain one) each run through shuffled blocks of all
    their values, so every aligned block of specs covers each of them; the three attributes are paired at
    random. The list is prefix-stable: the first k specs are the same for any count >= k. ``kinds=False``
    leaves out the kinds and the plain scene (the world of the first pretraining phase).
    """
    _check_count("count", count, 0)
    _check_count("seed", seed, 0)
    tag = 1_000_003  # keeps these streams apart from build_task's
    shape_pool, scene_pool = (ALL_SHAPES, ALL_SCENES) if kinds else (SHAPES, SCENES)
    shapes = _block_permutation_indices(_stream(tag, seed, 0), count, len(shape_pool))
    colours = _block_permutation_indices(_stream(tag, seed, 1), count, len(COLOURS))
    scenes = _block_permutation_indices(_stream(tag, seed, 2), count, len(scene_pool))
    sizes = _stream(tag, seed, 3).uniform(*SIZE_RANGE, count)
    place = _stream(tag, seed, 4).random((count, 2))
    seeds = _stream(tag, seed, 5).integers(0, 2**62, count)
    colour_names = tuple(COLOURS)
    specs = []
    for j in range(count):
        size = float(sizes[j])
        cx, cy = (size / 2 + (1.0 - size) * place[j]).tolist()
        shape = shape_pool[shapes[j]]
        colour = KINDS[shape].colour if shape in KINDS else colour_names[colours[j]]
        specs.append(SceneSpec(shape, colour, scene_pool[scenes[j]], size, cx, cy, int(seeds[j])))
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
