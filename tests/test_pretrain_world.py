"""Pretraining's world: the first phase's shapes-only batches, kinds, zoomed crops, styled views, and starting
from a weights file."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain import MICRO_ARCH, micro_config

from promptclip.clip.model import CLIP, ArchConfig
from promptclip.clip.weights import load_clip, save_clip
from promptclip.data import synthetic
from promptclip.pretraining import PretrainConfig, PretrainError, caption_batch, pretrain
from promptclip.pretraining.batches import RENDER_SIZE, _batch_specs, _spec_shard, _zoom_crop

_SIZE_WORDS = ("small", "little", "medium-sized", "mid-sized", "big", "large")
_POSITION_WORDS = ("top", "bottom", "left", "right", "centre")


def _digest(value: object) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- shapes world


def test_shapes_world_batches_hold_no_kinds_and_no_plain_scene() -> None:
    cfg = micro_config(world="shapes", batch_size=32, crop_fraction=0.5, style_fraction=0.5)
    for step in range(6):
        specs = _batch_specs(cfg, step)
        assert all(s.shape in synthetic.SHAPES and s.scene in synthetic.SCENES for s in specs), step
    words = {w for text in caption_batch(cfg, 0).captions for w in re.findall(r"[a-z]+", text.lower())}
    assert not words & (set(synthetic.KINDS) | {"plain", "grey"})


# Recorded from the batches of the pretraining code before kinds existed (micro_config, seed 0): the specs
# (seeded draws only, so exact on any platform), the captions and the match matrix.
_FIRST_PHASE = {
    0: (
        "f477cf6e1c32c4414c11d2124b6f13fed596445e222ce057a376c1adad6be55e",
        "455191cd3556db73110c84917c489d551d23a8de9851e97955a12ad04f4a13bd",
    ),
    5: (
        "2e8d2c059bb87b966e9008ee351bb1f7244c4422483087a73425329ed0b9da1c",
        "430564ca1713a61147727905457cbe0b8364ece1afb130bb770343abc27ddc39",
    ),
    17: (
        "4126a2ce4d67ad5f4d817ffc43f992279ccfd3289d2c1bd21455907123a17267",
        "862eb5207b793a5a38a6c95eaf5d1d4ea31a1623b677130f52bbbe7618f66f04",
    ),
}
_FIRST_PHASE_MATCHES = "ba04ef823c2817cd85b2dc167b1f8eb2dae807efd261f9093cad477122220ea2"


@pytest.mark.parametrize("step", sorted(_FIRST_PHASE))
def test_shapes_world_reproduces_the_first_phase_batches(step: int) -> None:
    specs_digest, captions_digest = _FIRST_PHASE[step]
    # The specs (and twins) do not depend on how the images are viewed.
    assert _digest(_batch_specs(micro_config(world="shapes"), step)) == specs_digest
    cfg = micro_config(world="shapes", crop_fraction=0.0, style_fraction=0.0)
    specs = _batch_specs(cfg, step)
    assert _digest(specs) == specs_digest
    batch = caption_batch(cfg, step)
    assert hashlib.sha256("\n".join(batch.captions).encode()).hexdigest() == captions_digest
    assert hashlib.sha256(batch.matches.numpy().tobytes()).hexdigest() == _FIRST_PHASE_MATCHES
    np.testing.assert_array_equal(batch.images, synthetic.render_batch(specs, RENDER_SIZE)[0])


# ---------------------------------------------------------------------------------------------- kinds world


def test_kinds_world_batches_show_kinds_in_their_colour_and_the_plain_scene() -> None:
    cfg = micro_config(batch_size=32)
    assert cfg.world == "kinds"
    specs = [spec for step in range(4) for spec in _batch_specs(cfg, step)]
    kinds = [s for s in specs if s.shape in synthetic.KINDS]
    assert len(kinds) >= len(specs) // 3  # 30 of the 40 shapes are kinds
    assert all(s.colour == synthetic.KINDS[s.shape].colour for s in kinds)
    assert any(s.shape in synthetic.SHAPES for s in specs)
    assert any(s.scene == synthetic.PLAIN_SCENE for s in specs)
    batch = caption_batch(cfg, 0)
    named = {w for text in batch.captions for w in re.findall(r"[a-z]+", text)} & set(synthetic.KINDS)
    assert named == {s.shape for s in _batch_specs(cfg, 0) if s.shape in synthetic.KINDS}


def _step_with_a_repeated_object(cfg: PretrainConfig) -> int:
    """The first step whose batch shows one shape, colour and scene twice, at different sizes or places."""
    for step in range(200):
        specs = _batch_specs(cfg, step)
        keys = [(s.shape, s.colour, s.scene) for s in specs]
        if any(keys[i] == keys[j] and specs[i] != specs[j] for i in range(len(specs)) for j in range(i)):
            return step
    raise AssertionError("no batch repeats an object; make the batches larger")


def test_crops_are_captioned_without_size_or_position_and_matched_on_shape_colour_and_scene() -> None:
    cfg = micro_config(batch_size=48, crop_fraction=1.0, style_fraction=0.0)
    step = _step_with_a_repeated_object(cfg)  # so the match matrix has a true pair off the diagonal
    batch, specs = caption_batch(cfg, step), _batch_specs(cfg, step)
    for spec, text in zip(specs, batch.captions, strict=True):
        words = set(re.findall(r"[a-z-]+", text.lower()))
        assert {*spec.shape.split(), *spec.scene.split()} <= words | {"grey"}, text
        # A kind's name carries its colour, as in the world's captions; a plain shape's colour is said.
        assert (spec.colour in words) == (spec.shape not in synthetic.KINDS), text
        scenes = {synthetic.caption_scene_phrase(spec.scene, synonym) for synonym in (0, 1)}
        assert any(phrase in text.lower() for phrase in scenes), text
        assert not words & {*_SIZE_WORDS, *_POSITION_WORDS}, text
    keys = [(s.shape, s.colour, s.scene) for s in specs]
    expected = torch.tensor([[a == b for b in keys] for a in keys])
    assert torch.equal(batch.matches, expected)
    assert int(expected.sum()) > len(specs)
    # Every image is a zoomed view, not the plain render (a crop as wide as the image is rare).
    plain = synthetic.render_batch(specs, RENDER_SIZE)[0]
    zoomed = sum(not np.array_equal(a, b) for a, b in zip(batch.images, plain, strict=True))
    assert zoomed >= len(specs) - 2


def test_zoomed_crops_keep_the_whole_object() -> None:
    n = RENDER_SIZE
    # Each pixel holds its own column and row: what a crop shows tells which window it cut.
    rows, cols = np.mgrid[0:n, 0:n]
    coordinates = np.stack([cols, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    rng = np.random.default_rng(0)
    sides = set()
    for spec in synthetic.sample_pretraining_specs(120, seed=1):
        crop = _zoom_crop(coordinates, spec, rng)
        assert crop.shape == coordinates.shape
        # Bilinear upscaling keeps the corner pixels of the window at the corners of the result.
        left, right, top, bottom = crop[0, 0, 0], crop[0, -1, 0], crop[0, 0, 1], crop[-1, 0, 1]
        assert right - left == bottom - top, spec  # square
        _, mask = synthetic.render(spec, n)
        ys, xs = np.nonzero(mask)
        assert left <= xs.min() and xs.max() <= right and top <= ys.min() and ys.max() <= bottom, spec
        sides.add(int(right - left))
    assert len(sides) > 10  # the zoom varies


def test_styled_views_change_the_images_not_the_captions() -> None:
    plain_cfg = micro_config(crop_fraction=0.0, style_fraction=0.0)
    styled_cfg = micro_config(crop_fraction=0.0, style_fraction=1.0)
    plain, styled = caption_batch(plain_cfg, 2), caption_batch(styled_cfg, 2)
    assert plain.captions == styled.captions and torch.equal(plain.matches, styled.matches)
    changed = sum(not np.array_equal(a, b) for a, b in zip(plain.images, styled.images, strict=True))
    assert changed == len(plain.images)


def test_a_batch_is_a_pure_function_of_seed_and_step() -> None:
    cfg = micro_config(crop_fraction=0.5, style_fraction=0.5, partial_caption_prob=0.3)
    first = caption_batch(cfg, 3)
    caption_batch(cfg, 9)
    _spec_shard.cache_clear()
    # Settings that do not shape the batches (how often to check and save) leave them alone.
    again = caption_batch(micro_config(crop_fraction=0.5, style_fraction=0.5, partial_caption_prob=0.3,
                                       eval_every=7, checkpoint_every=3), 3)  # fmt: skip
    assert first.captions == again.captions
    np.testing.assert_array_equal(first.images, again.images)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.matches, again.matches)
    other_step = caption_batch(cfg, 4)
    other_seed = caption_batch(micro_config(crop_fraction=0.5, style_fraction=0.5, partial_caption_prob=0.3,
                                            seed=1), 3)  # fmt: skip
    assert other_step.captions != first.captions and other_seed.captions != first.captions
    assert not np.array_equal(other_seed.images, first.images)


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"world": "planets"}, r"world must be one of kinds, shapes, got 'planets'"),
        ({"crop_fraction": -0.1}, r"crop_fraction must be in \[0, 1\], got -0.1"),
        ({"crop_fraction": 1.5}, r"crop_fraction must be in \[0, 1\], got 1.5"),
        ({"style_fraction": 1.01}, r"style_fraction must be in \[0, 1\], got 1.01"),
        ({"style_fraction": -1.0}, r"style_fraction must be in \[0, 1\]"),
    ],
)
def test_config_refuses_unknown_worlds_and_fractions_outside_0_1(changes: dict[str, object], message: str) -> None:
    with pytest.raises(PretrainError, match=message):
        micro_config(**changes).check()


def test_config_takes_the_edges_of_the_fractions_and_both_worlds() -> None:
    for world in ("kinds", "shapes"):
        for fraction in (0.0, 1.0):
            micro_config(world=world, crop_fraction=fraction, style_fraction=fraction).check()


def test_pretrain_command_passes_the_world_options() -> None:
    from promptclip.commands.pretrain import add_pretrain_options

    parser = argparse.ArgumentParser()
    add_pretrain_options(parser)
    world = ["--world", "shapes", "--init", "w.safetensors", "--crop-fraction", "0.1", "--style-fraction", "0"]
    args = parser.parse_args([*world, "--min-lr", "1e-6"])
    assert (args.world, args.init, args.crop_fraction, args.style_fraction, args.min_lr) == (
        "shapes",
        "w.safetensors",
        0.1,
        0.0,
        1e-6,
    )
    defaults = parser.parse_args([])
    assert (defaults.world, defaults.init) == ("kinds", None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--world", "planets"])


# ---------------------------------------------------------------------------------------------- init


def _saved_micro_clip(path: Path, seed: int, **changes: object) -> CLIP:
    arch = {**MICRO_ARCH, **changes}
    torch.manual_seed(seed)
    model = CLIP(ArchConfig.from_dict(arch))
    save_clip(model, path)
    return model


def test_init_starts_from_the_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "start.safetensors"
    start = _saved_micro_clip(path, seed=123)
    saved = load_clip(path).state_dict()
    for name, tensor in start.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    # One step at lr 1e-9: Adam moves a parameter by about lr (plus lr * weight_decay * |p|) per step, so the
    # trained weights stay within 1e-6 of where they started; a random start is far from this file.
    settings = {"steps": 1, "warmup_steps": 0, "lr": 1e-9, "min_lr": 0.0}
    result = pretrain(micro_config(init=str(path), **settings), None, progress=False, log=None)
    fresh = pretrain(micro_config(**settings), None, progress=False, log=None)
    for name, tensor in start.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    distance = max(
        (fresh.model.state_dict()[name] - tensor).abs().max().item()
        for name, tensor in start.state_dict().items()
        if tensor.is_floating_point() and tensor.numel() > 1
    )
    assert distance > 1e-2
    assert all(p.requires_grad for p in result.model.parameters())


def test_init_of_another_architecture_is_refused(tmp_path: Path) -> None:
    deeper = tmp_path / "deeper.safetensors"
    _saved_micro_clip(deeper, seed=0, text={**MICRO_ARCH["text"], "layers": 2})
    with pytest.raises(PretrainError, match=r"deeper\.safetensors.*another architecture"):
        pretrain(micro_config(init=str(deeper), steps=1, warmup_steps=0), None, progress=False, log=None)


def test_init_of_another_width_is_refused(tmp_path: Path) -> None:
    wider = tmp_path / "wider.safetensors"
    _saved_micro_clip(wider, seed=0, embed_dim=48)
    with pytest.raises(PretrainError, match=r"wider\.safetensors.*another architecture"):
        pretrain(micro_config(init=str(wider), steps=1, warmup_steps=0), None, progress=False, log=None)


def test_a_missing_init_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PretrainError, match=r"init '.*missing\.safetensors' cannot be loaded"):
        pretrain(micro_config(init=str(tmp_path / "missing.safetensors")), None, progress=False, log=None)
