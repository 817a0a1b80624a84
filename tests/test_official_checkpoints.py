"""Prompt files saved by the original CoOp / CoCoOp / KgCoOp trainers load into our learners."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from official_files import write_dassl_file

from promptclip.clip.model import CLIP
from promptclip.methods.base import PromptModel
from promptclip.methods.cocoop import CoCoOp, CoCoOpConfig
from promptclip.methods.coop import CoOp
from promptclip.methods.kgcoop import KgCoOp
from promptclip.methods.official import OfficialCheckpointError, load_official_prompt, read_official_prompt

TRAIN_CLASSES = ["cat", "dog", "car"]
CLASSES = ["airplane", "blue whale", "house", "tree", "red sports car"]
WIDTH = 64  # tiny-vit text width


def class_buffers(count: int, n_ctx: int) -> dict[str, torch.Tensor]:
    return {
        "token_prefix": torch.randn(count, 1, WIDTH).half(),
        "token_suffix": torch.randn(count, 77 - 1 - n_ctx, WIDTH).half(),
    }


def coop_state(n_ctx: int = 4, classes: int | None = None) -> dict[str, torch.Tensor]:
    shape = (n_ctx, WIDTH) if classes is None else (classes, n_ctx, WIDTH)
    return {"ctx": (0.02 * torch.randn(shape)).half(), **class_buffers(len(TRAIN_CLASSES), n_ctx)}


def test_coop_prompt_loads_for_any_class_names(tiny_clip: CLIP, tmp_path: Path) -> None:
    state = coop_state(n_ctx=4)
    path = write_dassl_file(tmp_path / "prompt_learner" / "model.pth.tar-50", state, epoch=50)
    learner = load_official_prompt(path, tiny_clip, CLASSES)
    assert type(learner) is CoOp
    assert learner.cfg.n_ctx == 4 and not learner.cfg.csc
    assert learner.ctx.dtype == torch.float32
    assert torch.equal(learner.ctx.detach(), state["ctx"].float())
    assert read_official_prompt(path).epoch == 50
    with torch.no_grad():
        logits = learner({"image": torch.randn(2, 3, 32, 32)}).logits
    assert logits.shape == (2, len(CLASSES))


def test_class_specific_context(tiny_clip: CLIP, tmp_path: Path) -> None:
    state = coop_state(n_ctx=2, classes=len(TRAIN_CLASSES))
    path = write_dassl_file(tmp_path / "model.pth.tar-200", state)
    learner = load_official_prompt(path, tiny_clip, TRAIN_CLASSES, class_token_position="front")
    assert type(learner) is CoOp and learner.cfg.csc and learner.cfg.class_token_position == "front"
    assert torch.equal(learner.ctx.detach(), state["ctx"].float())
    with pytest.raises(OfficialCheckpointError, match="class-specific context for 3 classes, but 5"):
        load_official_prompt(path, tiny_clip, CLASSES)


def test_cocoop_prompt_reproduces_the_learner_it_came_from(tiny_clip: CLIP, tmp_path: Path) -> None:
    torch.manual_seed(3)
    original = CoCoOp(tiny_clip, TRAIN_CLASSES, CoCoOpConfig())
    with torch.no_grad():
        for p in original.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.half() for k, v in original.trainable_state().items()}
    state.update(class_buffers(len(TRAIN_CLASSES), 4))
    path = write_dassl_file(tmp_path / "model.pth.tar-10", state)
    learner = load_official_prompt(path, tiny_clip, TRAIN_CLASSES)
    assert type(learner) is CoCoOp
    for name, tensor in learner.trainable_state().items():
        assert torch.equal(tensor, state[name].float()), name
    # Our learner with its tensors rounded to fp16, as the file holds them, gives the same logits.
    original.load_trainable_state({k: v.half().float() for k, v in original.trainable_state().items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(learner({"image": x}).logits, original({"image": x}).logits, atol=1e-6)


def test_kgcoop_prompt_ignores_its_unused_tensors(tiny_clip: CLIP, tmp_path: Path) -> None:
    state = coop_state(n_ctx=4)
    state.update(
        {
            "bias_vectors": torch.randn(1, WIDTH).half(),
            "meta_net.linear1.weight": torch.randn(32, 32).half(),
            "meta_net.linear1.bias": torch.randn(32).half(),
        }
    )
    path = write_dassl_file(tmp_path / "model.pth.tar-100", state)
    learner = load_official_prompt(path, tiny_clip, CLASSES, template="a photo of a {}, a type of pet.")
    assert type(learner) is KgCoOp and learner.template == "a photo of a {}, a type of pet."
    assert torch.equal(learner.ctx.detach(), state["ctx"].float())
    as_coop = load_official_prompt(path, tiny_clip, CLASSES, method="coop")
    assert type(as_coop) is CoOp


def test_original_trainer_files_with_scheduler_objects_load(tiny_clip: CLIP, tmp_path: Path) -> None:
    state = coop_state(n_ctx=4)
    path = write_dassl_file(tmp_path / "model.pth.tar-10", state, objects=True)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # what the plain weights-only reader says about such files
    learner = load_official_prompt(path, tiny_clip, CLASSES)
    assert torch.equal(learner.ctx.detach(), state["ctx"].float())


EXECUTED: list[str] = []


def record_execution(tag: str) -> str:
    EXECUTED.append(tag)
    return tag


class CodeOnLoad:
    """Unpickling this calls `record_execution`: a stand-in for a malicious payload."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (record_execution, ("ran",))


def test_files_with_other_objects_are_refused_without_running_them(tiny_clip: CLIP, tmp_path: Path) -> None:
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": coop_state(), "epoch": 1, "extra": CodeOnLoad()}, path)
    with pytest.raises(OfficialCheckpointError, match=r"weights_only=True.*record_execution"):
        load_official_prompt(path, tiny_clip, CLASSES)
    assert EXECUTED == []


def test_run_folders_pick_the_last_or_the_requested_epoch(tiny_clip: CLIP, tmp_path: Path) -> None:
    early, late = coop_state(), coop_state()
    write_dassl_file(tmp_path / "seed1" / "prompt_learner" / "model.pth.tar-5", early, epoch=5)
    write_dassl_file(tmp_path / "seed1" / "prompt_learner" / "model.pth.tar-10", late, epoch=10)
    assert torch.equal(load_official_prompt(tmp_path / "seed1", tiny_clip, CLASSES).ctx.detach(), late["ctx"].float())
    chosen = load_official_prompt(tmp_path / "seed1", tiny_clip, CLASSES, epoch=5)
    assert torch.equal(chosen.ctx.detach(), early["ctx"].float())
    with pytest.raises(FileNotFoundError, match=r"epochs present: \[5, 10\]"):
        load_official_prompt(tmp_path / "seed1", tiny_clip, CLASSES, epoch=7)


def test_bare_state_dicts_and_data_parallel_names(tiny_clip: CLIP, tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in coop_state(n_ctx=3).items()}
    torch.save(state, tmp_path / "bare.pth")
    learner = load_official_prompt(tmp_path / "bare.pth", tiny_clip, CLASSES)
    assert torch.equal(learner.ctx.detach(), state["module.ctx"].float())


def test_loaded_prompts_save_in_our_format(tiny_clip: CLIP, tmp_path: Path) -> None:
    path = write_dassl_file(tmp_path / "model.pth.tar-10", coop_state(n_ctx=4))
    learner = load_official_prompt(path, tiny_clip, CLASSES)
    learner.save_pretrained(tmp_path / "converted")
    again = PromptModel.from_pretrained(tiny_clip, tmp_path / "converted")
    assert torch.equal(again.trainable_state()["ctx"], learner.trainable_state()["ctx"])


@pytest.mark.parametrize(
    ("state", "method", "message"),
    [
        ({"ctx": torch.zeros(4, 512)}, None, "text width 64"),
        ({"ctx": torch.zeros(4, WIDTH), "meta_net.linear1.weight": torch.zeros(32, 512),
          "meta_net.linear1.bias": torch.zeros(32), "meta_net.linear2.weight": torch.zeros(WIDTH, 32),
          "meta_net.linear2.bias": torch.zeros(WIDTH)}, None, "meta-net maps 512 -> 64"),
        ({"ctx": torch.zeros(4, WIDTH)}, "cocoop", "holds a coop prompt, not a cocoop one"),
        ({"ctx": torch.zeros(4, WIDTH), "meta_net.linear1.weight": torch.zeros(2, 32),
          "meta_net.linear1.bias": torch.zeros(2), "meta_net.linear2.weight": torch.zeros(WIDTH, 2),
          "meta_net.linear2.bias": torch.zeros(WIDTH)}, "coop", "meta-net would be ignored"),
        ({"prompt_learner.ctx": torch.zeros(4, WIDTH)}, None, "no 'ctx' tensor"),
        ({"ctx": torch.zeros(4, WIDTH), "VPT": torch.zeros(2, 64)}, None, r"unexpected tensors \['VPT'\]"),
    ],
    ids=["wrong-width", "wrong-meta-net", "not-cocoop", "cocoop-as-coop", "no-ctx", "other-method"],
)  # fmt: skip
def test_unusable_files_are_refused_with_the_reason(
    tiny_clip: CLIP, tmp_path: Path, state: dict[str, torch.Tensor], method: str | None, message: str
) -> None:
    path = write_dassl_file(tmp_path / "model.pth.tar-1", state)
    with pytest.raises(OfficialCheckpointError, match=message) as info:
        load_official_prompt(path, tiny_clip, CLASSES, method=method)  # type: ignore[arg-type]
    assert str(path) in str(info.value) or "method" in str(info.value)


def test_a_file_that_is_not_a_checkpoint(tiny_clip: CLIP, tmp_path: Path) -> None:
    path = tmp_path / "model.pth.tar-1"
    path.write_text("not a checkpoint")
    with pytest.raises(OfficialCheckpointError, match="not a readable PyTorch checkpoint"):
        load_official_prompt(path, tiny_clip, CLASSES)


def test_eval_command_evaluates_an_official_prompt_file(tiny_clip: CLIP, tmp_path: Path, capsys) -> None:
    """`promptclip eval --official FILE` gives the counts of the converted learner on the dataset's classes."""
    from promptclip.cli import main
    from promptclip.clip.weights import save_clip
    from promptclip.data.datasets import build_dataset
    from promptclip.data.loader import build_loader
    from promptclip.engine.evaluate import evaluate

    weights = save_clip(tiny_clip, tmp_path / "tiny-vit.safetensors")
    file = write_dassl_file(tmp_path / "prompt_learner" / "model.pth.tar-10", coop_state(), objects=True)
    options = ["train_per_class=1", "val_per_class=1", "test_per_class=2", "image_size=32"]
    argv = ["eval", "--official", str(file), "--dataset", "synthetic_shapes", "--arch", "tiny-vit"]
    argv += ["--weights", str(weights), "--no-progress", "--output", str(tmp_path / "counts.json")]
    for option in options:
        argv += ["--set", option]
    assert main(argv) == 0, capsys.readouterr().err
    import json

    counts = json.loads((tmp_path / "counts.json").read_text())
    splits = build_dataset(
        "synthetic_shapes", None, train_per_class=1, val_per_class=1, test_per_class=2, image_size=32
    )
    expected = evaluate(
        load_official_prompt(file, tiny_clip, splits.classnames, template=splits.template),
        build_loader(splits, "test", batch_size=100, train=False, image_size=32),
    )
    assert counts["correct"] == expected.correct
    assert sum(counts["total"]) == 2 * len(splits.classnames)
