"""Grad-CAM heat maps and masks (DAPT-G), and the `masks` / `explain` commands, on tiny CLIPs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptclip.clip.model import CLIP
from promptclip.clip.weights import load_clip, save_clip
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.plugins.gradcam import (
    RELEASED_STYLE,
    gradcam,
    gradcam_grid,
    gradcam_layer,
    gradcam_masks,
    heat_to_mask,
    upsample_cam,
)

NAMES = ["cat", "dog", "car"]
PATCH = 8  # tiny-vit: 32 px, 8 px patches, a 4 x 4 grid


def zero_shot(clip: CLIP) -> PromptModel:
    return get_prompt_model(clip, {"method": "zeroshot"}, NAMES)


def object_image(row: int, col: int) -> torch.Tensor:
    """A flat background with one textured object that fills exactly patch (row, col)."""
    image = torch.full((1, 3, 32, 32), 0.3)
    texture = torch.randn(3, PATCH, PATCH, generator=torch.Generator().manual_seed(5))
    image[0, :, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = texture
    return image


def test_the_cam_moves_with_the_object(fresh_tiny_clip: CLIP) -> None:
    # Without positions the patch tokens are a set: moving a patch moves its CAM cell.
    fresh_tiny_clip.visual.positional_embedding.data.zero_()
    learner = zero_shot(fresh_tiny_clip)
    label = torch.tensor([1])
    cam, _ = gradcam_grid(learner, object_image(1, 1), label)
    moved, _ = gradcam_grid(learner, object_image(2, 2), label)
    assert cam[0, 1, 1] != cam[0, 0, 0], "the object's cell must differ from the background's"
    assert torch.allclose(moved, torch.roll(cam, shifts=(1, 1), dims=(1, 2)), atol=1e-6)
    # At pixel level the heat and the mask move by exactly one patch (8 px) as well.
    heat, moved_heat = gradcam(learner, object_image(1, 1), label), gradcam(learner, object_image(2, 2), label)
    assert torch.allclose(moved_heat[..., PATCH:, PATCH:], heat[..., :-PATCH, :-PATCH], atol=1e-5)
    threshold = float(heat[0, 0, 12, 12] + heat[0, 0, 28, 28]) / 2  # between the object's and the background's
    mask, moved_mask = heat_to_mask(heat, threshold), heat_to_mask(moved_heat, threshold)
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(moved_mask[..., PATCH:, PATCH:], mask[..., :-PATCH, :-PATCH])


def test_heat_is_normalised_per_image_and_masks_are_binary(tiny_clips) -> None:
    learner = zero_shot(tiny_clips.seeded())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[1] *= 5  # a much stronger map must not flatten the others (the official code divides by the batch max)
    heat = gradcam(learner, images, torch.tensor([0, 1, 2]))
    assert heat.shape == (3, 1, 32, 32)
    assert torch.allclose(heat.amax(dim=(1, 2, 3)), torch.ones(3), atol=1e-4)
    assert heat.min() >= 0
    masks = gradcam_masks(learner, images, torch.tensor([0, 1, 2]), threshold=0.5)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks, (heat >= 0.5).float())


def test_the_released_style_divides_by_the_batch_maximum_and_pins_the_grid_to_the_corners() -> None:
    cam = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1  # cells in [0.1, 1.1)
    cam[1, 0, 0] = 10.0  # the batch's peak, on a corner cell: every map is divided by it
    heat = upsample_cam(cam, (32, 32), RELEASED_STYLE) * (10.0 + 1e-6)
    torch.testing.assert_close(heat[:, 0, 0, 0], cam[:, 0, 0], rtol=1e-6, atol=0)
    torch.testing.assert_close(heat[:, 0, -1, -1], cam[:, -1, -1], rtol=1e-6, atol=0)
    # align_corners=True: pixel j of 32 reads the 4-cell grid at j * 3 / 31.
    torch.testing.assert_close(heat[:, 0, 0, 1], cam[:, 0, 0] * 28 / 31 + cam[:, 0, 1] * 3 / 31, rtol=1e-5, atol=0)
    # The default: each map over its own peak, grid values at the patch centres (pixel 1 is the first cell's).
    default = upsample_cam(cam, (32, 32))
    torch.testing.assert_close(default.amax(dim=(1, 2, 3)), torch.ones(3), rtol=0, atol=1e-5)
    assert torch.equal(default[:, 0, 0, 1], default[:, 0, 0, 0])


def test_the_score_is_the_given_class_and_defaults_to_the_prediction(tiny_clips) -> None:
    learner = zero_shot(tiny_clips.seeded())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = learner({"image": images}).logits.argmax(dim=-1)
    _, scored = gradcam_grid(learner, images)
    assert torch.equal(scored, predicted)
    by_class = [gradcam_grid(learner, images, torch.full((2,), c))[0] for c in range(len(NAMES))]
    assert not torch.allclose(by_class[0], by_class[1]), "the heat map must depend on the class scored"


def test_gradcam_leaves_no_gradients_hooks_or_mode_changes(tiny_clips) -> None:
    clip = tiny_clips.seeded()
    learner = get_prompt_model(clip, {"method": "maple", "depth": 2}, NAMES)
    learner.train()
    layer = gradcam_layer(clip)
    gradcam(learner, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert learner.training
    assert all(p.grad is None for p in learner.parameters())
    assert not layer._forward_hooks


def test_visual_prompt_tokens_are_left_out_of_the_map(tiny_clips) -> None:
    # MaPLe appends prompt tokens after the patches: the grid must still be the 4 x 4 patches.
    learner = get_prompt_model(tiny_clips.seeded(), {"method": "maple", "depth": 2}, NAMES)
    cam, _ = gradcam_grid(learner, torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    assert cam.shape == (2, 4, 4)


def test_a_resnet_image_tower_is_refused(tiny_clips) -> None:
    clip = tiny_clips.seeded("tiny-rn")
    with pytest.raises(ValueError, match="ViT"):
        gradcam(zero_shot(clip), torch.randn(1, 3, clip.image_size, clip.image_size))


# -- commands ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_file(tiny_clips, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_clip(tiny_clips.seeded(), path)
    return path


SHAPES = ["--dataset", "synthetic_shapes", "--set", "train_per_class=2", "--set", "val_per_class=1"]
SHAPES += ["--set", "test_per_class=1", "--set", "image_size=48"]


def test_masks_gradcam_writes_the_mask_store_layout(clip_file: Path, tmp_path: Path) -> None:
    from promptclip.cli import main
    from promptclip.data.datasets import build_dataset

    out = tmp_path / "masks"
    argv = ["masks", "gradcam", *SHAPES, "--out", str(out), "--arch", str(clip_file), "--device", "cpu"]
    assert main([*argv, "--no-progress"]) == 0
    splits = build_dataset(
        "synthetic_shapes", None, train_per_class=2, val_per_class=1, test_per_class=1, image_size=48
    )
    files = sorted(out.rglob("*.png"))
    assert len(files) == len(splits.train) == 20
    first = splits.train[0]
    mask = np.asarray(Image.open(out / f"{first.path}.png"))
    assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 255}
    # The same mask as the library computes on the squashed image, at the image's own size.
    from promptclip.commands.masks import squashed_pixels
    from promptclip.plugins.gradcam import upsample_cam

    learner = zero_shot(load_clip(clip_file))
    learner.set_classnames(splits.classnames)
    learner.template = splits.template
    cam, _ = gradcam_grid(learner, squashed_pixels(splits.load_image(first), 32)[None], torch.tensor([first.label]))
    expected = heat_to_mask(upsample_cam(cam, (48, 48)))[0, 0].numpy() * 255
    assert np.array_equal(mask, expected.astype(np.uint8))
    manifest = json.loads((out / "gradcam_masks.json").read_text())
    assert manifest["images"] == 20 and manifest["threshold"] == 0.5
    # A second call keeps what exists.
    before = files[0].stat().st_mtime_ns
    assert main([*argv, "--no-progress"]) == 0
    assert files[0].stat().st_mtime_ns == before


def test_masks_show_renders_image_and_overlay_pairs(tmp_path: Path) -> None:
    from promptclip.cli import main
    from promptclip.reports.tiles import CAPTION, GAP, TILE

    out = tmp_path / "sheet.png"
    assert main(["masks", "show", *SHAPES, "--count", "3", "--out", str(out)]) == 0
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (TILE + CAPTION, 6 * TILE + 5 * GAP, 3)
    image_tile = sheet[CAPTION:, :TILE].astype(np.float32)
    overlay_tile = sheet[CAPTION:, TILE + GAP : 2 * TILE + GAP].astype(np.float32)
    corner = (slice(0, 4), slice(0, 4))  # the objects never reach the corner: background, dimmed
    assert np.allclose(overlay_tile[corner], 0.35 * image_tile[corner], atol=1.5)


def test_explain_renders_tuned_and_zero_shot_panels(clip_file: Path, tmp_path: Path) -> None:
    from promptclip.cli import main

    learner = get_prompt_model(load_clip(clip_file), {"method": "coop", "n_ctx": 2}, NAMES)
    learner.save_pretrained(tmp_path / "prompt")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "explain.png"
    argv = ["explain", str(tmp_path / "x.png"), "--prompt", str(tmp_path / "prompt"), "--arch", str(clip_file)]
    assert main([*argv, "--class", "dog", "--size", "64", "--out", str(out), "--device", "cpu"]) == 0
    panels = np.asarray(Image.open(out))
    assert panels.shape == (64 + 14, 3 * 64 + 2 * 4, 3)
    assert main([*argv, "--class", "whale", "--out", str(out), "--device", "cpu"]) == 2
