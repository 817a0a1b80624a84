"""The procedural synthetic world: determinism, exact masks, task balance, spurious shortcut, export."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptclip.data.synthetic import (
    ALL_SCENES,
    ALL_SHAPES,
    COLOURS,
    KIND_TASKS,
    KINDS,
    OBJECT_CLASSES,
    SCENES,
    SHAPES,
    SIZE_RANGE,
    TASK_NAMES,
    SceneSpec,
    build_task,
    caption,
    export_task,
    render,
    render_background,
    sample_pretraining_specs,
    spurious_scene,
)


def _every_shape_colour_scene() -> list[SceneSpec]:
    colours = list(COLOURS)
    specs = []
    for s, scene in enumerate(SCENES):
        for h, shape in enumerate(SHAPES):
            colour = colours[(s + h) % len(colours)]
            size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * ((s * 3 + h) % 7) / 6
            specs.append(SceneSpec(shape, colour, scene, size, 0.5, 0.5, seed=100 * s + h))
    return specs


def test_world_is_large_enough() -> None:
    assert len(SHAPES) >= 8 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLOURS) >= 8 and len(set(COLOURS.values())) == len(COLOURS)
    assert len(SCENES) >= 8 and len(set(SCENES)) == len(SCENES)


def test_render_is_deterministic_and_independent_of_call_order() -> None:
    specs = _every_shape_colour_scene()[:25]
    forward = [render(spec) for spec in specs]
    backward = [render(spec) for spec in reversed(specs)][::-1]
    for (img_a, mask_a), (img_b, mask_b) in zip(forward, backward, strict=True):
        assert img_a.dtype == np.uint8 and img_a.shape == (64, 64, 3)
        assert mask_a.dtype == bool and mask_a.shape == (64, 64)
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(mask_a, mask_b)
    # Global numpy state must not leak into the pixels.
    np.random.seed(123)
    again, _ = render(specs[3])
    np.testing.assert_array_equal(again, forward[3][0])


def test_seed_changes_only_texture_and_small_nuisances() -> None:
    a = SceneSpec("star", "red", "grass", 0.5, 0.5, 0.5, seed=1)
    b = SceneSpec("star", "red", "grass", 0.5, 0.5, 0.5, seed=2)
    img_a, mask_a = render(a)
    img_b, mask_b = render(b)
    assert not np.array_equal(img_a, img_b)
    # Only a small tilt separates the two stars: most object pixels are shared.
    overlap = (mask_a & mask_b).sum() / max(mask_a.sum(), mask_b.sum())
    assert overlap > 0.6


@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_mask_is_exactly_the_pixels_that_differ_from_the_background(image_size: int) -> None:
    for spec in _every_shape_colour_scene():
        image, mask = render(spec, image_size)
        background = render_background(spec.scene, spec.seed, image_size)
        differs = (image != background).any(axis=-1)
        np.testing.assert_array_equal(mask, differs, err_msg=f"{spec}")
        # The object is present and inside its bounding circle.
        assert mask.sum() > 0.1 * (spec.size * image_size) ** 2, spec
        ys, xs = np.nonzero(mask)
        centres = (np.stack([xs, ys], axis=1) + 0.5) / image_size
        distance = np.hypot(centres[:, 0] - spec.cx, centres[:, 1] - spec.cy)
        assert distance.max() <= spec.size / 2 + 1e-6, spec


def test_object_near_the_border_is_clipped_not_wrapped() -> None:
    spec = SceneSpec("square", "blue", "sand", 0.6, 0.05, 0.95, seed=4)
    image, mask = render(spec, 64)
    background = render_background("sand", 4, 64)
    np.testing.assert_array_equal(mask, (image != background).any(axis=-1))
    assert mask[:, :10].any() and mask[-10:, :].any()
    assert not mask[:20, :].any() and not mask[:, 40:].any()


def test_shapes_have_distinct_masks() -> None:
    masks = {shape: render(SceneSpec(shape, "red", "snow", 0.6, 0.5, 0.5, seed=0), 64)[1] for shape in SHAPES}
    for i, first in enumerate(SHAPES):
        for second in SHAPES[i + 1 :]:
            a, b = masks[first], masks[second]
            iou = (a & b).sum() / (a | b).sum()
            assert iou < 0.9, (first, second, iou)


def test_scenes_have_distinct_mean_colours_or_textures() -> None:
    stats = {}
    for scene in SCENES:
        imgs = np.stack([render_background(scene, seed, 64).astype(np.float64) for seed in range(4)])
        stats[scene] = np.concatenate([imgs.mean(axis=(0, 1, 2)), imgs.std(axis=(1, 2)).mean(axis=0)])
    names = list(stats)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert np.abs(stats[first] - stats[second]).max() > 8.0, (first, second)


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"SceneSpec.shape 'blob'"):
        SceneSpec("blob", "red", "grass", 0.4, 0.5, 0.5, 0)
    with pytest.raises(ValueError, match=r"SceneSpec.colour"):
        SceneSpec("star", "mauve", "grass", 0.4, 0.5, 0.5, 0)
    with pytest.raises(ValueError, match=r"SceneSpec.scene"):
        SceneSpec("star", "red", "moon", 0.4, 0.5, 0.5, 0)
    with pytest.raises(ValueError, match=r"SceneSpec.size"):
        SceneSpec("star", "red", "grass", 1.4, 0.5, 0.5, 0)
    with pytest.raises(ValueError, match=r"SceneSpec.cx"):
        SceneSpec("star", "red", "grass", 0.4, -0.1, 0.5, 0)
    with pytest.raises(ValueError, match=r"SceneSpec.seed"):
        SceneSpec("star", "red", "grass", 0.4, 0.5, 0.5, -3)


def test_captions_name_colour_shape_and_scene_with_variety() -> None:
    spec = SceneSpec("star", "orange", "brick wall", 0.32, 0.2, 0.2, seed=0)
    texts = [caption(spec, variant) for variant in range(16)]
    assert len(set(texts)) == 16
    for text in texts:
        assert "orange" in text and "star" in text and "brick wall" in text, text
        assert " a orange" not in text.lower() and not text.lower().startswith("a orange")
    assert texts[0] == "a small orange star on a brick wall."
    assert texts[1] == "a photo of a small orange star in the top left, on a brick wall."
    big = SceneSpec("ring", "white", "night sky", 0.68, 0.66, 0.66, seed=0)
    assert caption(big, 1) == "a photo of a big white ring in the bottom right, in the night sky."
    assert "large" in caption(big, 8)
    with pytest.raises(ValueError, match="variant"):
        caption(spec, -1)


def test_tasks_have_readable_balanced_classes() -> None:
    sizes = {"synthetic_objects": 20, "synthetic_shapes": 8, "synthetic_scenes": 8}
    sizes |= dict.fromkeys(KIND_TASKS, len(KINDS)) | {"synthetic_kinds_spurious": 10}
    assert set(sizes) == set(TASK_NAMES)
    for name in TASK_NAMES:
        task = build_task(name, train_per_class=3, val_per_class=2, test_per_class=4)
        assert len(task.classnames) >= sizes[name]
        assert len(set(task.classnames)) == len(task.classnames)
        assert "{}" in task.template
        for split, per_class in (("train", 3), ("val", 2), ("test", 4)):
            counts = Counter(sample.label for sample in task.split(split))
            assert counts == dict.fromkeys(range(len(task.classnames)), per_class), (name, split)
        for sample in task.train + task.test:
            classname = task.classnames[sample.label]
            spec = sample.spec
            if name == "synthetic_objects":
                assert classname == f"{spec.colour} {spec.shape}"
            elif name == "synthetic_shapes":
                assert classname == spec.shape
            elif name in KIND_TASKS:
                assert classname == spec.shape and spec.colour == KINDS[classname].colour
            else:
                assert classname == spec.scene
            assert SIZE_RANGE[0] <= spec.size <= SIZE_RANGE[1]
            assert spec.size / 2 - 1e-9 <= spec.cx <= 1 - spec.size / 2 + 1e-9


def test_object_classes_share_attributes_across_halves() -> None:
    assert len(set(OBJECT_CLASSES)) == len(OBJECT_CLASSES) >= 20
    half = len(OBJECT_CLASSES) // 2
    base, new = OBJECT_CLASSES[:half], OBJECT_CLASSES[half:]
    assert {c for c, _ in new} <= {c for c, _ in base}
    assert {s for _, s in new} <= {s for _, s in base}


def test_build_task_is_deterministic_and_prefix_stable() -> None:
    first = build_task("synthetic_objects", seed=5, train_per_class=4, val_per_class=1, test_per_class=2)
    second = build_task("synthetic_objects", seed=5, train_per_class=4, val_per_class=1, test_per_class=2)
    assert first == second
    larger = build_task("synthetic_objects", seed=5, train_per_class=6, val_per_class=1, test_per_class=2)
    for label in range(len(first.classnames)):
        small = [s for s in first.train if s.label == label]
        big = [s for s in larger.train if s.label == label]
        assert big[:4] == small
    other = build_task("synthetic_objects", seed=6, train_per_class=4, val_per_class=1, test_per_class=2)
    assert [s.spec for s in other.train] != [s.spec for s in first.train]


def _tied_fraction(samples: list, scene_of_class: list[str]) -> float:
    tied = sum(sample.spec.scene == scene_of_class[sample.label] for sample in samples)
    return tied / len(samples)


def test_spurious_correlation_holds_in_train_only() -> None:
    sizes = {"train_per_class": 200, "val_per_class": 50, "test_per_class": 200}
    task = build_task("synthetic_shapes", seed=1, spurious=0.9, **sizes)
    assert task.scene_of_class == [spurious_scene("synthetic_shapes", label) for label in range(len(SHAPES))]
    # P(tied scene) = spurious + (1 - spurious) / number of scenes.
    expected_train = 0.9 + 0.1 / len(SCENES)
    assert abs(_tied_fraction(task.train, task.scene_of_class) - expected_train) < 0.03
    assert abs(_tied_fraction(task.test, task.scene_of_class) - 1 / len(SCENES)) < 0.03
    assert abs(_tied_fraction(task.val, task.scene_of_class) - 1 / len(SCENES)) < 0.06
    plain = build_task("synthetic_shapes", seed=1, **sizes)
    assert abs(_tied_fraction(plain.train, plain.scene_of_class) - 1 / len(SCENES)) < 0.03
    # Validation and test splits do not depend on the shortcut strength.
    assert plain.test == task.test and plain.val == task.val


def test_spurious_is_rejected_for_scene_classification_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="synthetic_scenes"):
        build_task("synthetic_scenes", spurious=0.5)
    with pytest.raises(ValueError, match="spurious must be in"):
        build_task("synthetic_shapes", spurious=1.5)
    with pytest.raises(ValueError, match="unknown synthetic task 'mnist'"):
        build_task("mnist")
    with pytest.raises(ValueError, match="train_per_class"):
        build_task("synthetic_shapes", train_per_class=0)


def test_pretraining_specs_cover_the_world_and_are_prefix_stable() -> None:
    specs = sample_pretraining_specs(80, seed=3)
    assert specs == sample_pretraining_specs(80, seed=3)
    assert specs[:25] == sample_pretraining_specs(25, seed=3)
    assert specs != sample_pretraining_specs(80, seed=4)
    # Shapes and kinds run in blocks of len(ALL_SHAPES), scenes (with the plain one) in blocks of len(ALL_SCENES).
    for start in (0, len(ALL_SHAPES)):
        assert {s.shape for s in specs[start : start + len(ALL_SHAPES)]} == set(ALL_SHAPES)
    assert {s.scene for s in specs[: len(ALL_SCENES)]} == set(ALL_SCENES)
    # A kind wears its own colour; every other spec's colour runs through blocks of all colours.
    assert all(s.colour == KINDS[s.shape].colour for s in specs if s.shape in KINDS)
    assert {s.colour for s in specs} == set(COLOURS)
    assert len({(s.shape, s.colour, s.scene) for s in specs}) > 60


def test_pretraining_specs_of_the_shapes_world_are_those_of_the_first_phase() -> None:
    specs = sample_pretraining_specs(40, seed=3, kinds=False)
    assert specs[:25] == sample_pretraining_specs(25, seed=3, kinds=False)
    first_ten = specs[:10]
    assert {s.shape for s in first_ten} == set(SHAPES)
    assert {s.colour for s in first_ten} == set(COLOURS)
    assert {s.scene for s in first_ten} == set(SCENES)
    assert len({(s.shape, s.colour, s.scene) for s in specs}) > 30
    # The stream the shipped model's first phase was trained on, recorded before kinds existed: the exact
    # floats of every spec (seeded draws, no platform-dependent arithmetic) hash to this digest.
    assert specs[0] == SceneSpec(
        "crescent", "green", "tiled floor", 0.5142788564821418, 0.42055963839656063, 0.48047206518003716,
        seed=963227971888632926,
    )  # fmt: skip
    digest = hashlib.sha256(repr(specs).encode()).hexdigest()
    assert digest == "5531a0c7a499bc098a19b323e3dd101b3589c9b622ef50235c35c802ed4d00d6"


def test_export_round_trip(tmp_path: Path) -> None:
    task = build_task("synthetic_objects", seed=2, train_per_class=1, val_per_class=1, test_per_class=1, image_size=32)
    dataset_dir = export_task(task, tmp_path)
    assert dataset_dir == tmp_path / "synthetic_objects"
    split = json.loads((dataset_dir / "split_zhou_SyntheticObjects.json").read_text())
    assert set(split) == {"train", "val", "test"}
    for name in ("train", "val", "test"):
        samples = task.split(name)
        assert len(split[name]) == len(samples)
        for (rel_path, label, classname), sample in zip(split[name], samples, strict=True):
            assert label == sample.label and classname == task.classnames[label]
            assert rel_path.startswith(classname.replace(" ", "_") + "/")
            image = np.asarray(Image.open(dataset_dir / "images" / rel_path).convert("RGB"))
            mask = np.asarray(Image.open(dataset_dir / "mask" / rel_path))
            expected_image, expected_mask = render(sample.spec, 32)
            np.testing.assert_array_equal(image, expected_image)
            np.testing.assert_array_equal(mask, expected_mask.astype(np.uint8) * 255)
    assert not list(dataset_dir.rglob("*.tmp"))


def test_rendering_throughput_smoke() -> None:
    specs = sample_pretraining_specs(300, seed=0)
    start = time.perf_counter()
    masks = [render(spec, 64)[1] for spec in specs]
    elapsed = time.perf_counter() - start
    print(f"synthetic world: {len(specs) / elapsed:.0f} images/s at 64 px")
    assert all(mask.any() for mask in masks)
