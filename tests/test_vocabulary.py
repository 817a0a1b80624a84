"""Class names the backbone never learned: found from its token embedding, said before training or evaluation."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from promptclip.cli import main
from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import get_tokenizer
from promptclip.clip.vocabulary import name_vocabulary
from promptclip.clip.weights import load_clip
from promptclip.methods.coop import CoOp, CoOpConfig
from promptclip.runs.inputs import warn_class_vocabulary, warn_tied_class_names

# Fashion-MNIST's classes: the bundled tiny CLIP knows none of these words but "top" and "-".
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
ONE_TOKEN = ["Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag"]  # one unknown token each
TWO_TOKENS = ["Trouser", "Ankle boot"]  # two unknown tokens each
SHAPES = ["circle", "square", "triangle", "star", "red square"]  # words of the synthetic world


@pytest.fixture(scope="module")
def tiny_synthetic() -> CLIP:
    return load_clip("tiny-synthetic")


def test_fashion_names_on_the_bundled_model(tiny_synthetic: CLIP) -> None:
    found = name_vocabulary(tiny_synthetic, FASHION)
    assert found.identical == [TWO_TOKENS, ONE_TOKEN]
    assert set(found.unknown_words) == set(FASHION)
    assert found.unknown_words["Ankle boot"] == ["ankle", "boot"]
    assert "top" not in found.unknown_words["T-shirt/top"]  # a word it knows is not listed


def test_known_words_give_nothing(tiny_synthetic: CLIP) -> None:
    assert not name_vocabulary(tiny_synthetic, SHAPES)
    assert not name_vocabulary(tiny_synthetic, ["circle", "circle"])  # a duplicate name is not a vocabulary gap


def test_identical_names_tie_under_a_learned_prompt(tiny_synthetic: CLIP) -> None:
    """The claim behind the groups: with any prompt (here a random CoOp context) the grouped names get the
    same text features, so their logits tie."""
    torch.manual_seed(0)
    learner = CoOp(tiny_synthetic, FASHION, CoOpConfig(n_ctx=4, ctx_init=""))
    with torch.no_grad():
        text = learner.text_features()
        logits = learner({"image": torch.randn(3, 3, 64, 64)}).logits
    index = {name: i for i, name in enumerate(FASHION)}
    # The grouped names enter the text tower as identical sequences; only the blocked matrix products of a
    # batch may round their rows differently, by a few fp32 ulps of the largest feature.
    ulps = 8 * torch.finfo(torch.float32).eps * text.abs().max()
    for group in (ONE_TOKEN, TWO_TOKENS):
        first = index[group[0]]
        for name in group[1:]:
            assert (text[index[name]] - text[first]).abs().max() <= ulps, name
    assert not torch.equal(text[index["T-shirt/top"]], text[index["Shirt"]])
    tied = logits[:, [index[name] for name in ONE_TOKEN]]
    # Equal columns of the matrix product may round differently (blocked BLAS): logits near 100 * cos from a
    # 128-long fp32 dot product agree to about 100 * 128 * 6e-8 < 1e-3.
    assert (tied - tied[:, :1]).abs().max() < 1e-3


def test_equal_rows_that_are_not_zero_also_tie(tiny_clip: CLIP) -> None:
    """Two words whose embedding rows are equal (not zero) are one word to the text tower."""
    clip = load_clip("tiny-vit", weights="random")
    clip.load_state_dict(tiny_clip.state_dict())
    cat, dog = get_tokenizer().encode("cat")[0], get_tokenizer().encode("dog")[0]
    with torch.no_grad():
        clip.token_embedding.weight[dog] = clip.token_embedding.weight[cat]
    found = name_vocabulary(clip, ["cat", "dog", "bird"])
    assert found.identical == [["cat", "dog"]] and not found.unknown_words


def run_splits(names: list[str]) -> SimpleNamespace:
    return SimpleNamespace(classnames=names, display_name="fashion", template="a photo of a {}.")


def test_a_run_says_so_before_training(tiny_synthetic: CLIP, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="promptclip"):
        warn_tied_class_names(tiny_synthetic, run_splits(FASHION), "tiny-synthetic")  # type: ignore[arg-type]
    message = next(r.getMessage() for r in caplog.records if "never learned" in r.getMessage())
    assert "backbone tiny-synthetic never learned words of 10 of the 10 class names of fashion" in message
    assert "'Ankle boot' (ankle boot)" in message
    assert "9 of the 10 class names of fashion cannot be told apart" in message
    assert " = ".join(repr(name) for name in ONE_TOKEN) in message
    assert "'Trouser' = 'Ankle boot'" in message
    assert "cannot tell them apart" in message and "--classnames FILE" in message


def test_a_run_on_known_names_says_nothing(tiny_synthetic: CLIP, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="promptclip"):
        found = warn_class_vocabulary(tiny_synthetic, run_splits(SHAPES), "tiny-synthetic")  # type: ignore[arg-type]
    assert not found and not caplog.records


def test_predict_says_so_before_classifying(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    argv = ["predict", str(image), "--classes", "Trouser,Ankle boot,circle", "--arch", "tiny-synthetic"]
    assert main([*argv, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "promptclip: warning: backbone tiny-synthetic never learned words of 2 of the 3 class names" in err
    assert "'Trouser' = 'Ankle boot'" in err
