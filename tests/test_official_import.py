"""Prompts of every method's original trainer import into promptclip learners: each importer's key map,
checked on files written the way the original trainers write them (`official_files`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyClips
from official_files import (
    frozen_image_encoder,
    ivlp_state,
    maple_file,
    promptkd_student_state,
    randomised,
    tower_prompts,
    write_dassl_file,
)

from promptclip.cli import main
from promptclip.clip.model import CLIP
from promptclip.clip.weights import save_clip
from promptclip.methods.base import PromptModel
from promptclip.methods.coop import CoOp, CoOpConfig
from promptclip.methods.ivlp import IVLP, DeepLanguageConfig, DeepLanguagePrompting, IVLPConfig, VPTConfig, VPTDeep
from promptclip.methods.maple import MaPLe, MaPLeConfig
from promptclip.methods.official import OfficialCheckpointError
from promptclip.methods.promptkd import PromptKD, PromptKDConfig, load_teacher_clip
from promptclip.methods.promptsrc import PromptSRC, PromptSRCConfig
from promptclip.official_import import ImportSource, import_official, official_layout

TRAIN_CLASSES = ["cat", "dog", "car", "tree"]
CLASSES = ["airplane", "blue whale", "house"]
# Text 32 wide, vision 48, embedding 24, three layers: a tensor put in the wrong tower cannot fit.
ARCH = TinyClips.two_width(layers=3, name="tiny-import")
TEACHER = {"teacher_arch": "tiny-vit", "teacher_weights": "random"}  # embedding 32: the projector maps 24 -> 32


@pytest.fixture(scope="module")
def clip(tiny_clips: TinyClips) -> CLIP:
    return tiny_clips.seeded(ARCH, 0)


def images(clip: CLIP, count: int = 3) -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(count, 3, clip.image_size, clip.image_size)


def as_saved(learner: PromptModel, file_state: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    """Give `learner` the values the file holds (fp16 where the trainer stores fp16), as our names say."""
    with torch.no_grad():
        for ours, theirs in names.items():
            target = learner.get_parameter(ours) if "running" not in ours else learner.get_buffer(ours)
            target.copy_(file_state[theirs].to(target.dtype))
    learner.invalidate_cache()


def same_logits(imported: PromptModel, expected: PromptModel, clip: CLIP) -> None:
    """The imported learner classifies like the learner the file was written from (with the file's values)."""
    imported.eval()
    expected.eval()
    batch = {"image": images(clip)}
    with torch.no_grad():
        got, want = imported(batch).logits, expected(batch).logits
    # One computation on equal tensors: equal up to the summation order of the batched matrix products.
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def source(clip: CLIP, path: Path, names: list[str] = CLASSES, **extra: Any) -> ImportSource:
    return ImportSource(path=path, clip=clip, classnames=names, **extra)


# --------------------------------------------------------------------------------------------------------
# MaPLe and DAPT
# --------------------------------------------------------------------------------------------------------


def maple_learner(clip: CLIP, depth: int = 3) -> MaPLe:
    learner = MaPLe(clip, TRAIN_CLASSES, MaPLeConfig(n_ctx=2, depth=depth))
    randomised(learner)
    return learner


def maple_names(depth: int) -> dict[str, str]:
    names = {"text.ctx": "prompt_learner.ctx"}
    names.update({"couplings.0.weight": "prompt_learner.proj.weight", "couplings.0.bias": "prompt_learner.proj.bias"})
    for layer in range(1, depth):
        names[f"text.deep.{layer}"] = f"prompt_learner.compound_prompts_text.{layer - 1}"
        for part in ("weight", "bias"):
            names[f"couplings.{layer}.{part}"] = f"prompt_learner.compound_prompt_projections.{layer - 1}.{part}"
    return names


@pytest.mark.parametrize("method", ["maple", "maple+dapt"])
def test_maple_and_dapt_files(clip: CLIP, tmp_path: Path, method: str) -> None:
    original = maple_learner(clip)
    path = maple_file(original, TRAIN_CLASSES, tmp_path / "MultiModalPromptLearner" / "model-best.pth.tar")
    file_state = torch.load(path, weights_only=False)["state_dict"]
    assert official_layout(file_state) == "maple"
    imported = import_official(method, source(clip, tmp_path))  # a run folder: its best file
    inner = imported.inner if method == "maple+dapt" else imported
    assert type(inner) is MaPLe and inner.cfg.depth == 3 and inner.cfg.n_ctx == 2
    assert inner.cfg.ctx_init == "a photo of a"
    names = maple_names(3)
    for ours, theirs in names.items():
        assert torch.equal(inner.get_parameter(ours), file_state[theirs].float()), ours
    if method == "maple+dapt":
        assert imported.describe()["method"] == "maple" and list(imported.describe()["plugins"]) == ["dapt"]
    expected = MaPLe(clip, CLASSES, MaPLeConfig(n_ctx=2, depth=3))
    as_saved(expected, file_state, names)
    same_logits(imported, expected, clip)


def test_a_maple_file_checks_the_words_after_the_context(clip: CLIP, tmp_path: Path) -> None:
    path = maple_file(maple_learner(clip), TRAIN_CLASSES, tmp_path / "model.pth.tar-5")
    with pytest.raises(OfficialCheckpointError) as info:
        import_official("maple", source(clip, path, ctx_init="a photo of the"))
    message = str(info.value)
    assert str(path) in message and "prompt_learner.token_suffix" in message and "--ctx-init" in message


# --------------------------------------------------------------------------------------------------------
# IVLP, VPT, deep language prompting, PromptSRC
# --------------------------------------------------------------------------------------------------------


def deep_names(learner: Any) -> dict[str, str]:
    names: dict[str, str] = {}
    for tower, encoder, first in (
        ("text", "text_encoder", "prompt_learner.ctx"),
        ("vision", "image_encoder", "image_encoder.VPT"),
    ):
        prompts = getattr(learner, tower, None)
        if prompts is None:
            continue
        names[f"{tower}.ctx"] = first
        for layer in range(1, prompts.depth):
            names[f"{tower}.deep.{layer}"] = f"{encoder}.transformer.resblocks.{layer}.VPT_shallow"
    return names


DEEP_CASES = {
    "ivlp": (IVLP, IVLPConfig(n_ctx_text=2, n_ctx_vision=3, depth_text=3, depth_vision=2)),
    "promptsrc": (PromptSRC, PromptSRCConfig(n_ctx_text=4, n_ctx_vision=2, depth_text=2, depth_vision=3)),
    "vpt": (VPTDeep, VPTConfig(n_ctx=3, depth=3)),
    "deep_lang": (DeepLanguagePrompting, DeepLanguageConfig(n_ctx=2, depth=3)),
}


@pytest.mark.parametrize("method", sorted(DEEP_CASES))
def test_deep_prompt_files(clip: CLIP, tmp_path: Path, method: str) -> None:
    learner_cls, cfg = DEEP_CASES[method]
    original = learner_cls(clip, TRAIN_CLASSES, cfg)
    randomised(original)
    state = ivlp_state(original, TRAIN_CLASSES)
    if method == "promptsrc":  # PromptSRC's frozen copy of the image encoder sits in its prompt learner
        state.update(frozen_image_encoder(clip, "prompt_learner.ZS_image_encoder."))
    folder = "prompt_learner" if method == "vpt" else "VLPromptLearner"
    write_dassl_file(tmp_path / folder / "model.pth.tar-5", state, epoch=5)
    write_dassl_file(tmp_path / folder / "model.pth.tar-20", state, epoch=20)
    imported = import_official(method, source(clip, tmp_path, epoch=20))
    assert type(imported) is learner_cls and imported.cfg == cfg
    names = deep_names(original)
    for ours, theirs in names.items():
        assert torch.equal(imported.get_parameter(ours), state[theirs].float()), ours
    expected = learner_cls(clip, CLASSES, cfg)
    as_saved(expected, state, names)
    same_logits(imported, expected, clip)


@pytest.mark.parametrize(
    ("written", "method", "fix"),
    [
        ("vpt", "ivlp", "--method vpt"),
        ("ivlp", "vpt", "--method ivlp or promptsrc"),
        ("deep_lang", "promptsrc", "deep_lang"),
    ],
)
def test_a_deep_file_of_other_towers_is_refused(
    clip: CLIP, tmp_path: Path, written: str, method: str, fix: str
) -> None:
    learner_cls, cfg = DEEP_CASES[written]
    path = write_dassl_file(
        tmp_path / "model.pth.tar-1", ivlp_state(learner_cls(clip, TRAIN_CLASSES, cfg), TRAIN_CLASSES)
    )
    with pytest.raises(OfficialCheckpointError, match=f"{path}: holds .*{fix}"):
        import_official(method, source(clip, path))


# --------------------------------------------------------------------------------------------------------
# PromptKD: the student and its teacher
# --------------------------------------------------------------------------------------------------------


def teacher_file(tmp_path: Path) -> tuple[Path, PromptSRC]:
    """The teacher as PromptKD publishes it: a PromptSRC file (`VLPromptLearner/model-best.pth.tar`)."""
    teacher_clip = load_teacher_clip("tiny-vit", "random")
    teacher = PromptSRC(
        teacher_clip, TRAIN_CLASSES, PromptSRCConfig(n_ctx_text=2, n_ctx_vision=2, depth_text=2, depth_vision=2)
    )
    randomised(teacher, seed=2)
    path = write_dassl_file(
        tmp_path / "teacher_model" / "VLPromptLearner" / "model-best.pth.tar", ivlp_state(teacher, TRAIN_CLASSES)
    )
    return path, teacher


def student(clip: CLIP, teacher_dir: Path) -> PromptKD:
    cfg = PromptKDConfig(n_ctx_vision=2, depth_vision=3, teacher_prompt=str(teacher_dir), **TEACHER)
    learner = PromptKD(clip, TRAIN_CLASSES, cfg)
    randomised(learner, seed=3)
    return learner


def student_names(learner: PromptKD) -> dict[str, str]:
    names = {k: v for k, v in deep_names(learner).items() if k.startswith("vision")}
    for ours, index in (("conv1", "0"), ("bn", "1"), ("conv2", "3")):
        for part in ("weight", "bias", *(("running_mean", "running_var") if ours == "bn" else ())):
            names[f"projector.{ours}.{part}"] = f"VPT_image_trans.conv1.{index}.{part}"
    return names


def test_promptkd_student_and_teacher(clip: CLIP, tmp_path: Path) -> None:
    teacher_path, teacher = teacher_file(tmp_path)
    teacher.save_pretrained(tmp_path / "reference_teacher")
    original = student(clip, tmp_path / "reference_teacher")
    state = promptkd_student_state(original)
    path = write_dassl_file(tmp_path / "student" / "VLPromptLearner" / "model-best.pth.tar", state)
    out = tmp_path / "out"
    imported = import_official("promptkd", source(clip, path, teacher=teacher_path, out=out, **TEACHER))
    assert isinstance(imported, PromptKD) and imported.cfg.teacher_prompt == str((out / "teacher").resolve())
    # The teacher: its PromptSRC prompts, imported into out/teacher.
    for ours, theirs in deep_names(teacher).items():
        assert torch.equal(imported.teacher.get_parameter(ours), ivlp_state(teacher, TRAIN_CLASSES)[theirs].float())
    # The student: vision prompts and projector, BatchNorm statistics and its step counter included.
    names = student_names(original)
    for ours, theirs in names.items():
        assert torch.equal(imported.trainable_state()[ours], state[theirs].float()), ours
    assert int(imported.trainable_state()["projector.bn.num_batches_tracked"]) == 40
    expected = PromptKD(
        clip, CLASSES, PromptKDConfig(n_ctx_vision=2, depth_vision=3, teacher_prompt=str(out / "teacher"), **TEACHER)
    )
    as_saved(expected, state, names)
    same_logits(imported, expected, clip)


def test_a_student_needs_its_teacher(clip: CLIP, tmp_path: Path) -> None:
    _, teacher = teacher_file(tmp_path)
    teacher.save_pretrained(tmp_path / "t")
    path = write_dassl_file(tmp_path / "model-best.pth.tar", promptkd_student_state(student(clip, tmp_path / "t")))
    with pytest.raises(OfficialCheckpointError, match=f"{path}: a PromptKD student needs its teacher; pass --teacher"):
        import_official("promptkd", source(clip, path))
    imported = import_official("promptkd", source(clip, path, teacher=tmp_path / "t", **TEACHER))  # a prompt folder
    assert imported.cfg.teacher_prompt == str((tmp_path / "t").resolve())


# --------------------------------------------------------------------------------------------------------
# DPC: the tuned prompt and the stage-1 prompt
# --------------------------------------------------------------------------------------------------------


def coop_file(learner: CoOp, path: Path) -> Path:
    """CoOp's and StackSPLE_CoOp's prompt learner: `ctx` (fp16) and the class-name buffers."""
    count, n_ctx, width = len(TRAIN_CLASSES), learner.cfg.n_ctx, learner.clip.config.text.width
    state = {
        "ctx": learner.ctx.detach().half(),
        "token_prefix": torch.zeros(count, 1, width).half(),
        "token_suffix": torch.zeros(count, learner.clip.context_length - 1 - n_ctx, width).half(),
    }
    return write_dassl_file(path, state)


def test_coop_dpc_files(clip: CLIP, tmp_path: Path) -> None:
    stage1, tuned = (CoOp(clip, TRAIN_CLASSES, CoOpConfig(n_ctx=4, ctx_init="")) for _ in range(2))
    randomised(stage1, seed=4), randomised(tuned, seed=5)
    coop_file(stage1, tmp_path / "stage1" / "prompt_learner" / "model.pth.tar-50")
    path = coop_file(tuned, tmp_path / "dpc" / "prompt_learner" / "model.pth.tar-20")
    with pytest.raises(OfficialCheckpointError, match=f"{path}: .*pass --stage1"):
        import_official("coop+dpc", source(clip, path))
    imported = import_official("coop+dpc", source(clip, path, stage1=tmp_path / "stage1"))
    theta, p = tuned.ctx.detach().half().float(), stage1.ctx.detach().half().float()
    assert torch.equal(imported.tuned_tensors()["ctx"], theta) and torch.equal(imported.stage1_tensors()["ctx"], p)
    # Base classes with the stored tensor, new classes with stage 1 (the released code's evaluation).
    for subset, ctx in (("base", theta), ("new", p)):
        expected = CoOp(clip, CLASSES, CoOpConfig(n_ctx=4, ctx_init=""))
        with torch.no_grad():
            expected.ctx.copy_(ctx)
        imported.set_classnames(CLASSES)
        imported.set_eval_subset(subset)  # type: ignore[arg-type]
        same_logits(imported, expected, clip)


def test_promptkd_dpc_files(clip: CLIP, tmp_path: Path) -> None:
    teacher_path, teacher = teacher_file(tmp_path)
    teacher.save_pretrained(tmp_path / "reference_teacher")
    stage1, tuned = student(clip, tmp_path / "reference_teacher"), student(clip, tmp_path / "reference_teacher")
    randomised(tuned, seed=6)
    write_dassl_file(tmp_path / "stage1" / "VLPromptLearner" / "model-best.pth.tar", promptkd_student_state(stage1))
    # StackSPLE_PromptKD: the student's tuned tensors and the teacher's text branch, also under the prompt learner.
    text = PromptSRC(load_teacher_clip("tiny-vit", "random"), TRAIN_CLASSES, teacher.cfg)
    randomised(text, seed=7)
    state = promptkd_student_state(tuned)
    state.update(tower_prompts(text.text, "text_encoder", "prompt_learner.ctx"))
    deep = {k: v for k, v in tower_prompts(text.text, "text_encoder", "prompt_learner.ctx").items() if "VPT" in k}
    state.update({f"prompt_learner.{k}": v for k, v in deep.items()})
    path = write_dassl_file(tmp_path / "dpc" / "VLPromptLearner" / "model-best.pth.tar", state)
    assert official_layout(state) == "promptkd+dpc"
    imported = import_official(
        "promptkd+dpc",
        source(clip, path, stage1=tmp_path / "stage1", teacher=teacher_path, out=tmp_path / "out", **TEACHER),
    )
    tuned_tensors, stage1_tensors = imported.tuned_tensors(), imported.stage1_tensors()
    assert torch.equal(tuned_tensors["teacher.text.ctx"], state["prompt_learner.ctx"].float())
    assert torch.equal(tuned_tensors["teacher.text.deep.1"], state["text_encoder.transformer.resblocks.1.VPT_shallow"])
    assert torch.equal(stage1_tensors["teacher.text.ctx"], teacher.text.ctx.detach().half().float())
    for ours, theirs in student_names(stage1).items():
        assert torch.equal(tuned_tensors[ours].float(), state[theirs].float()), ours
        assert torch.equal(stage1_tensors[ours].float(), promptkd_student_state(stage1)[theirs].float()), ours


# --------------------------------------------------------------------------------------------------------
# Refusals: the file, the key and the fix
# --------------------------------------------------------------------------------------------------------


def test_wrong_trainer_missing_and_misshapen_keys(clip: CLIP, tiny_clip: CLIP, tmp_path: Path) -> None:
    original = maple_learner(clip, depth=2)  # tiny-vit, the backbone of the wrong width, has 2 layers
    path = maple_file(original, TRAIN_CLASSES, tmp_path / "model.pth.tar-5")
    state = torch.load(path, weights_only=False)["state_dict"]
    with pytest.raises(OfficialCheckpointError, match=f"{path}: holds a MaPLe or DAPT checkpoint.*--method maple"):
        import_official("promptsrc", source(clip, path))
    with pytest.raises(
        OfficialCheckpointError, match=r"prompt_learner\.ctx has shape \(2, 32\).*expects \(2, 64\).*--arch"
    ):
        import_official("maple", source(tiny_clip, path, ctx_init=""))
    without_ctx = write_dassl_file(
        tmp_path / "a" / "model.pth.tar-1", {k: v for k, v in state.items() if k != "prompt_learner.ctx"}
    )
    with pytest.raises(OfficialCheckpointError, match=f"{without_ctx}: .*prompt_learner.ctx missing"):
        import_official("maple", source(clip, without_ctx))
    key = "prompt_learner.compound_prompt_projections.0.weight"
    incomplete = write_dassl_file(tmp_path / "b" / "model.pth.tar-1", {k: v for k, v in state.items() if k != key})
    with pytest.raises(OfficialCheckpointError, match=rf"{incomplete}: no tensor for couplings\.1\.weight"):
        import_official("maple", source(clip, incomplete))
    with pytest.raises(OfficialCheckpointError, match=r"--method 'lp'"):
        import_official("lp", source(clip, path))


# --------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------


def test_import_command_writes_a_prompt_folder_that_eval_loads(clip: CLIP, tmp_path: Path, capsys) -> None:
    weights = save_clip(clip, tmp_path / "tiny-import.safetensors")
    original = maple_learner(clip)
    path = maple_file(original, TRAIN_CLASSES, tmp_path / "run" / "MultiModalPromptLearner" / "model.pth.tar-5")
    out = tmp_path / "imported"
    argv = ["import", "--method", "maple", str(tmp_path / "run"), "--out", str(out), "--classes", "cat,dog,car,tree"]
    assert main([*argv, "--arch", str(weights)]) == 0, capsys.readouterr().err
    assert f"promptclip eval --prompt {out}" in capsys.readouterr().out
    loaded = PromptModel.from_pretrained(clip, out)
    file_state = torch.load(path, weights_only=False)["state_dict"]
    assert torch.equal(loaded.get_parameter("text.ctx"), file_state["prompt_learner.ctx"].float())
    assert json.loads((out / "prompt_config.json").read_text())["backbone"]["arch"] == "tiny-import"
    assert main([*argv, "--arch", str(weights)]) == 2  # never over an existing prompt
    assert "exists and is not an empty folder" in capsys.readouterr().err
    counts = tmp_path / "counts.json"
    eval_argv = ["eval", "--prompt", str(out), "--dataset", "synthetic_shapes", "--arch", str(weights)]
    for option in ("train_per_class=1", "val_per_class=1", "test_per_class=1", "image_size=32"):
        eval_argv += ["--set", option]
    eval_argv += ["--no-progress", "--output", str(counts)]
    assert main(eval_argv) == 0, capsys.readouterr().err
    assert sum(json.loads(counts.read_text())["total"]) == 10
