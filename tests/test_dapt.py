"""DAPT (decouple before align) as a plug-in: its views (stop-gradient targets encoded without a graph), its
three terms, its schedule, its masks (DAPT-S from the data, DAPT-G from Grad-CAM), `compat: released` against
the released step written out, fp32 logits under autocast and the pass-through at test time, on a tiny random
CLIP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from promptclip.clip.model import CLIP
from promptclip.config import ConfigError, OptimConfig
from promptclip.engine.train import Trainer
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.plugins.base import wrap_with_plugins
from promptclip.plugins.dapt import (
    BACKGROUND_CLASSES,
    DAPT,
    TABLE_BACKGROUND_CLASSES,
    DAPTConfig,
    DAPTOutput,
    released_background_split,
)
from promptclip.plugins.gradcam import gradcam_grid, gradcam_masks
from promptclip.recipes import list_recipes

NAMES = ["cat", "dog", "car", "tree"]
OTHER_NAMES = ["whale", "plane", "house", "boat"]
BATCH = 3


@pytest.fixture(scope="module")
def backbone(tiny_clips) -> CLIP:
    """tiny-vit with the random weights of seed 1234."""
    return tiny_clips("tiny-vit", 1234)


@pytest.fixture
def make(backbone: CLIP) -> Callable[..., DAPT]:
    """make(method, names, seed, **dapt): a DAPT learner in training mode around `method` on the backbone."""

    def build(method: str = "maple", names: list[str] = NAMES, seed: int = 0, **dapt: Any) -> DAPT:
        configs = {"maple": {"depth": 2}, "coop": {"n_ctx": 2}, "cocoop": {}, "promptkd": {"depth_vision": 2}}
        cfg = {"method": method, **configs.get(method, {})}
        if method == "promptkd":
            cfg["teacher_arch"] = ""
        torch.manual_seed(seed)
        learner = wrap_with_plugins(get_prompt_model(backbone, cfg, names), {"dapt": dapt})
        assert isinstance(learner, DAPT)
        learner.train()
        return learner

    return build


def make_batch(seed: int = 0, with_mask: bool = True) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {
        "image": torch.randn(BATCH, 3, 32, 32, generator=generator),
        "label": torch.tensor([0, 1, 3]),
    }
    if with_mask:
        batch["mask"] = (torch.rand(BATCH, 1, 32, 32, generator=generator) > 0.5).float()
    return batch


class TowerCalls:
    """Records the images of every pass of the image tower, and whether autograd was on for it."""

    def __init__(self, learner: DAPT) -> None:
        self.images: list[torch.Tensor] = []
        self.with_graph: list[bool] = []
        self.handle = learner.clip.visual.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        self.images.append(args[0].detach().clone())
        self.with_graph.append(torch.is_grad_enabled())

    def __enter__(self) -> TowerCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def grads(learner: PromptModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = learner.trainable_parameters()
    values = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), values, strict=True)}


# -- configuration -------------------------------------------------------------------------------------------


def test_defaults_are_the_official_settings() -> None:
    cfg = DAPTConfig()
    assert (cfg.pull_push_weight, cfg.foreground_weight, cfg.background_weight, cfg.margin) == (0.8, 0.1, 0.5, 1.5)
    assert (cfg.schedule, cfg.switch_epoch, cfg.mask_source, cfg.fill) == ("official", 7, "data", "mean")
    assert cfg.background_template == "a clean origami {}."
    assert len(cfg.background_classes) == 25 and cfg.background_classes[:3] == ["ground", "land", "grass"]
    assert (cfg.gradcam_threshold, cfg.gradcam_refresh) == (0.5, "epoch")


def test_bad_settings_are_refused_with_the_field_named(make, tiny_rn_clip) -> None:
    with pytest.raises(ValueError, match="pull_push_weight"):
        make(pull_push_weight=-1.0)
    with pytest.raises(ValueError, match="background_template"):
        make(background_template="origami")
    with pytest.raises(ConfigError, match=r"plugins\.dapt\.weight"):
        make(weight=1.0)
    resnet = get_prompt_model(tiny_rn_clip, {"method": "coop", "n_ctx": 2}, NAMES)
    with pytest.raises(ValueError, match="ResNet"):
        wrap_with_plugins(resnet, {"dapt": {"mask_source": "gradcam"}})


# -- the views -----------------------------------------------------------------------------------------------


def views_of(batch: dict[str, Any], *names: str) -> torch.Tensor:
    x, m = batch["image"], batch["mask"]
    views = {"whole": x, "fg": x * m, "bg": x * (1 - m)}
    return torch.cat([views[name] for name in names])


# (learner, DAPT settings, epoch) -> the image-tower passes of a step: views, and whether with a graph.
PASSES = {
    "pull-push epochs: both views are targets": ("maple", {}, 0, [(("whole",), True), (("fg", "bg"), False)]),
    "alignment epochs: L_b trains through the background": (
        "maple",
        {},
        7,
        [(("whole", "bg"), True), (("fg",), False)],
    ),
    "joint": ("maple", {"schedule": "joint"}, 0, [(("whole", "bg"), True), (("fg",), False)]),
    "foreground term alone: no background view": (
        "maple",
        {"schedule": "joint", "pull_push_weight": 0.0, "background_weight": 0.0},
        0,
        [(("whole",), True), (("fg",), False)],
    ),
    "image-conditioned class features of the foreground, no visual prompts": (
        "cocoop",
        {"schedule": "joint"},
        0,
        [(("whole", "fg"), True), (("bg",), False)],
    ),
    "batch statistics: one batch for all views": (
        "promptkd",
        {},
        0,
        [(("whole", "fg", "bg"), True)],
    ),
}


@pytest.mark.parametrize("case", list(PASSES))
def test_views_that_need_a_graph_share_the_whole_image_pass_and_targets_run_without_one(make, case: str) -> None:
    method, settings, epoch, expected = PASSES[case]
    learner = make(method, **settings)
    learner.on_epoch_start(epoch, 10)
    batch = make_batch()
    with TowerCalls(learner) as calls:
        output = learner(batch)
    assert len(calls.images) == len(expected)
    for images, graph, (names, with_graph) in zip(calls.images, calls.with_graph, expected, strict=True):
        assert torch.equal(images, views_of(batch, *names))
        assert graph == with_graph
    assert isinstance(output, DAPTOutput)
    assert output.logits.shape == (BATCH, len(NAMES))
    in_passes = {name for names, _ in expected for name in names}
    assert (output.background_features is None) == ("bg" not in in_passes)
    if method == "promptkd":
        return  # its features are normalised with the statistics of the step's whole batch
    fields = {"whole": output.image_features, "fg": output.foreground_features, "bg": output.background_features}
    with torch.no_grad():
        for name, features in fields.items():
            if features is not None:
                expected_features = learner.inner.image_features(views_of(batch, name))
                torch.testing.assert_close(features, expected_features, rtol=0, atol=1e-5, msg=name)


def test_stop_gradient_targets_hold_no_graph(make) -> None:
    learner = make()  # pull-push epochs: the foreground and background are targets only
    output = learner(make_batch())
    assert output.image_features.requires_grad
    assert not output.foreground_features.requires_grad and not output.background_features.requires_grad
    learner.on_epoch_start(7, 10)  # alignment epochs: L_b trains through the background features
    output = learner(make_batch())
    assert output.background_features.requires_grad and not output.foreground_features.requires_grad


def test_a_learner_with_batch_norm_sees_one_batch_per_step(make) -> None:
    learner = make("promptkd", schedule="joint")
    norm = learner.inner.projector.bn
    assert learner.has_batch_statistics()
    before = int(norm.num_batches_tracked)
    seen: list[int] = []
    handle = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        learner(make_batch())
    finally:
        handle.remove()
    assert seen == [3 * BATCH] and int(norm.num_batches_tracked) == before + 1
    learner.eval()
    assert not learner.has_batch_statistics()


def test_black_fill_puts_black_pixels_where_the_mask_removes(make) -> None:
    learner = make(fill="black")
    batch = make_batch()
    with TowerCalls(learner) as calls:
        learner(batch)
    background = calls.images[1][BATCH:]  # pull-push epochs: the target pass holds [foreground, background]
    black = (torch.zeros(3) - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    removed = batch["mask"].expand(-1, 3, -1, -1).bool()  # the object is removed from the background view
    expected = black.view(1, 3, 1, 1).expand_as(background)
    assert torch.allclose(background[removed], expected[removed])
    assert torch.equal(background[~removed], batch["image"][~removed])


# -- the three terms -----------------------------------------------------------------------------------------


def test_pull_push_gradient_reaches_only_the_whole_image_branch(make) -> None:
    # With L_b on, the background view keeps its graph: the pull-push term must still not reach it.
    learner = make(schedule="joint", foreground_weight=0.0)
    batch = make_batch()
    output = learner(batch)
    for features in (output.image_features, output.background_features):
        features.retain_grad()
    assert not output.foreground_features.requires_grad  # a target: encoded without a graph
    losses = learner.loss(batch, output)
    assert set(losses) == {"ce", "dapt_pull_push", "dapt_bg"}
    pull_push = losses["dapt_pull_push"]
    whole, fg, bg = output.image_features, output.foreground_features, output.background_features
    hinge = (whole - fg).norm(dim=-1) - (whole - bg).norm(dim=-1) + 1.5
    assert torch.allclose(pull_push, 0.8 * hinge.clamp(min=0).mean(), atol=1e-5)
    got = grads(learner, pull_push)
    pull_push.backward()
    assert output.image_features.grad is not None and output.image_features.grad.abs().sum() > 0
    assert output.background_features.grad is None
    # The same gradient as a pull-push whose foreground and background are constants.
    inner, x, m = learner.inner, batch["image"], batch["mask"]
    with torch.no_grad():
        constant_fg, constant_bg = inner.image_features(x * m), inner.image_features(x * (1 - m))
    reference = 0.8 * F.triplet_margin_loss(inner.image_features(x), constant_fg, constant_bg, margin=1.5)
    expected = grads(learner, reference)
    assert any(g.abs().sum() > 0 for g in expected.values())
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name


def test_foreground_alignment_trains_only_the_class_prompts(make) -> None:
    learner = make(schedule="joint", pull_push_weight=0.0, background_weight=0.0)
    batch = make_batch()
    output = learner(batch)
    losses = learner.loss(batch, output)
    assert set(losses) == {"ce", "dapt_fg"}
    text = learner.inner.text_features()
    logits = learner.logit_scale * output.foreground_features @ text.t()
    assert torch.allclose(losses["dapt_fg"], 0.1 * F.cross_entropy(logits, batch["label"]), atol=1e-5)
    got = grads(learner, losses["dapt_fg"])
    assert got["inner.text.ctx"].abs().sum() > 0
    vision_only = [name for name in got if name.startswith("inner.couplings")]
    assert vision_only and all(got[name].abs().sum() == 0 for name in vision_only)


def background_sentences() -> list[str]:
    return [f"a clean origami {name}." for name in BACKGROUND_CLASSES]


def test_background_alignment_uses_only_the_background_columns(make) -> None:
    learner = make(schedule="joint", pull_push_weight=0.0, foreground_weight=0.0)
    batch = make_batch()
    output = learner(batch)
    losses = learner.loss(batch, output)
    assert output.logits.shape[1] == len(NAMES)  # no background (or table-top) columns among the classes
    background_text = learner.inner.encode_sentences(background_sentences())
    logits = learner.logit_scale * output.background_features @ background_text.t()
    assert logits.shape[1] == 25
    assert torch.allclose(losses["dapt_bg"], 0.5 * F.cross_entropy(logits, logits.argmax(dim=-1)), atol=1e-5)
    # The same prompts with other class names: the class loss changes, the background loss does not.
    other = make(names=OTHER_NAMES, schedule="joint", pull_push_weight=0.0, foreground_weight=0.0)
    other.load_trainable_state(learner.trainable_state())
    other_losses = other.loss(batch, other(batch))
    assert torch.allclose(other_losses["dapt_bg"], losses["dapt_bg"], atol=1e-6)
    assert not torch.allclose(other_losses["ce"], losses["ce"])


def test_background_classes_and_their_encoding_are_configurable(make, backbone) -> None:
    learner = make(background_classes=["grass", "sky"], background_template="a photo of {}.")
    expected = learner.inner.encode_sentences(["a photo of grass.", "a photo of sky."])
    assert torch.allclose(learner.background_text_features(), expected)
    coop = make("coop", background_classes=["grass", "sky"])
    assert coop.background_text_mode() == "classnames"
    assert torch.allclose(coop.background_text_features(), coop.inner.encode_classnames(["grass", "sky"]))
    frozen = make("coop", background_text="frozen", background_classes=["grass"])
    from promptclip.clip.tokenizer import tokenize

    reference = F.normalize(backbone.encode_text(tokenize(["a clean origami grass."])), dim=-1)
    assert torch.allclose(frozen.background_text_features(), reference, atol=1e-6)
    torch.manual_seed(0)
    csc = wrap_with_plugins(
        get_prompt_model(backbone, {"method": "coop", "n_ctx": 2, "csc": True}, NAMES), {"dapt": {}}
    )
    with pytest.raises(ValueError, match="background_text frozen"):
        csc.background_text_features()


# -- the schedule --------------------------------------------------------------------------------------------


def test_official_schedule_switches_from_pull_push_to_alignment(make) -> None:
    learner = make()
    batch = make_batch()
    for epoch, expected in (
        (0, {"ce", "dapt_pull_push"}),
        (6, {"ce", "dapt_pull_push"}),
        (7, {"ce", "dapt_fg", "dapt_bg"}),
    ):
        learner.on_epoch_start(epoch, 10)
        assert set(learner.loss(batch, learner(batch))) == expected, epoch
    joint = make(schedule="joint")
    joint.on_epoch_start(0, 10)
    assert set(joint.loss(batch, joint(batch))) == {"ce", "dapt_pull_push", "dapt_fg", "dapt_bg"}
    assert make(switch_epoch=2).active_terms(2) == ("dapt_fg", "dapt_bg")


class Interrupt(Exception):
    pass


def test_a_resumed_run_follows_the_schedule_and_ends_where_an_uninterrupted_one_does(make, tmp_path: Path) -> None:
    from promptclip.data.datasets import build_dataset
    from promptclip.data.loader import build_loader
    from promptclip.engine.checkpoint import seed_everything

    splits = build_dataset("synthetic_shapes", train_per_class=1, val_per_class=1, test_per_class=1, image_size=32)
    cfg = OptimConfig(lr=0.05, epochs=3, warmup_epochs=1, warmup_lr=1e-3)

    def run(run_dir: Path, resume: bool, callbacks: Any = ()) -> Trainer:
        seed_everything(1)
        learner = make(names=splits.classnames, switch_epoch=1)
        loader = build_loader(splits, "train", batch_size=5, image_size=32, seed=3, with_masks=True)
        trainer = Trainer(learner, loader, cfg, run_dir=run_dir, progress=False, callbacks=callbacks)
        trainer.fit(resume=resume)
        return trainer

    def stop_after_first(epoch: int, trainer: Trainer) -> None:
        if epoch == 1:
            raise Interrupt

    straight = run(tmp_path / "straight", resume=False)
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", resume=False, callbacks=[stop_after_first])
    resumed = run(tmp_path / "cut", resume=True)
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [("dapt_pull_push" in r, "dapt_fg" in r, "dapt_bg" in r) for r in lines] == [
        (True, False, False),
        (False, True, True),
        (False, True, True),
    ]
    for name, tensor in straight.learner.trainable_state().items():
        assert torch.equal(resumed.learner.trainable_state()[name], tensor), name


# -- masks ---------------------------------------------------------------------------------------------------


def test_dapt_g_masks_are_computed_on_the_steps_own_images(make) -> None:
    learner = make(mask_source="gradcam", gradcam_refresh="step")
    batch = make_batch(with_mask=False)  # DAPT-G needs no mask from the data
    x = batch["image"]
    expected = gradcam_masks(learner.inner, x, batch["label"])
    assert 0 < expected.sum() < expected.numel()
    assert learner.training
    with TowerCalls(learner) as calls:
        learner(batch)
    targets = calls.images[-1]  # pull-push epochs: the last pass holds the foreground and background views
    assert torch.equal(targets, torch.cat([x * expected, x * (1 - expected)]))
    # A different crop of the same images (here: flipped) gets its own masks, computed on that crop.
    flipped = {**batch, "image": x.flip(-1)}
    with TowerCalls(learner) as calls:
        learner(flipped)
    flipped_masks = gradcam_masks(learner.inner, x.flip(-1), batch["label"])
    assert torch.equal(calls.images[-1][:BATCH], x.flip(-1) * flipped_masks)


def test_dapt_g_epoch_refresh_uses_the_prompts_of_the_epoch_start(make) -> None:
    learner = make(mask_source="gradcam")
    batch = make_batch(seed=2, with_mask=False)
    learner.on_epoch_start(0, 5)
    at_start = {k: v.clone() for k, v in learner.inner.trainable_state().items()}
    with torch.no_grad():  # the steps of the epoch move the prompts far
        for tensor in learner.inner.trainable_parameters().values():
            tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(9)))
    moved = {k: v.clone() for k, v in learner.inner.trainable_state().items()}
    current_masks = gradcam_masks(learner.inner, batch["image"], batch["label"])
    snapshot = make(mask_source="gradcam")
    snapshot.inner.load_trainable_state(at_start)
    start_masks = gradcam_masks(snapshot.inner, batch["image"], batch["label"])
    assert not torch.equal(current_masks, start_masks)
    with TowerCalls(learner) as calls:
        learner(batch)
    assert torch.equal(calls.images[-1][:BATCH], batch["image"] * start_masks)
    for name, tensor in learner.inner.trainable_state().items():  # and the current prompts are back
        assert torch.equal(tensor, moved[name]), name


def test_test_time_needs_no_masks(make) -> None:
    for source in ("data", "gradcam"):
        learner = make(mask_source=source)
        learner.train()
        learner.loss(make_batch(), learner(make_batch()))
        learner.eval()
        for batch in (make_batch(with_mask=False), make_batch()):
            with torch.no_grad(), TowerCalls(learner) as calls:
                logits = learner(batch).logits
                inner_logits = learner.inner(batch).logits
            assert torch.equal(logits, inner_logits)
            assert [images.shape[0] for images in calls.images] == [BATCH, BATCH]  # no extra views, no Grad-CAM
    learner = make()
    with torch.no_grad():  # a forward without autograd is no training step either
        assert not isinstance(learner(make_batch()), DAPTOutput)


def test_a_run_trains_with_masks_and_evaluates_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from promptclip.cli import main

    seen: list[tuple[bool, bool]] = []
    original = DAPT.forward

    def recording(self: DAPT, batch: Any) -> Any:
        seen.append((self.training, "mask" in batch))
        return original(self, batch)

    monkeypatch.setattr(DAPT, "forward", recording)
    recipe = {
        "method": "maple+dapt",
        "method_cfg": {"depth": 2},
        "plugins": {"dapt": {"schedule": "joint"}},
        "model": {"arch": "tiny-vit", "weights": "random", "precision": "fp32"},
        "data": {
            "dataset": "synthetic_shapes",
            "shots": 1,
            "batch_size": 5,
            "eval_batch_size": 10,
            "options": {"train_per_class": 1, "val_per_class": 1, "test_per_class": 1, "image_size": 32},
        },
        "optim": {"lr": 0.002, "epochs": 1},
        "device": "cpu",
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    argv = ["train", "--recipe", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "run"), "--quiet"]
    assert main([*argv, "--runs-dir", str(tmp_path)]) == 0
    assert (True, True) in seen and (False, True) not in seen and (False, False) in seen
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"dapt_pull_push", "dapt_fg", "dapt_bg"} <= set(metrics[0])


def test_dapt_s_reads_mask_files_and_a_missing_mask_stops_the_run(backbone, tmp_path: Path) -> None:
    from promptclip.cli import main
    from promptclip.data.synthetic import build_task, export_task

    task = build_task("synthetic_shapes", train_per_class=2, val_per_class=0, test_per_class=2, image_size=32)
    dataset_dir = export_task(task, tmp_path / "data")
    recipe = {
        "method": "coop+dapt",
        "method_cfg": {"n_ctx": 2},
        "plugins": {"dapt": {"schedule": "joint", "mask": {"mask_dir": str(dataset_dir / "mask")}}},
        "model": {"arch": "tiny-vit", "weights": "random", "precision": "fp32"},
        "data": {"dataset": "folder", "root": str(dataset_dir / "images"), "shots": 0, "batch_size": 8},
        "optim": {"lr": 0.002, "epochs": 1},
        "device": "cpu",
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    argv = ["train", "--recipe", str(tmp_path / "recipe.yaml"), "--runs-dir", str(tmp_path), "--quiet"]
    assert main([*argv, "--output", str(tmp_path / "run")]) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"mask files in {dataset_dir / 'mask'}" in log
    assert "dapt_fg" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # Grad-CAM masks precomputed by `promptclip masks gradcam` are read the same way.
    from promptclip.clip.weights import save_clip

    save_clip(backbone, tmp_path / "tiny.safetensors")
    cams = tmp_path / "cams"
    command = ["masks", "gradcam", "--dataset", "folder", "--root", str(dataset_dir / "images"), "--out", str(cams)]
    assert main([*command, "--arch", str(tmp_path / "tiny.safetensors"), "--device", "cpu", "--no-progress"]) == 0
    with_cams = ["--opts", "plugins.dapt.mask.mask_dir", str(cams)]
    assert main([*argv, "--output", str(tmp_path / "run-cams"), *with_cams]) == 0
    assert f"mask files in {cams}" in (tmp_path / "run-cams" / "log.txt").read_text()
    # Masks that are not there: the run stops before training and says which are missing.
    missing = ["--opts", "plugins.dapt.mask.mask_dir", str(tmp_path / "nowhere")]
    assert main([*argv, "--output", str(tmp_path / "run-missing"), *missing]) == 2
    assert not (tmp_path / "run-missing" / "results.json").exists()


# -- saving, other learners ----------------------------------------------------------------------------------


def test_a_saved_prompt_records_the_plug_in_and_its_settings(make, backbone, tmp_path: Path) -> None:
    learner = make(mask_source="gradcam", schedule="joint", background_classes=["grass", "sky"], margin=1.0)
    learner.loss(make_batch(), learner(make_batch()))
    learner.save_pretrained(tmp_path / "prompt")
    saved = json.loads((tmp_path / "prompt" / "prompt_config.json").read_text())
    assert saved["method"] == "maple"
    assert saved["plugins"]["dapt"]["background_classes"] == ["grass", "sky"]
    loaded = PromptModel.from_pretrained(backbone, tmp_path / "prompt")
    assert isinstance(loaded, DAPT) and loaded.describe()["method"] == "maple"
    assert loaded.cfg == learner.cfg


def test_image_conditioned_learners_get_foreground_conditioned_class_features(make, backbone) -> None:
    learner = make("cocoop", schedule="joint")
    batch = make_batch()
    output = learner(batch)
    assert output.text_features.shape == (BATCH, len(NAMES), backbone.config.embed_dim)
    assert output.foreground_text_features.shape == output.text_features.shape
    with torch.no_grad():
        per_image = learner.inner({"image": batch["image"] * batch["mask"]}).text_features
    assert torch.allclose(output.foreground_text_features, per_image, atol=1e-5)
    assert torch.isfinite(sum(learner.loss(batch, output).values()))


def test_transductive_learners_never_read_the_labels(make) -> None:
    # PromptKD trains on unlabelled images of every class: DAPT uses the whole image's prediction instead.
    batch = make_batch()
    relabelled = {**batch, "label": (batch["label"] + 1) % len(NAMES)}
    for source in ("data", "gradcam"):
        learner = make("promptkd", mask_source=source, schedule="joint")
        assert not learner.uses_labels
        first = learner.loss(batch, learner(batch))
        learner = make("promptkd", mask_source=source, schedule="joint")  # fresh batch-norm statistics
        second = learner.loss(relabelled, learner(relabelled))
        assert first.keys() == second.keys() and "dapt_fg" in first
        for name in first:
            assert torch.allclose(first[name], second[name]), (source, name)
    labelled = make("maple", schedule="joint")
    assert labelled.uses_labels
    assert not torch.allclose(
        labelled.loss(batch, labelled(batch))["dapt_fg"], labelled.loss(relabelled, labelled(relabelled))["dapt_fg"]
    )


# The recipes of the official configs (ViT-B/16); the tiny-model demo recipes adapt the settings to their world.
RECIPES = sorted(
    recipe.path
    for recipe in list_recipes()
    if recipe.name.split("/")[0].endswith("_dapt") and recipe.path.stem.startswith("vit_b16")
)


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_recipes_carry_the_official_dapt_settings(recipe: Path) -> None:
    from promptclip.config import load_run_config

    cfg = load_run_config(recipe)
    assert cfg.plugin_names == ["dapt"]
    dapt = cfg.plugins["dapt"]
    assert (dapt.pull_push_weight, dapt.foreground_weight, dapt.background_weight, dapt.margin) == (0.8, 0.1, 0.5, 1.5)
    assert (dapt.schedule, dapt.switch_epoch, dapt.compat) == ("official", 7, "default")
    assert dapt.background_classes == list(BACKGROUND_CLASSES)
    assert cfg.optim.warmup_epochs == 1 and cfg.optim.warmup_lr == 1e-5
    if cfg.method_name == "maple":
        few_shot = "vit_b16_t" in recipe.stem
        assert (cfg.optim.lr, cfg.optim.epochs) in ((0.0035, 10 if few_shot else 5), (0.0026, 2))
        assert cfg.data.batch_size == (1 if recipe.stem == "vit_b16_base" else 4)


def test_the_comparison_script_measures_what_the_runs_measured(tmp_path: Path) -> None:
    import sys

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        import dapt_compare
    finally:
        sys.path.remove(str(benchmarks))
    from promptclip.data.synthetic import build_task

    argv = ["--arch", "tiny-vit", "--weights", "random", "--seeds", "1", "--epochs", "1", "--shots", "1"]
    argv += ["--train-per-class", "1", "--test-per-class", "2", "--variants", "maple,dapt-g", "--device", "cpu"]
    args = dapt_compare.parse_args([*argv, "--runs-dir", str(tmp_path)])
    dapt_compare.main([*argv, "--runs-dir", str(tmp_path)])
    task = build_task("synthetic_objects", train_per_class=1, val_per_class=1, test_per_class=2, image_size=32)
    aligned = sum(s.spec.scene == task.scene_of_class[s.label] for s in task.test)
    for name in ("maple", "dapt-g"):
        folder = dapt_compare.run_dir(args, name, 1)
        results = json.loads((folder / "results.json").read_text())
        assert results["method"] == dapt_compare.VARIANTS[name].method
        found = dapt_compare.diagnose(folder, args)
        overall = (aligned * found.aligned + (len(task.test) - aligned) * found.conflicting) / len(task.test)
        assert overall == pytest.approx(results["evaluations"]["all"]["accuracy"], abs=1e-3)
        assert found.accuracy == pytest.approx(results["evaluations"]["all"]["accuracy"], abs=1e-3)
        assert 0 <= found.cam_iou <= 100


# -- compat: released ----------------------------------------------------------------------------------------


def test_compat_is_a_checked_setting(make, backbone) -> None:
    assert DAPTConfig().compat == "default"
    with pytest.raises(ConfigError, match=r"plugins\.dapt\.compat"):
        make(compat="release")
    with pytest.raises(ValueError, match="compat must be one of default, released"):
        DAPT(get_prompt_model(backbone, {"method": "coop", "n_ctx": 2}, NAMES), DAPTConfig(compat="x"))  # type: ignore[arg-type]
    # Its extra class columns would break a loss or class features that need exactly the class columns.
    for method in ("promptkd", "cocoop"):
        with pytest.raises(ValueError, match=r"plugins\.dapt\.compat: 'released'.*compat 'default'"):
            make(method, compat="released")
    assert make("coop", compat="released").cfg.compat == "released"


def test_the_released_slicing_of_the_background_rows() -> None:
    extra, background = released_background_split(BACKGROUND_CLASSES)
    assert extra == ["ground", "land", "grass", "tree", "building", "wall", "sky"]
    assert background == [*BACKGROUND_CLASSES[7:], *TABLE_BACKGROUND_CLASSES] and len(background) == 25
    # The rule for any list: rows = classes, background classes, table-top names; L_b reads the last len(list).
    extra, background = released_background_split(["grass", "sky"])
    assert extra == ["grass", "sky", *TABLE_BACKGROUND_CLASSES[:5]] and background == list(TABLE_BACKGROUND_CLASSES[5:])


def released_reference_step(learner: DAPT, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The released MaPLe + DAPT step written out: one set of text rows (classes, the 25 background names, the
    7 table-top names), sliced [:-25] / [-25:]; three image passes; every term of trainers/maple.py."""
    inner, x, m, y = learner.inner, batch["image"], batch["mask"], batch["label"]
    sentences = [f"a clean origami {name}." for name in (*BACKGROUND_CLASSES, *TABLE_BACKGROUND_CLASSES)]
    rows = torch.cat([inner.text_features(), inner.encode_sentences(sentences)])
    class_rows, background_rows = rows[:-25], rows[-25:]
    whole, fg, bg = inner.image_features(x), inner.image_features(x * m), inner.image_features(x * (1 - m))
    scale = learner.clip.logit_scale.exp()
    background_logits = scale * bg @ background_rows.t()
    return {
        "ce": F.cross_entropy(scale * whole @ class_rows.t(), y),
        "dapt_pull_push": 0.8 * F.triplet_margin_loss(whole, fg.detach(), bg.detach(), margin=1.5, p=2, eps=1e-6),
        "dapt_fg": 0.1 * F.cross_entropy(scale * fg.detach() @ class_rows.t(), y),
        "dapt_bg": 0.5 * F.cross_entropy(background_logits, background_logits.argmax(dim=-1)),
    }


def test_released_compat_reproduces_the_released_step_term_by_term_and_in_its_gradient(make) -> None:
    batch = make_batch(seed=4)
    learner = make(compat="released", schedule="joint")
    output = learner(batch)
    assert output.logits.shape == (BATCH, len(NAMES) + 7)
    losses = learner.loss(batch, output)
    reference = released_reference_step(learner, batch)
    assert losses.keys() == reference.keys()
    # Both compute the same sums in other batch shapes (text rows cut at another length, images in other
    # batches): the unit features differ by fp32 rounding (~1e-7), the logits by that times the logit scale
    # (14.3 here), and cross-entropy moves by at most the largest logit change: 2e-6.
    for name, value in reference.items():
        torch.testing.assert_close(losses[name], value, rtol=0, atol=2e-6, msg=name)
    got = grads(learner, sum(losses.values()))  # type: ignore[arg-type]
    expected = grads(learner, sum(reference.values()))  # type: ignore[arg-type]
    for name, gradient in expected.items():
        assert gradient.abs().max() > 0, name
        # The same rounding, relative to each gradient's scale (seen: 5e-7).
        torch.testing.assert_close(got[name], gradient, rtol=1e-5, atol=1e-5 * float(gradient.abs().max()), msg=name)
    # The default step differs where the release does: the classifier and the background classes.
    default = make(schedule="joint")
    default_losses = default.loss(batch, default(batch))
    for name in ("ce", "dapt_fg", "dapt_bg"):
        assert (default_losses[name] - reference[name]).abs() > 1e-3, name
    # Under the official schedule: the same terms, switched by epoch.
    official = make(compat="released")
    for epoch, terms in ((0, {"ce", "dapt_pull_push"}), (7, {"ce", "dapt_fg", "dapt_bg"})):
        official.on_epoch_start(epoch, 10)
        losses = official.loss(batch, official(batch))
        assert set(losses) == terms
        for name in terms:
            torch.testing.assert_close(losses[name], reference[name], rtol=0, atol=2e-6, msg=name)


def corner_aligned_upsampling(grid: int, size: int) -> torch.Tensor:
    """[size, grid] weights of bilinear interpolation with the first and last pixel on the first and last grid
    value (`align_corners=True`): pixel i reads the grid at i * (grid - 1) / (size - 1)."""
    position = torch.arange(size, dtype=torch.float64) * (grid - 1) / (size - 1)
    low = position.floor().long().clamp(max=grid - 2)
    weight = position - low
    matrix = torch.zeros(size, grid, dtype=torch.float64)
    matrix[torch.arange(size), low] = 1 - weight
    matrix[torch.arange(size), low + 1] = weight
    return matrix


def test_released_compat_masks_come_from_the_released_grad_cam(make) -> None:
    learner = make(mask_source="gradcam", gradcam_refresh="step", compat="released")
    batch = make_batch(seed=5, with_mask=False)
    x = batch["image"]
    cam, _ = gradcam_grid(learner.inner, x, batch["label"])
    grid = cam.shape[-1]
    upsample = corner_aligned_upsampling(grid, x.shape[-1])
    heat = upsample @ cam.double() @ upsample.t()
    expected = (heat / (heat.max() + 1e-6) >= 0.5).float()[:, None]  # over the batch's maximum
    assert 0 < expected.sum() < expected.numel()
    with TowerCalls(learner) as calls:
        learner(batch)
    assert torch.equal(calls.images[-1][:BATCH], x * expected)
    # The default's masks are not these (per-image maxima, patch-centred grid).
    assert not torch.equal(gradcam_masks(learner.inner, x, batch["label"]), expected)


# -- precision -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["maple", "cocoop"])
def test_foreground_and_background_logits_are_fp32_under_autocast(make, method: str) -> None:
    # Near a logit of 100, bf16 steps are 0.5: the views' logits get the class logits' fp32 treatment.
    learner = make(method, schedule="joint", compat="released" if method == "maple" else "default")
    batch = make_batch()
    calls: dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def recorder(name: str) -> Callable[..., torch.Tensor]:
        original = getattr(learner, name)

        def record(*args: torch.Tensor) -> torch.Tensor:
            calls[name] = (args, original(*args))
            return calls[name][1]

        return record

    for name in ("foreground_logits", "background_logits"):
        setattr(learner, name, recorder(name))  # an instance attribute shadows the method
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = learner(batch)
        learner.loss(batch, output)
    if method == "maple":  # the class logits with the released extra columns (CoCoOp's are its own)
        assert output.logits.dtype == torch.float32 and output.logits.shape[1] == len(NAMES) + 7
    assert set(calls) == {"foreground_logits", "background_logits"}
    for name, (args, logits) in calls.items():
        assert logits.dtype == torch.float32, name
        inputs = [a.detach().float() for a in args]
        assert torch.equal(logits.detach(), getattr(DAPT, name)(learner, *inputs).detach()), name  # fp32 outside
