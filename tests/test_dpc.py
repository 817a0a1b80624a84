"""DPC over every kind of tuned learner: P' starts as an exact copy of P, base predictions start at stage 1's,
new-class predictions with omega_n = 0 stay bitwise stage 1's, the weighting-decoupling algebra, the
hard-negative loss, saving, the stage-1 hook and a two-stage run through the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dpc_cases import dpc_builder, picture_splits, stage1_learner
from torch import nn

from promptclip.clip.model import CLIP
from promptclip.clip.weights import arch_config
from promptclip.config import ConfigError, build_run_config
from promptclip.engine.evaluate import evaluate
from promptclip.factory import run_needs
from promptclip.methods.base import PromptModel
from promptclip.methods.ivlp import initial_text_context
from promptclip.plugins.base import PluginContext, PluginModel
from promptclip.plugins.dpc import DPC, DPCConfig
from promptclip.plugins.hard_negatives import RenderedPictures, symmetric_contrastive_loss

CLASSES = ["cat", "dog", "car", "tree", "boat"]
OTHER = ["plane", "house", "fish"]
TEMPLATE = "a photo of a {}."
BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "coop": ("coop", {"n_ctx": 4}),
    "kgcoop": ("kgcoop", {}),
    "maple": ("maple", {"depth": 2}),
    "ivlp": ("ivlp", {"depth_text": 2, "depth_vision": 2}),
    "promptsrc": ("promptsrc", {"depth_text": 2, "depth_vision": 2}),
    "promptkd": ("promptkd", {"depth_vision": 2, "teacher_arch": ""}),
}
IMAGE_SIZE = arch_config("tiny-vit").vision.image_size


@pytest.fixture(scope="module")
def clip(tiny_clips) -> CLIP:
    """tiny-vit with the random weights of seed 1234."""
    return tiny_clips("tiny-vit", 1234)


Backbone = str | tuple[str, dict[str, Any]]  # a name in BACKBONES, or (method, method_cfg)


def build_dpc(clip: CLIP, backbone: Backbone, classnames: list[str] = CLASSES, **cfg: Any) -> DPC:
    method, method_cfg = BACKBONES[backbone] if isinstance(backbone, str) else backbone
    learner = dpc_builder(method, method_cfg, **cfg)(clip, classnames, TEMPLATE)
    assert isinstance(learner, DPC)
    return learner


def build_stage1(clip: CLIP, backbone: Backbone, classnames: list[str] = CLASSES) -> PromptModel:
    method, method_cfg = BACKBONES[backbone] if isinstance(backbone, str) else backbone
    return stage1_learner(clip, classnames, TEMPLATE, method, method_cfg)


def make_batch(labels: list[int], seed: int = 0) -> dict[str, Any]:
    images = torch.randn(len(labels), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    return {"image": images, "label": torch.tensor(labels), "index": torch.arange(len(labels))}


def logits(learner: PromptModel, batch: dict[str, Any]) -> torch.Tensor:
    learner.eval()
    with torch.no_grad():
        return learner(batch).logits


def train_steps(learner: PromptModel, steps: int = 2, lr: float = 0.5) -> None:
    optimizer = torch.optim.SGD(list(learner.trainable_parameters().values()), lr=lr, momentum=0.9)
    learner.train()
    for step in range(steps):
        batch = make_batch([0, 1, 1, 3], seed=10 + step)
        output = learner(batch)
        optimizer.zero_grad()
        sum(learner.loss(batch, output).values()).backward()  # type: ignore[union-attr]
        optimizer.step()


# -- P' at the start of stage 2 ------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["reparam", "mixed"])
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_parallel_prompt_starts_as_an_exact_copy_of_every_tensor_at_every_depth(
    clip, backbone: str, weighting: str
) -> None:
    dpc = build_dpc(clip, backbone, weighting=weighting)
    stage1 = build_stage1(clip, backbone)
    expected = set(stage1.trainable_parameters())
    assert set(dpc.tuned_names) == expected
    deep = [name for name in expected if ".deep." in name or name.startswith("couplings.1")]
    if backbone in ("maple", "ivlp", "promptsrc", "promptkd"):
        assert deep, "the deep prompts must be among the tuned tensors"
    reference = {**stage1.trainable_parameters(), **stage1.extra_state_buffers()}
    for tensors in (dpc.tuned_tensors(), dpc.base_tensors(), dpc.new_tensors()):
        assert set(tensors) == set(reference)
        for name, tensor in tensors.items():
            assert torch.equal(tensor, reference[name]), f"P' differs from P at {name}"
    for name in dpc.tuned_names:
        stored = dpc.tuned[name.replace(".", "__")]
        assert stored.requires_grad and stored.data_ptr() != dpc.inner.get_parameter(name).data_ptr()
        assert not dpc.inner.get_parameter(name).requires_grad
    assert set(dpc.trainable_parameters()) == {"tuned." + n.replace(".", "__") for n in dpc.tuned_names}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_base_predictions_before_the_first_step_are_stage1s(clip, backbone: str) -> None:
    dpc = build_dpc(clip, backbone)
    stage1 = build_stage1(clip, backbone)
    batch = make_batch([0, 1, 2, 3, 4])
    assert torch.equal(logits(dpc, batch), logits(stage1, batch))
    assert evaluate(dpc, [batch]).correct == evaluate(stage1, [batch]).correct


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_new_class_predictions_with_omega_n_zero_are_bitwise_stage1s(clip, backbone: str) -> None:
    dpc = build_dpc(clip, backbone, omega_b=0.5)
    train_steps(dpc)
    batch = make_batch([0, 1, 2])
    stage1 = build_stage1(clip, backbone, OTHER)
    dpc.set_classnames(OTHER)
    dpc.set_eval_subset("new")
    assert torch.equal(logits(dpc, batch), logits(stage1, batch))
    dpc.set_eval_subset("base")
    assert not torch.equal(logits(dpc, batch), logits(stage1, batch)), "P' did not move in training"


def test_omega_n_mixes_the_two_prompts_for_new_classes(clip) -> None:
    dpc = build_dpc(clip, "coop", omega_n=1.0)
    train_steps(dpc)
    batch = make_batch([0, 1, 2])
    dpc.set_eval_subset("base")
    base = logits(dpc, batch)
    dpc.set_eval_subset("new")
    assert torch.equal(logits(dpc, batch), base)  # omega_n = 1: the tuned prompt itself
    dpc.cfg.omega_n = 0.25
    tuned, stage1 = dpc.tuned_tensors()["ctx"], dpc.stage1_tensors()["ctx"]
    assert torch.allclose(dpc.new_tensors()["ctx"], stage1 + 0.25 * (tuned - stage1))


def test_reparametrisation_divides_the_gradient_by_omega_b(clip) -> None:
    batch = make_batch([0, 1, 3])
    grads = {}
    for omega_b in (1.0, 0.25):
        dpc = build_dpc(clip, "coop", omega_b=omega_b)
        dpc.train()
        sum(dpc.loss(batch, dpc(batch)).values()).backward()  # type: ignore[union-attr]
        grads[omega_b] = dpc.tuned["ctx"].grad.clone()
    assert grads[1.0].abs().sum() > 0
    assert torch.allclose(grads[0.25], grads[1.0] / 0.25, rtol=1e-4, atol=1e-7)


def test_reparametrised_tuned_prompt_follows_the_official_formula(clip) -> None:
    dpc = build_dpc(clip, "maple", omega_b=0.2)
    train_steps(dpc)
    for name in dpc.tuned_names:
        theta, stage1 = dpc.tuned[name.replace(".", "__")], dpc.stage1_tensors()[name]
        assert torch.allclose(dpc.tuned_tensors()[name], (theta - 0.8 * stage1) / 0.2, atol=1e-5)
        assert torch.equal(dpc.base_tensors()[name], dpc.tuned_tensors()[name])


def test_mixed_weighting_trains_and_predicts_base_with_the_mixed_prompt(clip) -> None:
    dpc = build_dpc(clip, "maple", weighting="mixed", omega_b=0.3, reparametrize=["text.*"])
    train_steps(dpc)
    stage1, tuned, base = dpc.stage1_tensors(), dpc.tuned_tensors(), dpc.base_tensors()
    for name in dpc.tuned_names:
        if name.startswith("text."):
            assert torch.allclose(base[name], stage1[name] + 0.3 * (tuned[name] - stage1[name]), atol=1e-6)
            assert not torch.equal(base[name], tuned[name])
        else:  # not weighted: trained and used directly
            assert torch.equal(base[name], tuned[name])


# -- the hard-negative optimizer inside DPC --------------------------------------------------------------------


def test_negatives_never_include_a_ground_truth_class_of_the_batch(clip, monkeypatch: pytest.MonkeyPatch) -> None:
    dpc = build_dpc(clip, "coop", top_k=4, min_negatives=2)
    library = dpc.picture_library()
    seen: list[list[int]] = []
    requests = library.requests
    monkeypatch.setattr(library, "requests", lambda classes, g=None: seen.append(list(classes)) or requests(classes, g))
    dpc.train()
    for seed in range(6):
        labels = [seed % 5, seed % 5, (seed + 1) % 5]  # a repeated class among the anchors
        batch = make_batch(labels, seed=seed)
        terms = dpc.loss(batch, dpc(batch))
        assert set(terms) == {"dpc"} and torch.isfinite(terms["dpc"])
        assert seen[-1] and not set(seen[-1]) & set(labels)
        assert len(seen[-1]) == len(set(seen[-1]))


def test_the_frozen_stage1_model_ranks_with_class_features_encoded_once(clip) -> None:
    dpc = build_dpc(clip, "maple")
    batch = make_batch([0, 1, 2])
    before = dpc.stage1_scores(batch["image"])
    features = dpc.stage1_class_features()
    train_steps(dpc, steps=3)
    assert dpc.stage1_class_features() is features
    assert torch.equal(dpc.stage1_scores(batch["image"]), before)
    stage1 = build_stage1(clip, "maple")
    with torch.no_grad():
        scale = stage1.logit_scale
        expected = scale * stage1.image_features(batch["image"]) @ stage1.encode_classnames(CLASSES).t()
    assert torch.allclose(before, expected, atol=1e-6 * float(scale))  # cosines to 1e-6, scaled


def test_a_batchnorm_learner_encodes_anchors_and_negatives_as_one_batch(clip, monkeypatch) -> None:
    """PromptKD's projector (BatchNorm) sees the B' images of a step as one batch and updates its statistics
    once, as the official code does: the step equals stage 1 run once on the concatenated images."""
    dpc = build_dpc(clip, "promptkd", omega_b=1.0)  # P' = P exactly at the start: the step is stage 1's
    drawn: list[RenderedPictures] = []
    draw = dpc.draw_negatives
    monkeypatch.setattr(dpc, "draw_negatives", lambda scores, labels: drawn.append(draw(scores, labels)) or drawn[-1])
    sizes: list[int] = []
    dpc.inner.projector.bn.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    batch = make_batch([0, 1, 3])
    dpc.train()
    loss = dpc.loss(batch, dpc(batch))["dpc"]
    loss.backward()
    negatives = drawn[0]
    assert len(negatives) >= 2
    assert sizes == [3 + len(negatives)], "the anchors and the negatives went through BatchNorm separately"
    assert int(dpc.tuned_buffers.get_buffer("projector__bn__num_batches_tracked")) == 1

    reference = build_stage1(clip, "promptkd").train()
    images = torch.cat([batch["image"], negatives.images()])
    labels = torch.cat([batch["label"], negatives.labels])
    features = reference.image_features(images)
    expected = symmetric_contrastive_loss(features, reference.text_features()[labels], labels, reference.logit_scale)
    expected.backward()
    # The same operations on the same tensors: equal up to the last bit or so.
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for name, tensor in reference.trainable_parameters().items():
        grad = dpc.tuned[name.replace(".", "__")].grad
        torch.testing.assert_close(grad, tensor.grad, rtol=1e-5, atol=1e-7 * float(tensor.grad.abs().max()), msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        tuned = dpc.tuned_buffers.get_buffer(f"projector__bn__{name}")
        torch.testing.assert_close(tuned, reference.projector.bn.get_buffer(name), rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("backbone", ["coop", "maple"])
def test_ranking_scores_and_pair_logits_are_fp32_under_autocast(clip, backbone: str) -> None:
    """Autocast (bf16 on this CPU, as on a GPU) lowers the towers, not the logits: the ranking scores are
    the fp32 product of the features, and the loss and the anchors' logits are fp32."""
    dpc = build_dpc(clip, backbone)
    batch = make_batch([0, 1, 3])
    features = dpc.inner.image_features(batch["image"]).detach()
    dpc.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = dpc.ranking_scores(features)
        output = dpc(batch)
        loss = dpc.loss(batch, output)["dpc"]
    assert scores.dtype == output.logits.dtype == loss.dtype == torch.float32
    assert torch.equal(scores, dpc.ranking_scores(features))
    assert torch.isfinite(loss)


def test_backbone_losses_can_run_beside_the_contrastive_loss(clip) -> None:
    dpc = build_dpc(clip, "promptsrc", backbone_loss_weight=0.5)
    batch = make_batch([0, 1, 2])
    dpc.train()
    terms = dpc.loss(batch, dpc(batch))
    assert {"dpc", "stage1_ce", "stage1_scl_text"} <= set(terms)


def test_the_full_library_needs_the_full_training_split(clip) -> None:
    dpc = build_dpc(clip, "coop", library="full")
    batch = make_batch([0, 1])
    dpc.train()
    with pytest.raises(RuntimeError, match="full_splits"):
        dpc.loss(batch, dpc(batch))
    dpc.context.full_splits = picture_splits(CLASSES, per_class=5)
    assert len(dpc.picture_library()) == 25


def test_the_picture_library_takes_the_runs_augmentation_from_the_context(clip) -> None:
    from promptclip.clip.transforms import Augmentation, EvalTransform, TrainTransform

    dpc = build_dpc(clip, "coop")
    assert isinstance(dpc.picture_library().transform, TrainTransform)  # the field's crops by default
    assert dpc.picture_library().transform.scale == (0.08, 1.0)
    for augmentation, kind in (
        (Augmentation(scale=(0.5, 1.0), flip_p=0.0), TrainTransform),
        (Augmentation(False), EvalTransform),
    ):
        dpc = build_dpc(clip, "coop")
        dpc.context.augmentation = augmentation
        transform = dpc.picture_library().transform
        assert isinstance(transform, kind)
        if isinstance(transform, TrainTransform):
            assert (transform.scale, transform.flip_p) == ((0.5, 1.0), 0.0)


# -- compat: released --------------------------------------------------------------------------------------------


def sgd(learner: PromptModel, lr: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(list(learner.trainable_parameters().values()), lr, momentum=0.9, weight_decay=weight_decay)


def sgd_step(learner: PromptModel, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    optimizer.zero_grad()
    sum(learner.loss(batch, learner(batch)).values()).backward()  # type: ignore[union-attr]
    optimizer.step()


def test_compat_released_reproduces_a_hand_written_aliased_sgd_step(clip) -> None:
    """The released code wraps P in nn.Parameter without a copy, so every SGD step moves P with theta. The
    same steps written by hand with that shared storage (and the same loss) give the same trajectory."""
    omega_b, lr, weight_decay = 0.3, 0.05, 5e-4
    released = build_dpc(clip, "coop", omega_b=omega_b, compat="released")
    reference = build_dpc(clip, "coop", omega_b=omega_b)  # only its prompt is replaced by the aliased one
    pretuned = reference.stage1_tensors()["ctx"].detach().clone()
    theta = nn.Parameter(pretuned)  # shares pretuned's storage, as in the released PromptLearner
    assert theta.data_ptr() == pretuned.data_ptr()
    aliased = lambda: {"ctx": (theta - (1 - omega_b) * pretuned) * (1 / omega_b)}  # noqa: E731
    reference.base_tensors = aliased  # type: ignore[method-assign]
    optimizer = sgd(released, lr, weight_decay)
    reference_optimizer = torch.optim.SGD([theta], lr, momentum=0.9, weight_decay=weight_decay)
    released.train()
    reference.train()
    for step in range(3):
        batch = make_batch([0, 1, 3], seed=20 + step)
        sgd_step(released, optimizer, batch)
        sgd_step(reference, reference_optimizer, batch)
        assert torch.equal(released.tuned["ctx"], theta), f"step {step + 1}"
    assert torch.equal(pretuned, theta)  # P moved with theta: P' is theta
    stage1 = build_stage1(clip, "coop").get_parameter("ctx")
    assert torch.equal(released.stage1_tensors()["ctx"], stage1)  # new classes still mix with the real P


def test_compat_released_trains_as_omega_b_one_at_lr_over_omega_b_and_weight_decay_times_omega_b(clip) -> None:
    omega_b, lr, weight_decay = 0.5, 0.05, 5e-2
    released = build_dpc(clip, "coop", omega_b=omega_b, compat="released")
    plain = build_dpc(clip, "coop", omega_b=1.0)
    optimizers = [sgd(released, lr, weight_decay), sgd(plain, lr / omega_b, weight_decay * omega_b)]
    for learner in (released, plain):
        learner.train()
    for step in range(3):
        batch = make_batch([0, 1, 3], seed=30 + step)
        for learner, optimizer in zip((released, plain), optimizers, strict=True):
            sgd_step(learner, optimizer, batch)
    moved = (plain.tuned["ctx"] - plain.stage1_tensors()["ctx"]).abs().max()
    assert moved > 1e-3
    # omega_b = 0.5 makes every scaling exact; what remains is the rounding of the default formula's
    # P + (theta - P) at omega_b = 1 (one ulp of the prompt per step, carried through three steps).
    torch.testing.assert_close(released.tuned["ctx"], plain.tuned["ctx"], rtol=1e-5, atol=1e-6)
    default = build_dpc(clip, "coop", omega_b=omega_b)
    optimizer = sgd(default, lr, weight_decay)
    default.train()
    for step in range(3):
        sgd_step(default, optimizer, make_batch([0, 1, 3], seed=30 + step))
    assert not torch.allclose(default.tuned["ctx"], released.tuned["ctx"], rtol=1e-3, atol=1e-5)


def test_compat_released_promptkd_ranks_with_the_untuned_teacher_context(clip, tmp_path: Path) -> None:
    """In the released PromptKD+DPC only the text context is aliased, and the sampler's layer-0 text context
    is the untuned embedding of the teacher's initial words."""
    teacher = stage1_learner(clip, CLASSES, TEMPLATE, "promptsrc", {"depth_text": 2, "depth_vision": 2})
    teacher.save_pretrained(tmp_path / "teacher")
    kd: Backbone = ("promptkd", {"depth_vision": 2, "teacher_arch": "", "teacher_prompt": str(tmp_path / "teacher")})
    text_branch = {"also_tune": ["teacher.text.*"], "reparametrize": ["teacher.text.ctx"]}
    released = build_dpc(clip, kd, compat="released", **text_branch)
    plain = build_dpc(clip, kd, **text_branch)
    untuned = PromptModel.from_pretrained(clip, tmp_path / "teacher")
    with torch.no_grad():
        tuned_features = untuned.encode_classnames(CLASSES)
        untuned.get_parameter("text.ctx").copy_(initial_text_context(clip, 4, "a photo of a"))
        untuned_features = untuned.encode_classnames(CLASSES)
    assert not torch.allclose(tuned_features, untuned_features, atol=1e-4)
    torch.testing.assert_close(released.stage1_class_features(), untuned_features, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.stage1_class_features(), tuned_features, rtol=0, atol=1e-6)
    tensors = released.tuned_tensors()
    for name in released.tuned_names:  # only the text context runs the aliased formula; the rest as stored
        stored = released.tuned[name.replace(".", "__")]
        expected = (stored - 0.8 * stored) * (1 / 0.2) if name == "teacher.text.ctx" else stored
        assert torch.equal(tensors[name], expected), name


def test_compat_and_new_mix_values_are_checked(clip) -> None:
    with pytest.raises(
        ConfigError, match=r"plugins\.dpc\.compat: 'official' is not allowed; choose one of default, released"
    ):
        build_dpc(clip, "coop", compat="official")
    with pytest.raises(ConfigError, match=r"plugins\.dpc\.compat: released .* weighting 'mixed'"):
        build_dpc(clip, "coop", compat="released", weighting="mixed")
    with pytest.raises(ConfigError, match=r"plugins\.dpc\.compat.*'official'.*released"):
        run_config(compat="official")
    with pytest.raises(ConfigError, match=r"plugins\.dpc\.new_mix: 'vision\.\*' matches no tuned tensor of coop"):
        build_dpc(clip, "coop", new_mix=["vision.*"])


def test_new_mix_keeps_the_other_tensors_at_stage1_on_new_classes(clip) -> None:
    """The official PromptKD+DPC mixes only the student's prompts for new classes and restores the projector
    (weights and BatchNorm statistics) of stage 1: `new_mix: [vision.*]`."""
    dpc = build_dpc(clip, "promptkd", omega_b=0.5, omega_n=0.5, new_mix=["vision.*"])
    train_steps(dpc)
    stage1, tuned, new = dpc.stage1_tensors(), dpc.tuned_tensors(), dpc.new_tensors()
    assert {n for n in new if n.startswith("projector.")} and {n for n in new if n.startswith("vision.")}
    for name, tensor in new.items():
        if name.startswith("vision."):
            torch.testing.assert_close(tensor, torch.lerp(stage1[name], tuned[name], 0.5))
            assert not torch.equal(tensor, stage1[name]), name
        else:
            assert torch.equal(tensor, stage1[name]), name
    batch = make_batch([0, 1, 2])
    reference = build_stage1(clip, "promptkd", OTHER)
    reference.load_trainable_state(new)
    dpc.set_classnames(OTHER)
    dpc.set_eval_subset("new")
    assert torch.equal(logits(dpc, batch), logits(reference, batch))


# -- configuration, saving, stage-1 loading --------------------------------------------------------------------


def test_bad_configurations_are_refused(clip) -> None:
    with pytest.raises(ConfigError, match="omega_b"):
        build_dpc(clip, "coop", omega_b=0.0)
    with pytest.raises(ConfigError, match="also_tune"):
        build_dpc(clip, "promptkd", also_tune=["teacher.text.*"])  # a zero-shot teacher has no prompts
    cocoop = stage1_learner(clip, CLASSES, TEMPLATE, "cocoop", {})
    with pytest.raises(ValueError, match="per-image"):
        DPC(cocoop, DPCConfig())


def test_eval_subset_is_explicit_and_reaches_through_other_plugins(clip) -> None:
    dpc = build_dpc(clip, "coop")
    assert dpc.eval_subset == "base"
    outer = PluginModel(dpc, DPCConfig())
    outer.set_eval_subset("new")
    assert dpc.eval_subset == "new"
    with pytest.raises(ValueError, match="base"):
        dpc.set_eval_subset("novel")  # type: ignore[arg-type]


def test_saved_prompt_holds_stage1_and_predicts_without_the_stage1_folder(clip, tmp_path: Path) -> None:
    dpc = build_dpc(clip, "promptkd", omega_b=0.5)
    train_steps(dpc)
    batch = make_batch([0, 1, 2])
    base = logits(dpc, batch)
    dpc.save_pretrained(tmp_path / "prompt")
    torch.manual_seed(99)
    loaded = PromptModel.from_pretrained(clip, tmp_path / "prompt")
    assert isinstance(loaded, DPC)
    assert torch.equal(logits(loaded, batch), base)
    loaded.set_classnames(OTHER)
    loaded.set_eval_subset("new")
    assert torch.equal(logits(loaded, batch), logits(build_stage1(clip, "promptkd", OTHER), batch))


def test_stage1_prompt_is_loaded_from_its_run_folder(clip, tmp_path: Path) -> None:
    stage1 = build_stage1(clip, "maple")
    stage1.save_pretrained(tmp_path / "run" / "prompt")
    fresh = build_stage1(clip, "maple")
    with torch.no_grad():
        for tensor in fresh.trainable_parameters().values():
            tensor.normal_()
    context = PluginContext(splits=picture_splits(CLASSES), stage1_dir=tmp_path / "run")
    dpc = DPC(fresh, DPCConfig(), context)
    for name, tensor in stage1.trainable_parameters().items():
        assert torch.equal(dpc.tuned_tensors()[name], tensor) and torch.equal(dpc.stage1_tensors()[name], tensor)
    other = stage1_learner(clip, CLASSES, TEMPLATE, "maple", {"depth": 1})
    with pytest.raises(ConfigError, match="depth"):
        DPC(other, DPCConfig(), context)
    coop = stage1_learner(clip, CLASSES, TEMPLATE, "coop", {"n_ctx": 2})
    with pytest.raises(ConfigError, match="maple prompt"):
        DPC(coop, DPCConfig(), context)
    with pytest.raises(ConfigError, match="no stage-1 prompt"):
        DPC(coop, DPCConfig(), PluginContext(stage1_dir=tmp_path / "missing"))


def run_config(**dpc: Any) -> Any:
    return build_run_config(
        {
            "method": "coop+dpc",
            "method_cfg": {"n_ctx": 4},
            "plugins": {"dpc": dpc},
            "model": {"arch": "tiny-vit", "weights": "random"},
            "data": {"dataset": "synthetic_shapes", "shots": 2, "batch_size": 4},
            "optim": {"epochs": 20, "lr": 0.002},
            "seed": 3,
        }
    )


def test_stage1_config_is_this_run_without_dpc_plus_its_overrides(tmp_path: Path) -> None:
    plan = DPC.needs(DPCConfig(), run_config(stage1_opts={"optim.epochs": 5, "data": {"batch_size": 8}})).stage1
    assert plan is not None
    cfg1, recipe = plan.config, plan.recipe
    assert cfg1.method == "coop" and cfg1.plugins == {} and recipe is None
    assert (cfg1.optim.epochs, cfg1.data.batch_size, cfg1.seed, cfg1.data.dataset) == (5, 8, 3, "synthetic_shapes")
    recipe_file = tmp_path / "coop_stage1.yaml"
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "method": "coop",
                "method_cfg": {"n_ctx": 4},
                "data": {"batch_size": 32, "dataset": "imagenet"},
                "optim": {"epochs": 50},
            }
        )
    )
    plan = run_needs(run_config(stage1_recipe=str(recipe_file))).stage1
    assert plan is not None
    cfg1, recipe = plan.config, plan.recipe
    assert recipe == "coop_stage1" and cfg1.optim.epochs == 50 and cfg1.data.batch_size == 32
    assert cfg1.data.dataset == "synthetic_shapes" and cfg1.model.arch == "tiny-vit" and cfg1.seed == 3
    with pytest.raises(ConfigError, match="n_ctx"):
        run_needs(run_config(stage1_opts={"method_cfg.n_ctx": 8}))
    assert run_needs(run_config(stage1_prompt=str(tmp_path))).stage1 is None


def test_stage1_run_folder_is_the_plain_run_of_the_inner_method(tmp_path: Path) -> None:
    from promptclip.methods.base import StagePlan
    from promptclip.protocols.spec import EvalTarget, RunSpec
    from promptclip.runs.stages import stage_spec

    def spec(run_dir: Path, runs_root: Path | None) -> RunSpec:
        target = EvalTarget("base", "ds", "base")
        return RunSpec("base2new", "ds", "coop+dpc", "r", 1, 16, "base", (target,), run_dir, runs_root=runs_root)

    stage1_cfg = DPC.needs(DPCConfig(), run_config()).stage1
    assert stage1_cfg is not None
    plan = StagePlan(stage1_cfg.config, "s1")
    runs = tmp_path / "runs"
    laid_out = spec(runs / "base2new" / "ds" / "coop+dpc" / "r" / "shots16" / "seed1", runs)
    stage, _ = stage_spec(laid_out, plan)
    assert stage.run_dir == runs / "base2new" / "ds" / "coop" / "s1" / "shots16" / "seed1" and stage.method == "coop"
    by_hand, _ = stage_spec(spec(tmp_path / "mine", None), plan)
    assert by_hand.run_dir == tmp_path / "mine" / "stage1" and by_hand.runs_root is None


# -- both stages through the command line ----------------------------------------------------------------------


def test_one_command_trains_stage1_then_dpc_and_reuses_stage1(tmp_path: Path) -> None:
    from promptclip.cli import main

    recipe = {
        "method": "coop+dpc",
        "method_cfg": {"n_ctx": 4, "ctx_init": "a photo of a"},
        "plugins": {"dpc": {"top_k": 3, "omega_b": 0.5, "stage1_opts": {"optim.epochs": 2}}},
        "model": {"arch": "tiny-vit", "weights": "random", "precision": "fp32"},
        "data": {
            "dataset": "synthetic_shapes",
            "shots": 2,
            "batch_size": 4,
            "eval_batch_size": 50,
            "options": {"train_per_class": 2, "val_per_class": 1, "test_per_class": 4, "image_size": 32},
        },
        "optim": {"lr": 0.05, "epochs": 1},
        "device": "cpu",
    }
    recipe_path = tmp_path / "tiny_dpc.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    argv = ["run", "base2new", "--recipe", str(recipe_path), "--seeds", "1", "--runs-dir", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    leaf = Path("shots2") / "seed1"
    stage1_dir = tmp_path / "base2new" / "synthetic_shapes" / "coop" / "tiny_dpc" / leaf
    stage2_dir = tmp_path / "base2new" / "synthetic_shapes" / "coop+dpc" / "tiny_dpc" / leaf
    stage1 = json.loads((stage1_dir / "results.json").read_text())
    stage2 = json.loads((stage2_dir / "results.json").read_text())
    assert stage1["method"] == "coop" and stage1["train"]["epochs"] == 2
    assert stage2["method"] == "coop+dpc" and stage2["train"]["stage1_run"] == str(stage1_dir)
    assert "dpc" in json.loads((stage2_dir / "metrics.jsonl").read_text().splitlines()[0])
    # New classes: stage 1's predictions exactly (omega_n = 0), counted the same.
    assert stage2["evaluations"]["new"]["correct"] == stage1["evaluations"]["new"]["correct"]
    assert sum(stage2["evaluations"]["base"]["total"]) == sum(stage1["evaluations"]["base"]["total"]) == 20
    # Stage 1 is reused, not trained again, when stage 2 runs again (an interrupted stage 2 needs --resume).
    stamp = (stage1_dir / "results.json").stat().st_mtime_ns
    (stage2_dir / "results.json").unlink()
    assert main(argv) == 2
    assert main([*argv, "--resume"]) == 0
    assert (stage1_dir / "results.json").stat().st_mtime_ns == stamp
    assert "stage 1 (coop, tiny_dpc): reusing" in (stage2_dir / "log.txt").read_text()


# -- the official recipes ----------------------------------------------------------------------------------------

OFFICIAL = {  # recipe: (batch, top-K, lr, epochs, omega_b)
    "coop_dpc/vit_b16_ep20": (4, 8, 0.002, 20, 0.5),
    "coop_dpc/vit_b16_ep10_lr35": (4, 8, 0.0035, 10, 0.5),
    "coop_dpc/vit_b16_ep20_bs8top4": (8, 4, 0.002, 20, 0.2),
    "coop_dpc/vit_b16_ep20_bs16top2": (16, 2, 0.002, 20, 0.5),
    "coop_dpc/vit_b16_ep10_bs2top2": (2, 2, 0.002, 10, 0.5),
    "maple_dpc/vit_b16_ep20": (4, 8, 0.002, 20, 0.2),
    "promptsrc_dpc/vit_b16_ep20": (4, 8, 0.002, 20, 0.2),
    "promptkd_dpc/vit_b16_ep20_batch4": (4, 8, 0.002, 20, 0.2),
    "promptkd_dpc/vit_b16_ep20_batch2_top8": (2, 8, 0.002, 20, 0.2),
    "promptkd_dpc/vit_b16_ep20_batch2_top2": (2, 2, 0.002, 20, 0.2),
    "promptkd_dpc/vit_b16_ep10_batch4": (4, 8, 0.0035, 10, 0.2),
    "promptkd_dpc/vit_b16_ep10_batch4_lr26_cross_datasets": (4, 8, 0.0026, 10, 0.2),
}


def test_official_recipes_hold_the_published_settings_and_a_matching_stage1() -> None:
    from promptclip.config import load_run_config
    from promptclip.recipes import resolve_recipe

    found = {
        f"{p.parent.name}/{p.stem}" for p in Path(resolve_recipe("coop_dpc/vit_b16_ep20")).parents[1].glob("*_dpc/*")
    }
    assert set(OFFICIAL) <= found
    for name, (batch, top_k, lr, epochs, omega_b) in OFFICIAL.items():
        cfg = load_run_config(resolve_recipe(name))
        dpc = cfg.plugins["dpc"]
        assert (cfg.data.batch_size, dpc.top_k, cfg.optim.lr, cfg.optim.epochs, dpc.omega_b) == (
            batch,
            top_k,
            lr,
            epochs,
            omega_b,
        ), name
        assert cfg.data.shots == 16 and cfg.optim.warmup_lr == 1e-5 and dpc.weighting == "reparam"
        assert dpc.compat == "default", name
        # The official PromptKD+DPC mixes only the student's prompts for new classes; its cross-dataset recipe
        # applies every tuned tensor as it is (omega_n 1).
        official_mix = ["vision.*"] if name.startswith("promptkd_dpc") and "cross" not in name else ["*"]
        assert dpc.new_mix == official_mix, name
        stage1 = run_needs(cfg).stage1
        assert stage1 is not None and stage1.config.method == cfg.method_name, name


def test_promptkd_text_branch_of_the_official_trainer(clip, tmp_path: Path) -> None:
    """The teacher's text prompts tuned too (also_tune), weighted alone (reparametrize), as the official
    PromptKD+DPC; new classes still get stage 1's predictions exactly."""
    teacher = stage1_learner(clip, CLASSES, TEMPLATE, "promptsrc", {"depth_text": 2, "depth_vision": 2})
    teacher.save_pretrained(tmp_path / "teacher")
    kd_cfg = {"depth_vision": 2, "teacher_arch": "", "teacher_prompt": str(tmp_path / "teacher")}
    kd: Backbone = ("promptkd", kd_cfg)
    dpc = build_dpc(clip, kd, also_tune=["teacher.text.*"], reparametrize=["teacher.text.ctx"])
    assert {"teacher.text.ctx", "teacher.text.deep.1"} <= set(dpc.tuned_names)
    assert not any(n.startswith("teacher.vision") for n in dpc.tuned_names)
    batch = make_batch([0, 1, 2])
    assert torch.equal(logits(dpc, batch), logits(build_stage1(clip, kd), batch))
    dpc.train()
    sum(dpc.loss(batch, dpc(batch)).values()).backward()  # type: ignore[union-attr]
    assert dpc.tuned["teacher__text__deep__1"].grad.abs().sum() > 0
    train_steps(dpc)
    dpc.set_classnames(OTHER)
    dpc.set_eval_subset("new")
    assert torch.equal(logits(dpc, batch), logits(build_stage1(clip, kd, OTHER), batch))
    dpc.set_eval_subset("base")
    assert not torch.equal(logits(dpc, batch), logits(build_stage1(clip, kd, OTHER), batch))


def test_a_transductive_stage1_sees_all_classes_while_dpc_trains_on_labelled_base_images(tmp_path: Path) -> None:
    from promptclip.cli import main

    recipe = {
        "method": "promptkd+dpc",
        "method_cfg": {"depth_vision": 2, "teacher_arch": ""},
        "plugins": {"dpc": {"top_k": 3, "stage1_opts": {"data.shots": 0}}},
        "model": {"arch": "tiny-vit", "weights": "random", "precision": "fp32"},
        "data": {
            "dataset": "synthetic_shapes",
            "shots": 2,
            "batch_size": 4,
            "options": {"train_per_class": 3, "val_per_class": 1, "test_per_class": 2, "image_size": 32},
        },
        "optim": {"epochs": 1},
        "device": "cpu",
    }
    recipe_path = tmp_path / "kd.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    argv = ["run", "base2new", "--recipe", str(recipe_path), "--seeds", "1", "--runs-dir", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    root = tmp_path / "base2new" / "synthetic_shapes"
    stage1_dir, stage2_dir = (
        root / "promptkd" / "kd" / "shotsall" / "seed1",
        root / "promptkd+dpc" / "kd" / "shots2" / "seed1",
    )
    stage1 = json.loads((stage1_dir / "results.json").read_text())
    stage2 = json.loads((stage2_dir / "results.json").read_text())
    assert "(all classes: 10), 30 images" in (stage1_dir / "log.txt").read_text()
    assert "(base classes: 5), 10 images" in (stage2_dir / "log.txt").read_text()
    assert stage1["transductive"] and stage2["transductive"]
    assert stage2["evaluations"]["new"]["correct"] == stage1["evaluations"]["new"]["correct"]
