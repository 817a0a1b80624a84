"""PromptKD with two tiny random CLIPs of different widths as teacher and student."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from promptclip.clip.model import CLIP
from promptclip.clip.weights import save_clip
from promptclip.io import sha256_file
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.methods.promptkd import PromptKD, PromptKDConfig, convert_official_state

NAMES = ["cat", "golden retriever", "red_sports_car", "tree"]
STUDENT_DIM, TEACHER_DIM = 24, 40


def clip_arch(kind: str) -> dict[str, Any]:
    vision_width, text_width, embed = {"student": (48, 32, STUDENT_DIM), "teacher": (64, 48, TEACHER_DIM)}[kind]
    return {
        "name": f"tiny-{kind}",
        "embed_dim": embed,
        "vision": {"image_size": 32, "width": vision_width, "layers": 2, "heads": 2, "patch_size": 8},
        "text": {"width": text_width, "heads": 2, "layers": 2},
    }


@pytest.fixture
def make_clip(tiny_clips) -> Callable[..., CLIP]:
    """make_clip(kind, seed): the student's or the teacher's tiny CLIP with the random weights of `seed`."""
    return lambda kind, seed=0: tiny_clips.seeded(clip_arch(kind), seed)


@pytest.fixture
def make_teacher(make_clip: Callable[..., CLIP]) -> Callable[..., PromptModel]:
    """make_teacher(seed): a prompted teacher (PromptSRC layout) with trained-looking prompts."""

    def build(seed: int = 1) -> PromptModel:
        return prompted_teacher(make_clip("teacher", seed), NAMES, seed)

    return build


def prompted_teacher(clip: CLIP, classnames: list[str], seed: int) -> PromptModel:
    """A PromptSRC-layout teacher on `clip` whose prompts look trained: moved off their initial values by
    noise drawn from `seed`."""
    teacher = get_prompt_model(clip, {"method": "promptsrc", "depth_text": 2, "depth_vision": 2}, classnames)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in teacher.trainable_parameters().values():
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return teacher


@pytest.fixture
def make_student(make_clip: Callable[..., CLIP], make_teacher: Callable[..., PromptModel]) -> Callable[..., PromptKD]:
    """make_student(teacher, **cfg): a PromptKD student (2 prompted layers) of `teacher` or of a new one."""

    def build(teacher: PromptModel | None = None, **cfg: Any) -> PromptKD:
        full = PromptKDConfig(**{"depth_vision": 2, **cfg})
        return PromptKD(make_clip("student"), NAMES, full, teacher=teacher if teacher is not None else make_teacher())

    return build


def make_batch(size: int = 4) -> dict[str, torch.Tensor]:
    pixels = torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return {"image": pixels, "label": torch.arange(size) % len(NAMES)}


def test_defaults_are_the_paper_recipe() -> None:
    cfg = PromptKDConfig()
    assert (cfg.n_ctx_vision, cfg.depth_vision, cfg.teacher_arch) == (4, 9, "ViT-L-14")
    assert (cfg.kd_weight, cfg.temperature, cfg.ce_weight, cfg.transductive) == (1000.0, 1.0, 0.0, True)
    assert PromptKD.transductive is True


def test_student_learns_visual_prompts_and_the_projector_to_the_teacher_width(make_student) -> None:
    student = make_student()
    shapes = {name: tuple(p.shape) for name, p in student.trainable_parameters().items()}
    assert shapes == {
        "vision.ctx": (4, 48),
        "vision.deep.1": (4, 48),
        "projector.conv1.weight": (TEACHER_DIM, STUDENT_DIM, 1, 1),
        "projector.conv1.bias": (TEACHER_DIM,),
        "projector.bn.weight": (TEACHER_DIM,),
        "projector.bn.bias": (TEACHER_DIM,),
        "projector.conv2.weight": (TEACHER_DIM, TEACHER_DIM, 1, 1),
        "projector.conv2.bias": (TEACHER_DIM,),
    }
    assert sorted(student.extra_state_buffers()) == [
        "projector.bn.num_batches_tracked",
        "projector.bn.running_mean",
        "projector.bn.running_var",
    ]
    output = student(make_batch())
    assert output.image_features.shape == (4, TEACHER_DIM)
    assert output.logits.shape == (4, len(NAMES))


def test_classifier_is_the_teachers_text_features(make_student, make_teacher) -> None:
    teacher = make_teacher()
    student = make_student(teacher)
    with torch.no_grad():
        expected = teacher.encode_classnames(student.classnames)
    assert torch.allclose(student.text_features(), expected, atol=1e-6)
    output = student(make_batch())
    scale = student.clip.logit_scale.exp()  # the student's own logit scale, as in the reference
    assert torch.allclose(output.logits, scale * output.image_features @ expected.t(), atol=1e-5)


def test_teacher_is_frozen_and_the_gradient_is_that_of_detached_teacher_outputs(make_student, make_teacher) -> None:
    teacher = make_teacher()
    student = make_student(teacher, temperature=2.0)
    student.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    data = make_batch()
    losses = student.loss(data, student(data))
    assert set(losses) == {"kd"}
    losses["kd"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.clip.parameters())
    grads = {name: p.grad.clone() for name, p in student.trainable_parameters().items()}
    assert all(g.abs().sum() > 0 for g in grads.values())

    # The same loss from independently recomputed, detached teacher outputs gives the same gradient.
    student.zero_grad()
    for module in (student.projector.bn,):
        module.reset_running_stats()
    with torch.no_grad():
        teacher_text = teacher.encode_classnames(student.classnames).detach()
        teacher_logits = (teacher.logit_scale * teacher.image_features(data["image"]) @ teacher_text.t()).detach()
    student_logits = student.logit_scale * student.image_features(data["image"]) @ teacher_text.t()
    temperature = 2.0
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.softmax(teacher_logits / temperature, dim=-1),
        reduction="sum",
    )
    (1000.0 * kl * temperature**2 / student_logits.numel()).backward()
    # Compared as one vector: conv1's bias gradient is zero up to rounding (BatchNorm cancels a bias).
    names = sorted(grads)
    recomputed = torch.cat([student.trainable_parameters()[n].grad.flatten() for n in names])
    original = torch.cat([grads[n].flatten() for n in names])
    assert (recomputed - original).norm() <= 1e-5 * original.norm()


def test_teacher_text_features_are_encoded_once_per_class_set(make_student, make_teacher) -> None:
    teacher = make_teacher()
    student = make_student(teacher)
    calls = {"count": 0}
    original = teacher.encode_classnames

    def counting(names: Any) -> torch.Tensor:
        calls["count"] += 1
        return original(names)

    teacher.encode_classnames = counting  # type: ignore[method-assign]
    student.train()
    data = make_batch()
    for _ in range(3):
        student.loss(data, student(data))
    assert calls["count"] == 1
    student.eval()
    student.set_classnames(["house", "whale"])
    student.text_features()
    assert calls["count"] == 2
    student.set_classnames(NAMES)
    student.train()
    student.text_features()
    assert calls["count"] == 2


def test_labels_are_not_used_unless_asked_for(make_student) -> None:
    student = make_student()
    data = make_batch()
    unlabelled = {"image": data["image"], "label": torch.full((4,), -100)}  # transductive: no usable labels
    losses = student.loss(unlabelled, student(unlabelled))
    assert set(losses) == {"kd"} and torch.isfinite(losses["kd"])
    with_ce = make_student(ce_weight=0.5)
    losses = with_ce.loss(data, with_ce(data))
    assert set(losses) == {"kd", "ce"}
    assert torch.allclose(losses["ce"], 0.5 * F.cross_entropy(with_ce(data).logits, data["label"]))


def test_batch_norm_statistics_are_trained_state(make_student) -> None:
    student = make_student()
    before = {k: v.clone() for k, v in student.extra_state_buffers().items()}
    student.train()
    data = make_batch()
    student.loss(data, student(data))["kd"].backward()
    moved = student.extra_state_buffers()
    assert not torch.equal(moved["projector.bn.running_mean"], before["projector.bn.running_mean"])
    assert int(moved["projector.bn.num_batches_tracked"]) == 1
    # A forward without autograd, or of a single image, never updates them (and gives the eval output).
    with torch.no_grad():
        train_mode = student(data).logits
    single = student({"image": data["image"][:1]})
    student.eval()
    with torch.no_grad():
        assert torch.allclose(student(data).logits, train_mode, atol=1e-6)
        assert torch.allclose(student({"image": data["image"][:1]}).logits, single.logits, atol=1e-6)
    assert int(student.extra_state_buffers()["projector.bn.num_batches_tracked"]) == 1


def test_functional_call_substitutes_the_student_tensors(make_student) -> None:
    student = make_student()
    generator = torch.Generator().manual_seed(4)
    substitutes = {
        name: p.detach() + 0.2 * torch.randn(p.shape, generator=generator)
        for name, p in student.trainable_parameters().items()
    }
    data = make_batch()
    student.eval()
    with torch.enable_grad():
        substituted = functional_call(student, substitutes, (data,)).logits
    reference = copy.deepcopy(student)
    with torch.no_grad():
        for name, param in reference.trainable_parameters().items():
            param.copy_(substitutes[name])
        assert torch.allclose(substituted, reference(data).logits, atol=1e-5)
        assert not torch.allclose(substituted, student(data).logits, atol=1e-4)


def test_teacher_loads_from_a_saved_prompt_and_round_trips(make_teacher, make_clip, tmp_path: Path) -> None:
    teacher = make_teacher()
    teacher_weights = save_clip(teacher.clip, tmp_path / "teacher.safetensors")
    teacher.clip.weights_sha256 = sha256_file(teacher_weights)
    teacher.save_pretrained(tmp_path / "teacher_prompt")
    cfg = {
        "method": "promptkd",
        "depth_vision": 2,
        "teacher_arch": str(teacher_weights),
        "teacher_prompt": str(tmp_path / "teacher_prompt"),
    }
    student_clip = make_clip("student")
    student = get_prompt_model(student_clip, cfg, NAMES)
    assert isinstance(student, PromptKD) and type(student.teacher).__name__ == "PromptSRC"
    with torch.no_grad():
        assert torch.allclose(student.text_features(), teacher.encode_classnames(student.classnames), atol=1e-6)
    student.train()
    data = make_batch()
    student.loss(data, student(data))["kd"].backward()
    student.eval()
    with torch.no_grad():
        expected = student(data).logits
    student.save_pretrained(tmp_path / "student")
    loaded = PromptModel.from_pretrained(student_clip, tmp_path / "student")
    with torch.no_grad():
        assert torch.equal(loaded(data).logits, expected)


def test_mismatched_image_sizes_are_refused(make_student, tiny_clips) -> None:
    arch = {
        "name": "tiny-64px",
        "embed_dim": TEACHER_DIM,
        "vision": {"image_size": 64, "width": 64, "layers": 2, "heads": 2, "patch_size": 16},
        "text": {"width": 48, "heads": 2, "layers": 2},
    }
    teacher = get_prompt_model(tiny_clips(arch), {"method": "zeroshot"}, NAMES)
    with pytest.raises(ValueError, match="px"):
        make_student(teacher)


def test_student_of_the_original_trainer_converts_to_ours(make_student) -> None:
    student = make_student()
    generator = torch.Generator().manual_seed(6)
    projector = {
        "0.weight": torch.randn(TEACHER_DIM, STUDENT_DIM, 1, 1, generator=generator),
        "0.bias": torch.randn(TEACHER_DIM, generator=generator),
        "1.weight": torch.rand(TEACHER_DIM, generator=generator),
        "1.bias": torch.randn(TEACHER_DIM, generator=generator),
        "1.running_mean": torch.randn(TEACHER_DIM, generator=generator),
        "1.running_var": torch.rand(TEACHER_DIM, generator=generator) + 0.5,
        "1.num_batches_tracked": torch.tensor(1234),
        "3.weight": torch.randn(TEACHER_DIM, TEACHER_DIM, 1, 1, generator=generator),
        "3.bias": torch.randn(TEACHER_DIM, generator=generator),
    }
    original = {f"VPT_image_trans.conv1.{k}": v.half() if v.is_floating_point() else v for k, v in projector.items()}
    original["image_encoder.VPT"] = torch.randn(4, 48, generator=generator).half()
    original["image_encoder.transformer.resblocks.1.VPT_shallow"] = torch.randn(4, 48, generator=generator)
    original["image_encoder.conv1.weight"] = torch.zeros(48, 3, 8, 8)
    original["logit_scale"] = torch.tensor(4.6)
    student.load_trainable_state(convert_official_state(original))
    state = student.trainable_state()
    assert torch.equal(state["projector.bn.running_var"], original["VPT_image_trans.conv1.1.running_var"].float())
    assert int(state["projector.bn.num_batches_tracked"]) == 1234
    assert torch.equal(state["projector.conv2.weight"], original["VPT_image_trans.conv1.3.weight"].float())
    assert torch.equal(state["vision.ctx"], original["image_encoder.VPT"].float())
