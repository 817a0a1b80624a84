"""Image transforms: parity with Hugging Face's CLIP image processor, seeded crops, paired image/mask alignment."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from promptclip.clip.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    PairedEvalTransform,
    PairedTrainTransform,
    TrainTransform,
    normalize,
    pil_to_tensor,
    random_resized_crop_tensor,
    sample_crop_box,
    to_rgb,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MASK_VALUE = 5  # a raw label value, to check that masks are not rescaled or decoded


def _random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _unnormalize(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return pixels * std + mean


def _hf_pil_processor(size: int, center_crop: bool):
    """Hugging Face's CLIP image processor on its PIL/NumPy path.

    transformers 5.x makes ``CLIPImageProcessor`` the torchvision-backed processor, which cannot run here, and
    ships the PIL one as ``CLIPImageProcessorPil``; in 4.x ``CLIPImageProcessor`` is itself the PIL/NumPy one.
    """
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor_class(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=center_crop,
    )


def _hf_pixels(image: Image.Image, size: int, center_crop: bool) -> torch.Tensor:
    output = _hf_pil_processor(size, center_crop)(images=image, return_tensors="np")
    return torch.from_numpy(np.asarray(output["pixel_values"][0], dtype=np.float32))


def _diff_report(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, str]:
    diff = (ours - reference).abs()
    mean, worst = diff.mean().item(), diff.max().item()
    return mean, f"mean abs diff {mean:.2e}, max abs diff {worst:.2e}"


# (output size, (width, height), image mode). Includes portrait and landscape, images smaller than the output
# (upscaled), an extreme aspect ratio, grey-scale input, and sizes whose centre-crop excess is 3 mod 4, where
# torchvision's rounded offset (which we follow) is one pixel beyond Hugging Face's floored one.
EVAL_CASES = [
    (224, (640, 480), "RGB"),
    (224, (480, 640), "RGB"),
    (224, (301, 200), "RGB"),
    (224, (224, 224), "RGB"),
    (224, (227, 224), "RGB"),
    (224, (50, 37), "L"),
    (32, (100, 33), "RGB"),
    (32, (35, 32), "RGB"),
    (32, (17, 23), "RGB"),
    (32, (31, 1000), "RGB"),
]


@pytest.mark.parametrize(("size", "image_size", "mode"), EVAL_CASES)
def test_eval_transform_matches_hugging_face(size, image_size, mode):
    image = _random_image(*image_size, seed=sum(image_size), mode=mode)
    ours = EvalTransform(size)(image)
    assert ours.shape == (3, size, size)
    assert ours.dtype == torch.float32

    # Resize parity, for every case: Hugging Face's resized (uncropped) image, cropped at torchvision's offset.
    resized = _hf_pixels(image, size, center_crop=False)
    excess_h, excess_w = resized.shape[1] - size, resized.shape[2] - size
    top, left = round(excess_h / 2), round(excess_w / 2)
    mean, report = _diff_report(ours, resized[:, top : top + size, left : left + size])
    assert mean < 1e-3, f"resize differs from Hugging Face for {image_size} -> {size}: {report}"

    # Full pipeline parity where the two centre-crop conventions pick the same offset.
    if (top, left) == (excess_h // 2, excess_w // 2):
        mean, report = _diff_report(ours, _hf_pixels(image, size, center_crop=True))
        assert mean < 1e-3, f"EvalTransform differs from Hugging Face for {image_size} -> {size}: {report}"


def test_centre_crop_rounds_like_torchvision():
    # 227 wide, 224 high: no resize, an excess of 3 columns; round(1.5) == 2 (Hugging Face would take 1).
    image = _random_image(227, 224, seed=3)
    expected = normalize(pil_to_tensor(image.crop((2, 0, 226, 224))))
    assert torch.equal(EvalTransform(224)(image), expected)


def test_pil_to_tensor_and_normalize_values():
    image = Image.fromarray(np.array([[[0, 128, 255], [255, 0, 51]]], dtype=np.uint8))
    pixels = pil_to_tensor(image)
    assert pixels.dtype == torch.float32
    assert pixels.shape == (3, 1, 2)
    assert pixels[:, 0, 0].tolist() == pytest.approx([0.0, 128 / 255, 1.0])
    assert pixels[:, 0, 1].tolist() == pytest.approx([1.0, 0.0, 0.2])
    normalised = normalize(torch.full((2, 3, 1, 1), 0.5))
    expected = [(0.5 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    assert normalised[1, :, 0, 0].tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="3, H, W"):
        normalize(torch.zeros(4, 8, 8))


def test_to_rgb_converts_other_modes():
    grey = Image.new("L", (4, 3), 77)
    converted = to_rgb(grey)
    assert converted.mode == "RGB"
    assert converted.getpixel((0, 0)) == (77, 77, 77)
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb


def test_train_transform_is_reproducible_from_the_generator():
    image = _random_image(120, 90, seed=0)
    transform = TrainTransform(32)
    first = transform(image, torch.Generator().manual_seed(7))
    second = transform(image, torch.Generator().manual_seed(7))
    assert first.shape == (3, 32, 32)
    assert torch.equal(first, second)
    others = [transform(image, torch.Generator().manual_seed(seed)) for seed in range(8, 12)]
    assert all(not torch.equal(first, other) for other in others)


def test_default_generator_is_used_when_none_is_given():
    image = _random_image(120, 90, seed=1)
    transform = TrainTransform(32)
    torch.manual_seed(11)
    from_default = transform(image)
    assert torch.equal(from_default, transform(image, torch.Generator().manual_seed(11)))


def test_flips_happen_about_half_the_time():
    image = _random_image(80, 60, seed=2)
    never, always, half = TrainTransform(24, flip_p=0.0), TrainTransform(24, flip_p=1.0), TrainTransform(24)
    flips = 0
    for seed in range(40):
        plain = never(image, torch.Generator().manual_seed(seed))
        flipped = always(image, torch.Generator().manual_seed(seed))
        assert torch.equal(flipped, plain.flip(-1))
        result = half(image, torch.Generator().manual_seed(seed))
        is_flipped = torch.equal(result, flipped)
        assert is_flipped or torch.equal(result, plain)
        flips += is_flipped
    assert 10 <= flips <= 30, f"{flips} flips in 40 draws with flip_p=0.5"


def _disc_scene(width: int = 400, height: int = 300, radius: int = 80) -> tuple[Image.Image, Image.Image]:
    """A pure red disc on a dull noisy background, and a mask that is exactly the disc."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 110, size=(height, width, 3), dtype=np.uint8)
    rows, cols = np.mgrid[:height, :width]
    disc = (rows - height * 0.45) ** 2 + (cols - width * 0.6) ** 2 <= radius**2
    pixels[disc] = (255, 0, 0)
    mask = Image.fromarray(np.where(disc, MASK_VALUE, 0).astype(np.uint8), mode="L")
    return Image.fromarray(pixels), mask


def _redness(pixels: torch.Tensor) -> torch.Tensor:
    red, green, blue = _unnormalize(pixels)
    return (red > 0.7) & (green < 0.25) & (blue < 0.25)


def _boundary_band(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Pixels within ``radius`` of the mask's edge (dilation minus erosion)."""
    inside = mask.float()[None, None]
    kernel = 2 * radius + 1
    dilated = F.max_pool2d(inside, kernel, stride=1, padding=radius)
    eroded = -F.max_pool2d(-inside, kernel, stride=1, padding=radius)
    return (dilated != eroded)[0, 0]


def _assert_mask_follows_red(pixels: torch.Tensor, mask: torch.Tensor, context: str) -> None:
    """The mask must mark exactly the red pixels, except on pixels touching the disc's edge, which bicubic
    resizing blends with the background while the nearest-neighbour mask stays sharp."""
    assert mask.dtype == torch.uint8
    assert set(mask.unique().tolist()) <= {0, MASK_VALUE}
    in_mask = mask == MASK_VALUE
    disagree = in_mask != _redness(pixels)
    outside_band = disagree & ~_boundary_band(in_mask)
    assert not outside_band.any(), f"{context}: {int(outside_band.sum())} misaligned pixels away from the edge"


def test_paired_train_transform_keeps_mask_aligned():
    image, mask = _disc_scene()
    transform = PairedTrainTransform(32)
    mixed_views = 0
    for seed in range(30):
        pixels, out_mask = transform(image, mask, torch.Generator().manual_seed(seed))
        assert pixels.shape == (3, 32, 32)
        assert out_mask.shape == (32, 32)
        _assert_mask_follows_red(pixels, out_mask, f"seed {seed}")
        mixed_views += bool(0 < int((out_mask == MASK_VALUE).sum()) < 32 * 32)
        # The image alone gets the same crop and flip from the same seed.
        assert torch.equal(pixels, TrainTransform(32)(image, torch.Generator().manual_seed(seed)))
    assert mixed_views >= 10, "too few crops showing both the disc and the background to test alignment"


def test_paired_eval_transform_keeps_mask_aligned():
    image, mask = _disc_scene()
    pixels, out_mask = PairedEvalTransform(48)(image, mask)
    assert torch.equal(pixels, EvalTransform(48)(image))
    assert 0 < int((out_mask == MASK_VALUE).sum()) < 48 * 48
    _assert_mask_follows_red(pixels, out_mask, "eval")


def test_palette_mask_keeps_raw_values():
    image, mask = _disc_scene(64, 48, radius=15)
    palette_mask = mask.convert("P")
    palette_mask.putpalette([0, 0, 0] * 256)
    _, out_mask = PairedEvalTransform(16)(image, palette_mask)
    assert set(out_mask.unique().tolist()) == {0, MASK_VALUE}


def test_mask_size_mismatch_raises():
    image = _random_image(100, 80, seed=5)
    mask = Image.new("L", (99, 80))
    for transform in (PairedTrainTransform(16), PairedEvalTransform(16)):
        with pytest.raises(ValueError, match=r"99x80.*100x80"):
            transform(image, mask)


def test_multichannel_mask_is_rejected():
    image = _random_image(20, 20, seed=6)
    with pytest.raises(ValueError, match="single-channel"):
        PairedEvalTransform(8)(image, Image.new("RGB", (20, 20)))


def test_crop_boxes_lie_inside_and_respect_scale_and_ratio():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    generator = torch.Generator().manual_seed(0)
    for width, height in [(256, 256), (300, 120), (90, 200), (37, 23)]:
        fractions = []
        for _ in range(200):
            top, left, h, w = sample_crop_box(width, height, scale, ratio, generator)
            assert top >= 0 and left >= 0 and h > 0 and w > 0
            assert top + h <= height and left + w <= width
            # Sizes are rounded to whole pixels: allow half a pixel on each side.
            area = width * height
            assert (w + 0.5) * (h + 0.5) >= scale[0] * area and (w - 0.5) * (h - 0.5) <= scale[1] * area
            assert (w + 0.5) / (h - 0.5) >= ratio[0] and (w - 0.5) / (h + 0.5) <= ratio[1]
            fractions.append(w * h / area)
        # Draws span the scale range, up to the largest crop whose ratio fits inside the image.
        largest = min(width, ratio[1] * height) * min(height, width / ratio[0]) / (width * height)
        assert min(fractions) < 0.2, (width, height, min(fractions))
        assert max(fractions) > 0.8 * min(largest, 1.0), (width, height, max(fractions), largest)


def test_crop_box_falls_back_to_a_centred_crop():
    generator = torch.Generator().manual_seed(0)
    # No crop of >= 90% of a 1000x10 strip can have a ratio <= 4/3: the fallback clamps the ratio.
    assert sample_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), generator) == (0, 493, 10, 13)
    assert sample_crop_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), generator) == (493, 0, 13, 10)
    # An impossible area with an in-range ratio falls back to the whole image.
    assert sample_crop_box(100, 90, (2.0, 3.0), (3 / 4, 4 / 3), generator) == (0, 0, 90, 100)


def test_extreme_aspect_image_through_train_transform():
    image, mask = _random_image(1000, 10, seed=7), Image.new("L", (1000, 10), 1)
    pixels, out_mask = PairedTrainTransform(16, scale=(0.9, 1.0))(image, mask, torch.Generator().manual_seed(0))
    assert pixels.shape == (3, 16, 16) and out_mask.eq(1).all()


@pytest.mark.parametrize("as_uint8", [False, True])
def test_tensor_crop_matches_pil_path(as_uint8):
    image, mask = _disc_scene()
    pixels = pil_to_tensor(image)
    if as_uint8:
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    mask_tensor = torch.from_numpy(np.asarray(mask).copy())
    for seed in range(6):
        out, out_mask = random_resized_crop_tensor(pixels, 32, torch.Generator().manual_seed(seed), mask=mask_tensor)
        pil_pixels, pil_mask = PairedTrainTransform(32)(image, mask, torch.Generator().manual_seed(seed))
        assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
        assert out.min() >= 0 and out.max() <= 1
        assert out_mask is not None and out_mask.dtype == torch.uint8
        assert torch.equal(out_mask, pil_mask), f"seed {seed}: nearest-neighbour mask differs from PIL's"
        mean, report = _diff_report(out, _unnormalize(pil_pixels))
        # PIL rounds to uint8 and uses fixed-point weights: the two bicubic paths agree to that precision.
        assert mean < 3e-3, f"seed {seed}: {report}"


def test_tensor_crop_checks_shapes():
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        random_resized_crop_tensor(torch.zeros(1, 8, 8), 4, torch.Generator())
    with pytest.raises(ValueError, match="pixel-aligned"):
        random_resized_crop_tensor(torch.zeros(3, 8, 8), 4, torch.Generator(), mask=torch.zeros(8, 7))
    out, out_mask = random_resized_crop_tensor(torch.zeros(3, 8, 8), 4, None)
    assert out.shape == (3, 4, 4) and out_mask is None


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="image_size"):
        EvalTransform(0)
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(8, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="flip_p"):
        TrainTransform(8, flip_p=1.5)
