"""Weight loading: every accepted format round-trips, bad files are refused with useful messages."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from promptclip.cli import main
from promptclip.clip import arch_names, weights
from promptclip.clip.model import CLIP
from promptclip.clip.weights import (
    MissingWeightsError,
    WeightsError,
    arch_config,
    available_archs,
    export_hf,
    hf_to_openai,
    load_clip,
    openai_to_hf,
    save_clip,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def empty_weights_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "weights"
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(folder))
    return folder


def random_clip(name: str, seed: int = 0) -> CLIP:
    """Random weights with every tensor distinct from its initial value (biases and norms included)."""
    torch.manual_seed(seed)
    model = load_clip(name, weights="random")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        for key, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand_like(buffer) + 0.5)
            elif key.endswith("num_batches_tracked"):
                buffer.fill_(7)
    return model


def state_of(model: CLIP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(model: CLIP, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------
# Writers: one per accepted format
# --------------------------------------------------------------------------------------------------------


class _TensorHolder(nn.Module):
    """A scriptable module that only holds tensors, standing in for OpenAI's scripted CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_torchscript(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A TorchScript archive with the state's keys in fp16 plus OpenAI's non-parameter entries."""
    root = _TensorHolder()
    for key, tensor in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _TensorHolder())
            module = getattr(module, name)
        if tensor.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(tensor.half(), requires_grad=False))
        else:
            module.register_buffer(leaf, tensor)
    for extra, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(extra, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(root), str(path))
    return path


def write_state_dict_pt(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path / "plain.pt")
    return path / "plain.pt"


def write_open_clip_checkpoint(state: dict[str, torch.Tensor], path: Path) -> Path:
    wrapped = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, path / "epoch_3.pt")
    return path / "epoch_3.pt"


def write_model_wrapper_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model": state, "step": 10}, path / "wrapped.pth")
    return path / "wrapped.pth"


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(state, str(path / "plain.safetensors"))
    return path / "plain.safetensors"


def write_fp16_bin(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path / "half.bin")
    return path / "half.bin"


def write_torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> Path:
    return write_torchscript(state, path / "ViT-jit.pt")


WRITERS: dict[str, Callable[[dict[str, torch.Tensor], Path], Path]] = {
    "state-dict-pt": write_state_dict_pt,
    "open-clip-module-prefix": write_open_clip_checkpoint,
    "model-wrapper-pth": write_model_wrapper_pth,
    "safetensors": write_safetensors,
    "fp16-bin": write_fp16_bin,
    "torchscript": write_torchscript_archive,
}
FP16_WRITERS = {"fp16-bin", "torchscript"}
# Files that cannot say which MLP activation they were trained with (OpenAI's archive can: QuickGELU); an
# open_clip checkpoint among them needs a name that states it.
SILENT_ACTIVATION_WRITERS = {"state-dict-pt", "model-wrapper-pth", "safetensors", "fp16-bin"}
OPEN_CLIP_WRITERS = {"open-clip-module-prefix"}


def as_stored(state: dict[str, torch.Tensor], writer: str) -> dict[str, torch.Tensor]:
    """What the loader must return: the same tensors, through fp16 for fp16 files."""
    if writer not in FP16_WRITERS:
        return state
    return {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_openai_layout_files_round_trip(tmp_path: Path, arch: str, writer: str) -> None:
    model = random_clip(arch)
    state = state_of(model)
    path = WRITERS[writer](state, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if writer in OPEN_CLIP_WRITERS:  # open_clip's own name for OpenAI's activation
            loaded = load_clip(f"{arch}-quickgelu", weights=path)
        else:
            loaded = load_clip(path, allow_torchscript=writer == "torchscript")  # the test names the archive
    assumed = [w for w in caught if issubclass(w.category, weights.ActivationWarning)]
    assert len(assumed) == (writer in SILENT_ACTIVATION_WRITERS), [str(w.message) for w in assumed]
    assert loaded.config == model.config  # inferred from shapes, head counts taken from the known arch
    assert_same_tensors(loaded, as_stored(state, writer))
    assert loaded.weights_sha256 == file_sha256(path)
    assert loaded.weights_source == str(path)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.parameters())
    assert not loaded.training


def test_a_torchscript_archive_opens_only_when_allowed_and_then_warns(
    tmp_path: Path, empty_weights_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = state_of(random_clip("tiny-vit"))
    archive = write_torchscript_archive(state, tmp_path)
    opened: list[str] = []
    jit_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda path, **kwargs: opened.append(str(path)) or jit_load(path, **kwargs))
    for call in (lambda: load_clip(archive), lambda: load_clip("tiny-vit", weights=archive)):
        with pytest.raises(weights.TorchScriptRefusedError, match="convert-weights") as refused:
            call()
        assert refused.value.path == archive
    assert opened == []  # refused before torch.jit.load
    with pytest.warns(weights.TorchScriptWarning, match=f"promptclip convert-weights {archive}"):
        assert_same_tensors(load_clip(archive, allow_torchscript=True), as_stored(state, "torchscript"))
    empty_weights_folder.mkdir()
    archive.rename(empty_weights_folder / "tiny-vit.pt")  # found for a name in the user's weights folder
    with pytest.warns(weights.TorchScriptWarning):
        load_clip("tiny-vit")
    assert len(opened) == 2


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_hf_folder_round_trips(tmp_path: Path, weights_file: str) -> None:
    model = random_clip("tiny-vit")
    state = state_of(model)
    folder = export_hf(model, tmp_path / "hf")
    if weights_file == "pytorch_model.bin":
        hf_state = openai_to_hf(state)
        (folder / "model.safetensors").unlink()
        torch.save(hf_state, folder / weights_file)
    loaded = load_clip(folder)
    assert loaded.config == model.config
    assert_same_tensors(loaded, state)
    assert loaded.weights_sha256 == file_sha256(folder / weights_file)
    assert loaded.weights_source == str(folder / weights_file)


def test_sharded_hf_folder_hashes_its_shards_in_order(tmp_path: Path) -> None:
    model = random_clip("tiny-vit")
    hf_state = openai_to_hf(state_of(model))
    folder = tmp_path / "sharded"
    folder.mkdir()
    export_hf(model, tmp_path / "single")
    (folder / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    keys = sorted(hf_state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: hf_state[k].contiguous() for k in shard_keys}, str(folder / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_clip(folder)
    assert_same_tensors(loaded, state_of(model))
    both = b"".join((folder / name).read_bytes() for name in sorted(shards))
    assert loaded.weights_sha256 == hashlib.sha256(both).hexdigest()


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_save_clip_round_trips_with_its_architecture(tmp_path: Path, arch: str) -> None:
    model = random_clip(arch)
    path = save_clip(model, tmp_path / "out" / "mine.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["mine.json", "mine.safetensors"]
    assert json.loads(path.with_suffix(".json").read_text())["name"] == arch
    loaded = load_clip(path)
    assert loaded.config == model.config
    assert_same_tensors(loaded, state_of(model))
    assert loaded.weights_sha256 == file_sha256(path)


def test_save_clip_keeps_head_counts_that_shapes_cannot_tell(tmp_path: Path) -> None:
    cfg = arch_config("tiny-vit")
    cfg = type(cfg).from_dict({**cfg.to_dict(), "name": "tiny-4heads", "text": {**cfg.to_dict()["text"], "heads": 4}})
    model = CLIP(cfg)
    path = save_clip(model, tmp_path / "custom.safetensors")
    assert load_clip(path).config == cfg
    with pytest.raises(WeightsError, match="attention heads"):
        load_clip("tiny-vit", weights=path)


def test_save_clip_needs_safetensors_suffix(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"\.safetensors"):
        save_clip(random_clip("tiny-vit"), tmp_path / "model.pt")


def test_hf_and_openai_key_maps_are_inverse() -> None:
    state = state_of(random_clip("tiny-vit"))
    hf_state = openai_to_hf(state)
    assert "vision_model.pre_layrnorm.weight" in hf_state
    assert "text_model.encoder.layers.1.self_attn.k_proj.bias" in hf_state
    torch.testing.assert_close(hf_state["visual_projection.weight"], state["visual.proj"].T, rtol=0, atol=0)
    width = state["ln_final.weight"].shape[0]
    torch.testing.assert_close(
        hf_state["text_model.encoder.layers.0.self_attn.v_proj.weight"],
        state["transformer.resblocks.0.attn.in_proj_weight"][2 * width :],
        rtol=0,
        atol=0,
    )
    back = hf_to_openai(hf_state)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_resnet_has_no_hf_layout(tmp_path: Path) -> None:
    model = random_clip("tiny-rn")
    with pytest.raises(WeightsError, match="ResNet"):
        openai_to_hf(model.state_dict())
    with pytest.raises(WeightsError, match="ResNet"):
        export_hf(model, tmp_path / "hf")


def test_hf_folder_with_one_tower_of_another_activation_is_refused(tmp_path: Path) -> None:
    folder = export_hf(random_clip("tiny-vit"), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"text_config\.hidden_act and vision_config\.hidden_act differ"):
        load_clip(folder)


# --------------------------------------------------------------------------------------------------------
# Refusals and error messages
# --------------------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this object would call open(marker, "w"), creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "code_ran"
    payload = {"state_dict": {"token_embedding.weight": torch.zeros(2, 2)}, "hook": _RunsCode(marker)}
    path = tmp_path / "evil.pt"
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(WeightsError, match="not a plain tensor file") as caught:
        load_clip(path)
    assert str(path) in str(caught.value) and "convert" in str(caught.value)
    assert not marker.exists()


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch file") as caught:
        load_clip(path)
    assert str(path) in str(caught.value)


def test_unknown_layout_lists_keys_and_accepted_layouts(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"backbone.stem.weight": torch.zeros(2), "head.fc.bias": torch.zeros(3)}, str(path))
    with pytest.raises(WeightsError) as caught:
        load_clip(path)
    message = str(caught.value)
    assert str(path) in message and "'backbone.stem.weight'" in message
    assert "Hugging Face CLIPModel" in message and "open_clip" in message


def test_missing_weights_say_where_to_put_them(empty_weights_folder: Path) -> None:
    with pytest.raises(MissingWeightsError) as caught:
        load_clip("ViT-B/16")
    message = str(caught.value)
    assert str(empty_weights_folder / "ViT-B-16.pt") in message
    assert "weights='random'" in message
    with pytest.raises(MissingWeightsError, match=r"ViT-L-14-336px\.pt"):
        load_clip("ViT-L/14@336px")


def test_names_resolve_in_the_weights_folder(empty_weights_folder: Path) -> None:
    model = random_clip("tiny-vit")
    empty_weights_folder.mkdir()
    path = write_safetensors(state_of(model), empty_weights_folder)
    path = path.rename(empty_weights_folder / "tiny-vit.safetensors")
    loaded = load_clip("TINY-VIT")
    assert loaded.weights_source == str(path)
    assert_same_tensors(loaded, state_of(model))
    path.unlink()
    export_hf(model, empty_weights_folder / "tiny-vit")
    assert load_clip("tiny-vit").weights_source == str(empty_weights_folder / "tiny-vit" / "model.safetensors")


def test_unknown_name_lists_known_architectures() -> None:
    with pytest.raises(WeightsError, match="ViT-B-16") as caught:
        load_clip("ViT-Z-99")
    assert "neither a known architecture" in str(caught.value)


def test_shape_mismatch_names_key_shapes_and_file(tmp_path: Path) -> None:
    state = state_of(random_clip("tiny-vit"))
    state["visual.proj"] = torch.zeros(64, 16)
    path = write_safetensors(state, tmp_path)
    with pytest.raises(WeightsError) as caught:
        load_clip("tiny-vit", weights=path)
    message = str(caught.value)
    assert "'visual.proj'" in message and "(64, 16)" in message and "(64, 32)" in message
    assert str(path) in message


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = state_of(random_clip("tiny-vit"))
    del state["ln_final.bias"]
    state["visual.extra_head.weight"] = torch.zeros(3)
    path = write_state_dict_pt(state, tmp_path)
    with pytest.raises(WeightsError) as caught:
        load_clip("tiny-vit", weights=path)
    message = str(caught.value)
    assert "missing 'ln_final.bias'" in message and "unexpected 'visual.extra_head.weight'" in message
    assert str(path) in message


def test_random_weights_are_a_frozen_fp32_model() -> None:
    model = load_clip("tiny-vit", weights="random", device="cpu")
    assert model.weights_source == "random" and model.weights_sha256 is None
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    assert model.config == arch_config("tiny-vit")


def test_bundled_model_loads_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = tmp_path / "assets"
    model = random_clip("tiny-vit")
    model.config = type(model.config).from_dict({**model.config.to_dict(), "name": "tiny-synthetic"})
    save_clip(model, assets / "tiny-synthetic.safetensors")
    monkeypatch.setattr(arch_names, "_assets_dir", lambda: assets)
    assert "tiny-synthetic" in available_archs()
    loaded = load_clip("tiny-synthetic")
    assert loaded.config.name == "tiny-synthetic"
    assert_same_tensors(loaded, state_of(model))
    assert loaded.weights_sha256 == file_sha256(assets / "tiny-synthetic.safetensors")


def test_list_archs_command(capsys: pytest.CaptureFixture[str], empty_weights_folder: Path) -> None:
    empty_weights_folder.mkdir()
    found = write_safetensors(state_of(random_clip("tiny-vit")), empty_weights_folder)
    found = found.rename(empty_weights_folder / "tiny-vit.safetensors")
    assert main(["list", "archs"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert set(available_archs()) <= set(rows)
    assert "149.6M" in rows["ViT-B-16"] and "224" in rows["ViT-B-16"] and "ViT 12x768, patch 16" in rows["ViT-B-16"]
    assert "102.0M" in rows["RN50"] and "1024" in rows["RN50"] and "ResNet 3-4-6-3" in rows["RN50"]
    assert "336" in rows["ViT-L-14-336"]
    assert rows["tiny-vit"].endswith(f"found: {found}")
    assert rows["ViT-B-16"].endswith("missing")
    assert str(empty_weights_folder) in out and weights.WEIGHTS_ENV in out
