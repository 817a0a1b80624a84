"""Load CLIP weights from the files people actually have, into one OpenAI-layout state dict.

Accepted inputs (all end as `CLIP` with OpenAI key names, fp32 parameters, eval mode, frozen):

* an OpenAI TorchScript archive (`ViT-B-16.pt` as published): its tensors are read through `torch.jit.load`;
* an OpenAI-layout state dict: `.pt`/`.pth`/`.bin` pickles read with `torch.load(weights_only=True)`, or
  `.safetensors`; a `state_dict`/`model` wrapper and a `module.` prefix (as open_clip writes them) are removed;
* a Hugging Face `CLIPModel` folder (`config.json` + `model.safetensors` or `pytorch_model.bin`), or a file in
  that key layout, mapped by `hf_to_openai`;
* promptclip's own `.safetensors` written by `save_clip`, which carries its architecture in its metadata.

Names resolve to files in `$PROMPTCLIP_WEIGHTS` (default `~/.cache/promptclip/weights`); nothing here touches
the network. `load_clip(name, weights="random")` builds randomly initialised weights instead.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from promptclip.clip.model import CLIP, ArchConfig
from promptclip.io import atomic_write_with, sha256_file, sha256_files

__all__ = [
    "ACCEPTED_LAYOUTS",
    "RANDOM_WEIGHTS",
    "WEIGHTS_ENV",
    "Checkpoint",
    "MissingWeightsError",
    "WeightsError",
    "arch_config",
    "available_archs",
    "build_clip",
    "canonical_name",
    "describe_archs",
    "export_hf",
    "find_weights",
    "hf_config_dict",
    "hf_to_openai",
    "load_checkpoint",
    "load_clip",
    "openai_to_hf",
    "parameter_count",
    "save_clip",
    "sha256_file",
    "weights_dir",
]

WEIGHTS_ENV = "PROMPTCLIP_WEIGHTS"
DEFAULT_WEIGHTS_DIR = "~/.cache/promptclip/weights"
RANDOM_WEIGHTS = "random"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".pt", ".safetensors", ".pth", ".bin")
ARCH_METADATA_KEY = "promptclip_arch"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_SHARD_INDEX = "model.safetensors.index.json"

ACCEPTED_LAYOUTS = (
    "OpenAI CLIP (TorchScript archive or state dict; keys like 'visual.conv1.weight', 'token_embedding.weight')",
    "open_clip checkpoint (OpenAI keys, optionally under 'state_dict' and with a 'module.' prefix)",
    "Hugging Face CLIPModel (keys like 'text_model.embeddings.token_embedding.weight')",
)

# OpenAI's own spellings of the architectures and of its published file names.
_NAME_ALIASES = {"ViT-L/14@336px": "ViT-L-14-336", "ViT-L-14@336px": "ViT-L-14-336", "ViT-L-14-336px": "ViT-L-14-336"}
_OPENAI_FILE_STEMS = {"ViT-L-14-336": ("ViT-L-14-336px",)}

# Entries of OpenAI's archives (and of older HF checkpoints) that are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
_NON_PARAMETER_SUFFIXES = ("position_ids", "attn_mask")
_OPTIONAL_KEY_SUFFIX = "num_batches_tracked"  # BatchNorm's step counter: unused in eval mode


class WeightsError(ValueError):
    """A weights file that cannot be loaded (or loaded safely); the message says why and what to do."""


class MissingWeightsError(WeightsError):
    """No weights file found for an architecture name; the message says where to put one."""


@dataclass
class Checkpoint:
    """The tensors of one weights file in OpenAI layout (fp32), with where they came from."""

    state_dict: dict[str, torch.Tensor]
    source: Path
    sha256: str
    layout: str  # "openai-torchscript", "openai", "hf" or "promptclip"
    arch: ArchConfig | None = None  # stated by the file (promptclip metadata or HF config.json), else None


# --------------------------------------------------------------------------------------------------------
# Architecture names
# --------------------------------------------------------------------------------------------------------


def _archs_dir() -> Path:
    return Path(__file__).with_name("archs")


def _assets_dir() -> Path:
    """Bundled ready-to-use models: `<name>.json` (ArchConfig) beside `<name>.safetensors`."""
    return Path(str(importlib.resources.files("promptclip"))) / "assets"


def _bundled_names() -> list[str]:
    folder = _assets_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".safetensors").is_file())


def _arch_json_names() -> list[str]:
    return sorted(p.stem for p in _archs_dir().glob("*.json"))


def available_archs() -> list[str]:
    """Names `load_clip` accepts: every architecture config, then the bundled models."""
    return [*_arch_json_names(), *(n for n in _bundled_names() if n not in _arch_json_names())]


def canonical_name(name: str) -> str | None:
    """`ViT-B/16`, `vit-b-16` and `ViT-B-16` all name `ViT-B-16`; None for an unknown name."""
    name = _NAME_ALIASES.get(name, name).replace("/", "-")
    by_lower = {known.lower(): known for known in available_archs()}
    return by_lower.get(name.lower())


def arch_config(name: str | os.PathLike[str]) -> ArchConfig:
    """The ArchConfig of a known architecture name, a bundled model, or an architecture JSON file."""
    if str(name).endswith(".json") and Path(name).is_file():
        return ArchConfig.from_json(Path(name))
    known = canonical_name(str(name))
    if known is None:
        raise WeightsError(f"unknown architecture {str(name)!r}; known: {', '.join(available_archs())}")
    path = _archs_dir() / f"{known}.json"
    return ArchConfig.from_json(path if path.is_file() else _assets_dir() / f"{known}.json")


def _known_configs() -> list[ArchConfig]:
    return [ArchConfig.from_json(p) for p in sorted(_archs_dir().glob("*.json"))]


def _without_heads(cfg: ArchConfig) -> ArchConfig:
    return dataclasses.replace(
        cfg,
        name="",
        vision=dataclasses.replace(cfg.vision, heads=0),
        text=dataclasses.replace(cfg.text, heads=0),
    )


def _match_known(cfg: ArchConfig, heads_known: bool) -> ArchConfig | None:
    """The known architecture with these shapes (and these heads, when the file states them)."""
    for known in _known_configs():
        if heads_known and dataclasses.replace(known, name="") == dataclasses.replace(cfg, name=""):
            return known
        if not heads_known and _without_heads(known) == _without_heads(cfg):
            return known
    return None


# --------------------------------------------------------------------------------------------------------
# Where names resolve
# --------------------------------------------------------------------------------------------------------


def weights_dir() -> Path:
    """`$PROMPTCLIP_WEIGHTS`, or `~/.cache/promptclip/weights`."""
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR).expanduser()


def _candidate_paths(name: str) -> list[Path]:
    folder = weights_dir()
    stems = (name, *_OPENAI_FILE_STEMS.get(name, ()))
    files = [folder / f"{stem}{suffix}" for stem in stems for suffix in WEIGHT_SUFFIXES]
    return [*files, folder / name]


def find_weights(name: str) -> Path | None:
    """The first weights file (or HF folder) for architecture `name` in the weights folder, if any."""
    for path in _candidate_paths(name):
        if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
            return path
    return None


def _missing_weights_error(name: str) -> MissingWeightsError:
    folder = weights_dir()
    looked = ", ".join(p.name for p in _candidate_paths(name)[:-1]) + f", {name}/ (Hugging Face folder)"
    return MissingWeightsError(
        f"no weights for {name!r}: put the file at {folder / (name + '.pt')} (looked in {folder} for {looked}; "
        f"set ${WEIGHTS_ENV} to use another folder), or pass the file: load_clip({name!r}, weights='path'). "
        f"For random weights use load_clip({name!r}, weights={RANDOM_WEIGHTS!r}). Nothing is downloaded."
    )


# --------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------


def _is_torchscript_archive(path: Path) -> bool:
    # A torch.save zip holds data.pkl and tensors only; TorchScript adds compiled code and constants.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    # torch.jit.load compiles the archive's TorchScript code; only its tensors are kept. Callers reach this
    # only for a file the user supplied.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise WeightsError(f"{path}: not a readable TorchScript archive ({_first_line(err)})") from err
    return dict(module.state_dict())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _refused_pickle(path: Path, err: pickle.UnpicklingError) -> WeightsError:
    rejected = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    what = f" (it refers to {rejected.group(1)})" if rejected else ""
    return WeightsError(
        f"{path}: refused: not a plain tensor file{what}. Loading it would run code stored in the pickle, "
        "so it is not loaded. If you trust its source, convert it once with your own script "
        "(torch.load(..., weights_only=False), then save the state dict with safetensors or torch.save) "
        "and load the converted file."
    )


def _read_pickle(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused_pickle(path, err) from err
    except Exception as err:  # the restricted unpickler fails on garbage with assorted error types
        raise WeightsError(f"{path}: not a readable PyTorch file ({_first_line(err)})") from err


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path), device="cpu"), metadata
    except Exception as err:  # safetensors raises its own error types
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(err)})") from err


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: open_clip and trainers nest it under `state_dict` or `model`."""
    for _ in range(2):
        if isinstance(obj, Mapping) and not _holds_tensors(obj):
            inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping) or not _holds_tensors(obj):
        kind = type(obj).__name__
        keys = f" with keys {_preview(obj.keys())}" if isinstance(obj, Mapping) else ""
        raise WeightsError(
            f"{path}: holds a {kind}{keys}, not a state dict of tensors; accepted layouts: "
            + "; ".join(ACCEPTED_LAYOUTS)
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _holds_tensors(obj: Mapping[object, object]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _preview(keys: Iterable[object], count: int = 5) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(repr(k) for k in keys[:count])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > count else shown


def _to_fp32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # OpenAI archives are fp16; parameters are kept fp32 (autocast lowers precision at run time).
    return {
        k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
        if k not in _NON_PARAMETER_KEYS and not k.endswith(_NON_PARAMETER_SUFFIXES)
    }


def _is_hf_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in state)


def _is_openai_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return "token_embedding.weight" in state or any(k.startswith("visual.") for k in state)


def _to_openai_layout(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if _is_hf_layout(state):
        return hf_to_openai(state, source=path), "hf"
    if _is_openai_layout(state):
        return state, "openai"
    raise WeightsError(
        f"{path}: unknown key layout (keys {_preview(sorted(state))}); accepted layouts: " + "; ".join(ACCEPTED_LAYOUTS)
    )


def _read_file(path: Path) -> Checkpoint:
    arch: ArchConfig | None = None
    if path.suffix == ".safetensors":
        raw, metadata = _read_safetensors(path)
        layout = "openai"
        if ARCH_METADATA_KEY in metadata:
            arch, layout = _metadata_arch(metadata[ARCH_METADATA_KEY], path), "promptclip"
    elif _is_torchscript_archive(path):
        raw, layout = _read_torchscript(path), "openai-torchscript"
    else:
        raw, layout = _unwrap(_read_pickle(path), path), "openai"
    state, mapped_layout = _to_openai_layout(_to_fp32(raw), path)
    return Checkpoint(
        state_dict=state,
        source=path,
        sha256=sha256_file(path),
        layout=layout if mapped_layout == "openai" else mapped_layout,
        arch=arch,
    )


def _metadata_arch(text: str, path: Path) -> ArchConfig:
    try:
        return ArchConfig.from_dict(json.loads(text))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{path}: metadata field {ARCH_METADATA_KEY!r} is not a valid architecture ({err})") from err


def _hf_weight_files(folder: Path) -> list[Path]:
    index = folder / HF_SHARD_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise WeightsError(
        f"{folder}: a Hugging Face folder needs {' or '.join(HF_WEIGHT_FILES)} (or {HF_SHARD_INDEX}) "
        "beside config.json; none was found"
    )


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    return _unwrap(_read_pickle(path), path)


def _read_hf_folder(folder: Path) -> Checkpoint:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WeightsError(f"{config_path}: not a readable JSON config ({err})") from err
    files = _hf_weight_files(folder)
    raw: dict[str, torch.Tensor] = {}
    for path in files:
        raw.update(_read_hf_weights(path))
    state = _to_fp32(raw)
    if not _is_hf_layout(state):
        raise WeightsError(
            f"{files[0]}: not in Hugging Face CLIPModel layout (keys {_preview(sorted(state))}); "
            "an OpenAI-layout file should be loaded by its own path"
        )
    state = hf_to_openai(state, source=files[0])
    try:
        inferred = ArchConfig.from_state_dict(state, name=folder.name)
    except ValueError as err:
        raise WeightsError(f"{files[0]}: {err}") from err
    stated = _apply_hf_config(inferred, config, config_path)
    return Checkpoint(
        state_dict=state,
        source=files[0] if len(files) == 1 else folder,
        sha256=sha256_files(files),
        layout="hf",
        arch=_match_known(stated, heads_known=True) or stated,
    )


def _hf_sub_config(config: Mapping[str, object], tower: str) -> Mapping[str, object]:
    # Old configs spell the sub-configs `text_config_dict`/`vision_config_dict`.
    sub = config.get(f"{tower}_config") or config.get(f"{tower}_config_dict") or {}
    return sub if isinstance(sub, Mapping) else {}


def _apply_hf_config(inferred: ArchConfig, config: Mapping[str, object], path: Path) -> ArchConfig:
    """The inferred shapes with the head counts of config.json (HF's defaults where a field is omitted)."""
    if config.get("model_type", "clip") != "clip":
        raise WeightsError(f"{path}: model_type {config.get('model_type')!r} is not 'clip'")
    text, vision = _hf_sub_config(config, "text"), _hf_sub_config(config, "vision")
    for tower, sub in (("text_config", text), ("vision_config", vision)):
        act = sub.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise WeightsError(
                f"{path}: {tower}.hidden_act is {act!r}; this backbone implements OpenAI CLIP's quick_gelu "
                "only, so the features would be wrong"
            )
        eps = float(sub.get("layer_norm_eps", 1e-5))  # type: ignore[arg-type]
        if abs(eps - 1e-5) > 1e-12:
            raise WeightsError(f"{path}: {tower}.layer_norm_eps is {eps}; this backbone uses 1e-5")
    return dataclasses.replace(
        inferred,
        text=dataclasses.replace(inferred.text, heads=int(text.get("num_attention_heads", 8))),  # type: ignore[call-overload]
        vision=dataclasses.replace(inferred.vision, heads=int(vision.get("num_attention_heads", 12))),  # type: ignore[call-overload]
    )


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read any accepted weights file or HF folder into an OpenAI-layout fp32 state dict.

    Pickles are read with `weights_only=True` only: a pickle that needs code to load is refused. A TorchScript
    archive is opened with `torch.jit.load`: pass only archives you trust."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path}: a folder must be a Hugging Face CLIPModel folder with config.json")
        return _read_hf_folder(path)
    if not path.is_file():
        raise MissingWeightsError(f"{path}: no such weights file")
    return _read_file(path)


# --------------------------------------------------------------------------------------------------------
# Hugging Face <-> OpenAI key maps
# --------------------------------------------------------------------------------------------------------

# (HF tower prefix, OpenAI tower prefix)
_HF_TOWERS = (("text_model.", ""), ("vision_model.", "visual."))
# Renames inside a tower, outside the blocks (HF name -> OpenAI name, both after the tower prefix).
_HF_TOWER_RENAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "pre_layrnorm.weight": "ln_pre.weight",  # sic: HF spells it "layrnorm"
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# Renames inside one transformer block (prefix -> prefix).
_HF_BLOCK_RENAMES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
# Projections: HF stores nn.Linear weights [embed, width], OpenAI the matrix [width, embed].
_HF_PROJECTIONS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OPENAI_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_QKV = ("q", "k", "v")


def _rename_hf_block(rest: str) -> str | None:
    return next((new + rest[len(old) :] for old, new in _HF_BLOCK_RENAMES.items() if rest.startswith(old)), None)


def hf_to_openai(
    state: Mapping[str, torch.Tensor], source: str | os.PathLike[str] = "state dict"
) -> dict[str, torch.Tensor]:
    """Map a Hugging Face `CLIPModel` state dict to OpenAI's key layout (q/k/v concatenated, projections
    transposed). Keys it does not know raise, listing a few of them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # OpenAI in_proj key -> {"q": ..., "k": ..., "v": ...}
    unknown: list[str] = []
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "logit_scale":
            out[key] = tensor
        elif key in _HF_PROJECTIONS:
            out[_HF_PROJECTIONS[key]] = tensor.t().contiguous()
        elif not _map_hf_tower_key(key, tensor, out, qkv):
            unknown.append(key)
    for target, parts in qkv.items():
        if set(parts) != set(_QKV):
            unknown.append(f"{target} (missing {sorted(set(_QKV) - set(parts))} projections)")
            continue
        out[target] = torch.cat([parts[p] for p in _QKV], dim=0)
    if unknown:
        raise WeightsError(f"{source}: Hugging Face keys with no OpenAI counterpart: {_preview(unknown)}")
    return out


def _map_hf_tower_key(
    key: str, tensor: torch.Tensor, out: dict[str, torch.Tensor], qkv: dict[str, dict[str, torch.Tensor]]
) -> bool:
    for hf_prefix, openai_prefix in _HF_TOWERS:
        if not key.startswith(hf_prefix):
            continue
        rest = key[len(hf_prefix) :]
        if rest in _HF_TOWER_RENAMES:
            out[openai_prefix + _HF_TOWER_RENAMES[rest]] = tensor
            return True
        block = _HF_BLOCK.fullmatch(rest)
        if block is None:
            return False
        index, inner = block.groups()
        base = f"{openai_prefix}transformer.resblocks.{index}."
        projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", inner)
        if projection is not None:
            letter, kind = projection.groups()
            qkv.setdefault(f"{base}attn.in_proj_{kind}", {})[letter] = tensor
            return True
        renamed = _rename_hf_block(inner)
        if renamed is None:
            return False
        out[base + renamed] = tensor
        return True
    return False


def openai_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an OpenAI-layout state dict of a ViT CLIP to Hugging Face `CLIPModel` keys (the inverse of
    `hf_to_openai`). Hugging Face has no ResNet CLIP, so a ResNet image tower raises."""
    if any(k.startswith(("visual.attnpool.", "visual.layer1.")) for k in state):
        raise WeightsError("Hugging Face CLIPModel has no ResNet image tower; only ViT CLIPs can be exported")
    tower_renames = {v: k for k, v in _HF_TOWER_RENAMES.items()}
    block_renames = {v: k for k, v in _HF_BLOCK_RENAMES.items()}
    projections = {v: k for k, v in _HF_PROJECTIONS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "logit_scale":
            out[key] = tensor
            continue
        if key in projections:
            out[projections[key]] = tensor.t().contiguous()
            continue
        hf_prefix, rest = (
            ("vision_model.", key[len("visual.") :]) if key.startswith("visual.") else ("text_model.", key)
        )
        if rest in tower_renames:
            out[hf_prefix + tower_renames[rest]] = tensor
            continue
        block = _OPENAI_BLOCK.fullmatch(rest)
        if block is None:
            raise WeightsError(f"no Hugging Face counterpart for key {key!r}")
        index, inner = block.groups()
        base = f"{hf_prefix}encoder.layers.{index}."
        if inner.startswith("attn.in_proj_"):
            kind = inner[len("attn.in_proj_") :]
            for letter, part in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                out[f"{base}self_attn.{letter}_proj.{kind}"] = part.contiguous()
            continue
        old = next((o for o in block_renames if inner.startswith(o)), None)
        if old is None:
            raise WeightsError(f"no Hugging Face counterpart for key {key!r}")
        out[base + block_renames[old] + inner[len(old) :]] = tensor
    return out


def hf_config_dict(cfg: ArchConfig) -> dict[str, object]:
    """A Hugging Face `CLIPConfig` (as config.json content) for a ViT architecture."""
    if not cfg.vision.is_vit:
        raise WeightsError(f"{cfg.name}: Hugging Face CLIPModel has no ResNet image tower")
    common = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim}
    text = cfg.text
    vision = cfg.vision
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "text_config": {
            **common,
            "model_type": "clip_text_model",
            "hidden_size": text.width,
            "intermediate_size": 4 * text.width,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "vocab_size": text.vocab_size,
            "bos_token_id": 49406,
            "eos_token_id": 49407,  # pool at the first end-of-text token, as OpenAI's argmax does
        },
        "vision_config": {
            **common,
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": 4 * vision.width,
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
        },
    }


# --------------------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------------------


def _expected_tensors(cfg: ArchConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in CLIP(cfg).state_dict().items()}


def _check_keys_and_shapes(state: dict[str, torch.Tensor], cfg: ArchConfig, source: Path) -> None:
    expected = _expected_tensors(cfg)
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_KEY_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [
            f"missing {_preview(missing)}" if missing else "",
            f"unexpected {_preview(unexpected)}" if unexpected else "",
        ]
        raise WeightsError(
            f"{source}: keys do not match architecture {cfg.name!r}: " + "; ".join(p for p in parts if p)
        )
    for key, shape in expected.items():
        if key in state and state[key].shape != shape:
            raise WeightsError(
                f"{source}: {key!r} has shape {tuple(state[key].shape)}, architecture {cfg.name!r} expects "
                f"{tuple(shape)}; load it without a name to infer the architecture, or name the right one"
            )


def _choose_arch(checkpoint: Checkpoint, requested: ArchConfig | None) -> ArchConfig:
    stated = checkpoint.arch
    if requested is not None:
        if stated is not None and (stated.vision.heads, stated.text.heads) != (
            requested.vision.heads,
            requested.text.heads,
        ):
            raise WeightsError(
                f"{checkpoint.source}: the file states {stated.vision.heads} image / {stated.text.heads} text "
                f"attention heads, architecture {requested.name!r} has {requested.vision.heads} / "
                f"{requested.text.heads}; load it without a name"
            )
        return requested
    if stated is not None:
        return stated
    inferred = ArchConfig.from_state_dict(checkpoint.state_dict, name=checkpoint.source.stem)
    return _match_known(inferred, heads_known=False) or inferred


def _frozen(model: CLIP, device: str | torch.device) -> CLIP:
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def build_clip(checkpoint: Checkpoint, requested: ArchConfig | None = None) -> CLIP:
    """A CLIP holding the checkpoint's tensors (no copy), its architecture checked against `requested`."""
    try:
        cfg = _choose_arch(checkpoint, requested)
    except ValueError as err:
        if isinstance(err, WeightsError):
            raise
        raise WeightsError(f"{checkpoint.source}: {err}") from err
    state = dict(checkpoint.state_dict)
    _check_keys_and_shapes(state, cfg, checkpoint.source)
    with torch.device("meta"):
        model = CLIP(cfg)  # parameters are allocated by the checkpoint's tensors, not initialised twice
    for key, value in model.state_dict().items():
        if key not in state:  # only the optional BatchNorm step counters reach here
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.weights_sha256 = checkpoint.sha256
    model.weights_source = str(checkpoint.source)
    return model


def _looks_like_path(value: str | os.PathLike[str]) -> bool:
    text = str(value)
    return isinstance(value, os.PathLike) or text.endswith((*WEIGHT_SUFFIXES, ".json")) or Path(text).exists()


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[ArchConfig | None, Path]:
    """(requested architecture or None, weights path) for a name or a path."""
    known = None if isinstance(name_or_path, os.PathLike) else canonical_name(str(name_or_path))
    if known is not None:
        if known in _bundled_names() and not (_archs_dir() / f"{known}.json").is_file():
            return ArchConfig.from_json(_assets_dir() / f"{known}.json"), _assets_dir() / f"{known}.safetensors"
        found = find_weights(known)
        if found is None:
            raise _missing_weights_error(known)
        return arch_config(known), found
    if _looks_like_path(name_or_path):
        return None, Path(name_or_path).expanduser()
    raise WeightsError(
        f"{str(name_or_path)!r} is neither a known architecture ({', '.join(available_archs())}) nor an "
        "existing file or folder"
    )


def load_clip(
    name_or_path: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> CLIP:
    """Load a frozen CLIP (eval mode, fp32 parameters, requires_grad False) on `device`.

    * `load_clip("ViT-B/16")`: the weights found for that name in `$PROMPTCLIP_WEIGHTS`;
    * `load_clip("path/to/file.pt")` or an HF folder: any accepted format, architecture inferred;
    * `load_clip("ViT-B/16", weights="path")`: that file, checked against the named architecture;
    * `load_clip("tiny-vit", weights="random")`: random initial weights (tests, benchmarks, pretraining).
    """
    if weights is not None and str(weights) == RANDOM_WEIGHTS:
        model = CLIP(arch_config(name_or_path))
        model.weights_source = RANDOM_WEIGHTS
        return _frozen(model, device)
    if weights is not None:
        requested: ArchConfig | None = arch_config(name_or_path)
        path = Path(weights).expanduser()
    else:
        requested, path = _resolve(name_or_path)
    return _frozen(build_clip(load_checkpoint(path), requested), device)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _cpu_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Fresh contiguous copies: safetensors refuses tensors that share storage.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_clip(model: CLIP, path: str | os.PathLike[str]) -> Path:
    """Write the model as `<path>.safetensors` (architecture in its metadata) and `<stem>.json` beside it,
    each atomically. `load_clip(path)` reads it back, head counts included."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: save_clip writes safetensors; name the file '*.safetensors'")
    arch_json = json.dumps(model.config.to_dict(), indent=2)
    tensors = _cpu_tensors(model.state_dict())
    metadata = {"format": "pt", ARCH_METADATA_KEY: arch_json}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_with(path.with_suffix(".json"), lambda tmp: tmp.write_text(arch_json + "\n"))
    return path


def export_hf(model: CLIP, folder: str | os.PathLike[str]) -> Path:
    """Write a Hugging Face `CLIPModel` folder (config.json + model.safetensors) for a ViT CLIP."""
    folder = Path(folder).expanduser()
    config = json.dumps(hf_config_dict(model.config), indent=2)
    tensors = _cpu_tensors(openai_to_hf(model.state_dict()))
    atomic_write_with(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_with(folder / "config.json", lambda tmp: tmp.write_text(config + "\n"))
    return folder


# --------------------------------------------------------------------------------------------------------
# `promptclip list archs`
# --------------------------------------------------------------------------------------------------------


@functools.cache
def parameter_count(cfg: ArchConfig) -> int:
    """Parameters of an architecture, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in CLIP(cfg).parameters())


def _tower_summary(cfg: ArchConfig) -> str:
    vision = cfg.vision
    if vision.is_vit:
        return f"ViT {vision.layers}x{vision.width}, patch {vision.patch_size}"
    stages = "-".join(str(n) for n in vision.resnet_layers or ())
    return f"ResNet {stages}, width {vision.width}"


def _weights_status(name: str) -> str:
    if name in _bundled_names():
        return f"bundled: {_assets_dir() / (name + '.safetensors')}"
    found = find_weights(name)
    return f"found: {found}" if found is not None else "missing"


def describe_archs() -> str:
    """A table of the architectures: image tower, image size, embed dim, parameters and local weights."""
    header = ("name", "image tower", "image", "embed", "params", "weights")
    rows = [header]
    for name in available_archs():
        cfg = arch_config(name)
        rows.append(
            (
                name,
                _tower_summary(cfg),
                str(cfg.vision.image_size),
                str(cfg.embed_dim),
                f"{parameter_count(cfg) / 1e6:.1f}M",
                _weights_status(name),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows
    ]
    folder = weights_dir()
    lines += [
        "",
        f"Weights folder: {folder} (set ${WEIGHTS_ENV} to change). For a name it looks for <name>.pt, "
        "<name>.safetensors, <name>.pth, <name>.bin, OpenAI's file names (ViT-L-14-336px.pt) and a "
        "Hugging Face folder <name>/; nothing is downloaded.",
        f"Any architecture also builds with random weights: load_clip(name, weights={RANDOM_WEIGHTS!r}).",
    ]
    return "\n".join(line.rstrip() for line in lines)
