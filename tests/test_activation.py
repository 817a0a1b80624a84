"""The MLP activation of a backbone (OpenAI's QuickGELU or open_clip's GELU): named, read from the files that
state it, refused or warned about when nothing states it."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from promptclip.cli import main
from promptclip.clip import weights
from promptclip.clip.arch_names import canonical_name, stated_activation
from promptclip.clip.model import CLIP, GELU, QUICK_GELU, ArchConfig
from promptclip.clip.tokenizer import tokenize
from promptclip.clip.weights import (
    ActivationWarning,
    WeightsError,
    arch_config,
    export_hf,
    load_clip,
    openai_to_hf,
    save_clip,
)
from promptclip.methods.base import PromptFileError, PromptModel
from promptclip.methods.coop import CoOp, CoOpConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Features of fp32 towers of the tiny size computed two ways (ours and transformers') agree to this.
PARITY_TOLERANCE = 1e-5
TEXTS = ["a photo of a dog.", "x", "a blurry photo of a large red bus parked beside an old stone bridge"]


@pytest.fixture(autouse=True)
def empty_weights_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "weights"
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(folder))
    return folder


def random_clip(name: str, seed: int = 0) -> CLIP:
    """Random weights with non-zero biases and norm shifts, so every tensor matters."""
    torch.manual_seed(seed)
    model = load_clip(name, weights="random")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def features(model: CLIP, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokenize(TEXTS))


def open_clip_checkpoint(model: CLIP, path: Path) -> Path:
    """An open_clip training checkpoint: epoch, run name and the data-parallel state dict."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 32, "name": "laion-run", "state_dict": state, "optimizer": {}}, path)
    return path


def plain_state_dict(model: CLIP, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def load_quietly(*args: object, **kwargs: object) -> tuple[CLIP, list[str]]:
    """`load_clip(...)` and the messages of the ActivationWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_clip(*args, **kwargs)  # type: ignore[arg-type]
    return model, [str(w.message) for w in caught if issubclass(w.category, ActivationWarning)]


# --------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical", "stated", "activation"),
    [
        ("ViT-B-16", "ViT-B-16", None, QUICK_GELU),
        ("ViT-B/16", "ViT-B-16", None, QUICK_GELU),
        ("ViT-B-16-quickgelu", "ViT-B-16", QUICK_GELU, QUICK_GELU),
        ("open_clip:ViT-B-16-quickgelu", "ViT-B-16", QUICK_GELU, QUICK_GELU),
        ("open_clip:ViT-B-16", "ViT-B-16-gelu", GELU, GELU),
        ("ViT-B-16-gelu", "ViT-B-16-gelu", GELU, GELU),
        ("open_clip:ViT-L-14", "ViT-L-14-gelu", GELU, GELU),
        ("ViT-L-14-quickgelu", "ViT-L-14", QUICK_GELU, QUICK_GELU),
        ("open_clip:ViT-B-32", "ViT-B-32-gelu", GELU, GELU),
        ("open_clip:RN50", "RN50-gelu", GELU, GELU),
        ("RN50-quickgelu", "RN50", QUICK_GELU, QUICK_GELU),
    ],
)
def test_open_clip_names_carry_their_activation(name: str, canonical: str, stated: str | None, activation: str) -> None:
    assert canonical_name(name) == canonical
    assert stated_activation(name) == stated
    cfg = arch_config(name)
    assert cfg.activation == activation and cfg.name == canonical
    base = arch_config(canonical.removesuffix("-gelu"))
    assert cfg.vision == base.vision and cfg.text == base.text and cfg.embed_dim == base.embed_dim


def test_unknown_open_clip_names_are_refused() -> None:
    assert canonical_name("open_clip:ViT-Q-99") is None
    with pytest.raises(WeightsError, match=r"unknown architecture 'open_clip:ViT-Q-99'.*open_clip:<name>"):
        arch_config("open_clip:ViT-Q-99")


def test_the_activation_changes_the_features() -> None:
    """The whole point: the same tensors under the other activation give other features."""
    quick = random_clip("tiny-vit")
    gelu = CLIP(arch_config("open_clip:tiny-vit"))
    gelu.load_state_dict(quick.state_dict())
    gelu.eval()
    for ours, theirs in zip(features(quick), features(gelu), strict=True):
        assert (ours - theirs).abs().max() > 1e-3  # orders of magnitude above fp32 rounding


# --------------------------------------------------------------------------------------------------------
# Files that state their activation
# --------------------------------------------------------------------------------------------------------


def test_gelu_model_matches_transformers_with_gelu(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = random_clip("open_clip:tiny-vit")
    export_hf(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["hidden_act"] == GELU
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    tokens = tokenize(TEXTS)
    with torch.no_grad():
        theirs = (hf_model.get_image_features(pixel_values=pixels), hf_model.get_text_features(input_ids=tokens))
    theirs = tuple(t if isinstance(t, torch.Tensor) else t.pooler_output for t in theirs)
    for ours, reference in zip(features(model), theirs, strict=True):
        assert reference.abs().mean() > 0.05  # features large enough for the comparison to mean something
        assert (ours - reference).abs().max() <= PARITY_TOLERANCE
    # The folder says gelu in config.json: it loads as GELU with no name and no warning.
    loaded, warned = load_quietly(tmp_path / "hf")
    assert loaded.config.activation == GELU and not warned
    for ours, again in zip(features(model), features(loaded), strict=True):
        assert torch.equal(ours, again)


def test_promptclip_files_keep_their_activation(tmp_path: Path) -> None:
    model = random_clip("open_clip:tiny-vit")
    path = save_clip(model, tmp_path / "gelu.safetensors")
    loaded, warned = load_quietly(path)
    assert loaded.config == model.config and not warned
    assert json.loads(path.with_suffix(".json").read_text())["activation"] == GELU


def test_files_written_before_the_field_are_quickgelu() -> None:
    cfg = ArchConfig.from_dict({k: v for k, v in arch_config("tiny-vit").to_dict().items() if k != "activation"})
    assert cfg.activation == QUICK_GELU
    with pytest.raises(ValueError, match="activation 'relu'"):
        ArchConfig.from_dict({**arch_config("tiny-vit").to_dict(), "activation": "relu"})


@pytest.mark.parametrize(
    ("acts", "message"),
    [
        (("gelu_new", "gelu_new"), r"hidden_act is 'gelu_new'"),
        (("gelu", "quick_gelu"), r"text_config\.hidden_act and vision_config\.hidden_act differ"),
    ],
)
def test_hf_configs_with_other_activations_are_refused(tmp_path: Path, acts: tuple[str, str], message: str) -> None:
    folder = export_hf(random_clip("tiny-vit"), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_act"], config["vision_config"]["hidden_act"] = acts
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=message):
        load_clip(folder)


def test_a_name_that_contradicts_the_file_is_refused(tmp_path: Path) -> None:
    folder = export_hf(random_clip("open_clip:tiny-vit"), tmp_path / "hf")
    with pytest.raises(WeightsError, match=r"hidden_act in .*config\.json states a gelu model.*'open_clip:tiny-vit'"):
        load_clip("tiny-vit-quickgelu", weights=folder)
    promptclip_file = save_clip(random_clip("tiny-vit"), tmp_path / "quick.safetensors")
    with pytest.raises(WeightsError, match=r"promptclip metadata states a quick_gelu model.*'tiny-vit-quickgelu'"):
        load_clip("open_clip:tiny-vit", weights=promptclip_file)


def test_openai_state_dict_entries_state_quickgelu(tmp_path: Path) -> None:
    model = random_clip("tiny-vit")
    state = {**model.state_dict(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(77)}
    torch.save(state, tmp_path / "openai.pt")
    loaded, warned = load_quietly(tmp_path / "openai.pt")
    assert loaded.config.activation == QUICK_GELU and not warned
    with pytest.raises(WeightsError, match="OpenAI's own entries"):
        load_clip("open_clip:tiny-vit", weights=tmp_path / "openai.pt")


# --------------------------------------------------------------------------------------------------------
# Files that cannot state it
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, "tiny-vit"])
def test_an_open_clip_checkpoint_needs_a_name_that_states_the_activation(tmp_path: Path, name: str | None) -> None:
    path = open_clip_checkpoint(random_clip("open_clip:tiny-vit"), tmp_path / "epoch_32.pt")
    with pytest.raises(WeightsError) as info:
        load_clip(path) if name is None else load_clip(name, weights=path)
    message = str(info.value)
    assert str(path) in message and "open_clip training checkpoint" in message
    assert "--arch open_clip:tiny-vit" in message and "--arch tiny-vit-quickgelu" in message


def test_an_open_clip_checkpoint_loads_under_the_activation_its_name_states(tmp_path: Path) -> None:
    gelu = random_clip("open_clip:tiny-vit")
    path = open_clip_checkpoint(gelu, tmp_path / "epoch_32.pt")
    loaded, warned = load_quietly("open_clip:tiny-vit", weights=path)
    assert loaded.config.activation == GELU and not warned
    for ours, again in zip(features(gelu), features(loaded), strict=True):
        assert torch.equal(ours, again)
    quick, warned = load_quietly("tiny-vit-quickgelu", weights=path)
    assert quick.config.activation == QUICK_GELU and quick.config.name == "tiny-vit" and not warned


def test_hub_file_names_mark_open_clip_checkpoints(tmp_path: Path) -> None:
    path = plain_state_dict(random_clip("tiny-vit"), tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"its file name open_clip_pytorch_model\.bin"):
        load_clip(path)


@pytest.mark.parametrize("name", [None, "tiny-vit"])
def test_a_plain_state_dict_loads_as_quickgelu_with_a_warning(tmp_path: Path, name: str | None) -> None:
    path = plain_state_dict(random_clip("tiny-vit"), tmp_path / "plain.pt")
    loaded, warned = load_quietly(path) if name is None else load_quietly(name, weights=path)
    assert loaded.config.activation == QUICK_GELU
    assert len(warned) == 1 and str(path) in warned[0] and "--arch open_clip:tiny-vit" in warned[0]
    _, warned = load_quietly("tiny-vit-quickgelu", weights=path)
    assert not warned  # the name states it


def test_a_prompt_refuses_a_backbone_with_the_other_activation(tmp_path: Path) -> None:
    quick = random_clip("tiny-vit")
    gelu = CLIP(arch_config("open_clip:tiny-vit"))
    gelu.load_state_dict(quick.state_dict())
    CoOp(quick, ["cat", "dog"], CoOpConfig(n_ctx=2)).save_pretrained(tmp_path / "prompt")
    with pytest.raises(PromptFileError, match="trained on backbone 'tiny-vit'"):
        PromptModel.from_pretrained(gelu, tmp_path / "prompt")


def test_the_command_line_names_the_activation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = open_clip_checkpoint(random_clip("open_clip:tiny-vit"), tmp_path / "epoch_32.pt")
    assert main(["convert-weights", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert "--arch open_clip:tiny-vit" in capsys.readouterr().err
    argv = ["convert-weights", str(path), str(tmp_path / "out.safetensors"), "--arch", "open_clip:tiny-vit"]
    assert main(argv) == 0, capsys.readouterr().err
    assert load_clip(tmp_path / "out.safetensors").config.activation == GELU
    plain = plain_state_dict(random_clip("tiny-vit"), tmp_path / "plain.pt")
    assert main(["convert-weights", str(plain), str(tmp_path / "plain.safetensors")]) == 0
    err = capsys.readouterr().err
    assert f"promptclip: warning: {plain}: the file does not say which MLP activation" in err


def test_hf_key_map_is_unchanged_by_the_activation() -> None:
    quick, gelu = random_clip("tiny-vit"), random_clip("open_clip:tiny-vit")
    assert sorted(openai_to_hf(quick.state_dict())) == sorted(openai_to_hf(gelu.state_dict()))
