"""CoOp specifics: the prompt layout, and class-specific context staying with its classes."""

from __future__ import annotations

import pytest
import torch

from promptclip.methods.base import PromptModel
from promptclip.methods.coop import CoOp, CoOpConfig
from promptclip.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig

BASE = ["red star", "blue circle", "green square"]
NEW = ["pink heart", "white ring", "black cross"]  # as many classes as BASE, different names


def test_context_initialised_from_the_template_words_reproduces_zero_shot(tiny_clip) -> None:
    """`a photo of a` + name + `.` as learnable context starts exactly at zero-shot CLIP's prompt."""
    coop = CoOp(tiny_clip, BASE, CoOpConfig(ctx_init="a photo of a")).eval()
    zeroshot = ZeroShotCLIP(tiny_clip, BASE, ZeroShotConfig(), template="a photo of a {}.").eval()
    with torch.no_grad():
        assert torch.allclose(coop.text_features(), zeroshot.text_features(), atol=1e-5)


def test_context_length_must_match_the_init_words(tiny_clip) -> None:
    with pytest.raises(ValueError, match="n_ctx=8 but ctx_init 'a photo of a' has 4 tokens"):
        CoOp(tiny_clip, BASE, CoOpConfig(n_ctx=8, ctx_init="a photo of a"))


def test_class_specific_context_refuses_other_classes_of_the_same_count(tiny_clip, tmp_path) -> None:
    learner = CoOp(tiny_clip, BASE, CoOpConfig(n_ctx=2, csc=True))
    with pytest.raises(ValueError, match="class-specific context"):
        learner.set_classnames(NEW)
    with pytest.raises(ValueError, match="class-specific context"):
        learner.encode_classnames(NEW)
    learner.save_pretrained(tmp_path / "prompt")
    with pytest.raises(ValueError, match="class-specific context"):
        PromptModel.from_pretrained(tiny_clip, tmp_path / "prompt", classnames=NEW)
    reloaded = PromptModel.from_pretrained(tiny_clip, tmp_path / "prompt", classnames=BASE)
    assert torch.equal(reloaded.trainable_state()["ctx"], learner.trainable_state()["ctx"])


def test_shared_context_transfers_to_new_classes_after_loading(tiny_clip, tmp_path) -> None:
    learner = CoOp(tiny_clip, BASE, CoOpConfig(n_ctx=2)).eval()
    learner.save_pretrained(tmp_path / "prompt")
    moved = PromptModel.from_pretrained(tiny_clip, tmp_path / "prompt", classnames=NEW).eval()
    assert moved.classnames == NEW
    with torch.no_grad():
        assert torch.allclose(moved.text_features(), learner.encode_classnames(NEW), atol=1e-6)
