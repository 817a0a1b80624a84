"""Load CLIP weights from the files people actually have, into one OpenAI-layout state dict.

Accepted inputs (all end as `CLIP` with OpenAI key names, fp32 parameters, eval mode, frozen):

* an OpenAI TorchScript archive (`ViT-B-16.pt` as published): its tensors are read through `torch.jit.load`,
  which runs the code stored in the archive, so only when the caller says the user named the file
  (`allow_torchscript=True`: a path given on the command line or in Python) or the file was found for an
  architecture name in the weights folder; a path read from a file (a run's config.yaml, a prompt's
  prompt_config.json, a recipe) never opens one. Each opening warns (`TorchScriptWarning`) with the one-line
  conversion to safetensors (`promptclip convert-weights IN OUT`);
* an OpenAI-layout state dict: `.pt`/`.pth`/`.bin` pickles read with `torch.load(weights_only=True)`, or
  `.safetensors`; a `state_dict`/`model` wrapper and a `module.` prefix (as open_clip writes them) are removed;
* a Hugging Face `CLIPModel` folder (`config.json` + `model.safetensors` or `pytorch_model.bin`), or a file in
  that key layout, mapped by `hf_to_openai`;
* promptclip's own `.safetensors` written by `save_clip`, which carries its architecture in its metadata.

The MLP activation (OpenAI's QuickGELU or open_clip's GELU) cannot be read from tensors. It comes from the file
when the file states it (an OpenAI archive or OpenAI's own state dict entries: QuickGELU; a Hugging Face
config.json `hidden_act`; promptclip metadata), else from the name (`ViT-B-16-quickgelu`, `open_clip:ViT-B-16`,
see `clip.arch_names`). A file and a name that disagree are refused; an open_clip checkpoint under a name that
states nothing is refused (open_clip's plain names are GELU, promptclip's QuickGELU); any other state dict that
states nothing loads as QuickGELU with an `ActivationWarning`.

Names resolve to files in `$PROMPTCLIP_WEIGHTS` (default `~/.cache/promptclip/weights`); nothing here touches
the network. `load_clip(name, weights="random")` builds randomly initialised weights instead.

Names and the weights folder are looked up in `clip.arch_names`, the Hugging Face key maps live in
`clip.hf_keys`; this module reads, checks, builds and writes, and re-exports the public names of both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from promptclip.clip.arch_names import (
    OPEN_CLIP_PREFIX,
    RANDOM_WEIGHTS,
    WEIGHTS_ENV,
    arch_config,
    available_archs,
    canonical_name,
    describe_archs,
    find_weights,
    match_known,
    parameter_count,
    resolve,
    split_activation,
    stated_activation,
    weights_dir,
)
from promptclip.clip.errors import (
    ActivationWarning,
    MissingWeightsError,
    TorchScriptRefusedError,
    TorchScriptWarning,
    WeightsError,
    preview,
)
from promptclip.clip.hf_keys import apply_hf_config, hf_config_dict, hf_to_openai, openai_to_hf
from promptclip.clip.model import CLIP, GELU, QUICK_GELU, ArchConfig
from promptclip.io import atomic_write_text, atomic_write_with, sha256_file, sha256_files

__all__ = [
    "ACCEPTED_LAYOUTS",
    "RANDOM_WEIGHTS",
    "WEIGHTS_ENV",
    "ActivationWarning",
    "Checkpoint",
    "MissingWeightsError",
    "TorchScriptRefusedError",
    "TorchScriptWarning",
    "WeightsError",
    "arch_config",
    "available_archs",
    "build_clip",
    "canonical_name",
    "checked_arch",
    "choose_activation",
    "conversion_command",
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

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
ARCH_METADATA_KEY = "promptclip_arch"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_SHARD_INDEX = "model.safetensors.index.json"

ACCEPTED_LAYOUTS = (
    "OpenAI CLIP (TorchScript archive or state dict; keys like 'visual.conv1.weight', 'token_embedding.weight')",
    "open_clip checkpoint (OpenAI keys, optionally under 'state_dict' and with a 'module.' prefix)",
    "Hugging Face CLIPModel (keys like 'text_model.embeddings.token_embedding.weight')",
)

# Entries of OpenAI's archives (and of older HF checkpoints) that are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
_NON_PARAMETER_SUFFIXES = ("position_ids", "attn_mask")
_OPTIONAL_KEY_SUFFIX = "num_batches_tracked"  # BatchNorm's step counter: unused in eval mode


@dataclass
class Checkpoint:
    """The tensors of one weights file in OpenAI layout (fp32), with where they came from."""

    state_dict: dict[str, torch.Tensor]
    source: Path
    sha256: str
    layout: str  # "openai-torchscript", "openai", "hf" or "promptclip"
    arch: ArchConfig | None = None  # stated by the file (promptclip metadata or HF config.json), else None
    activation: str | None = None
    """The MLP activation the file states (see the module docstring), else None."""
    evidence: str = ""
    """What states `activation` ("an OpenAI TorchScript archive", ...), or that the file comes from open_clip
    ("an open_clip training checkpoint (epoch and state_dict)", ...), where it says so; else empty."""


# --------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------


def _is_torchscript_archive(path: Path) -> bool:
    # A torch.save zip holds data.pkl and tensors only; TorchScript adds compiled code and constants.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def conversion_command(path: Path) -> str:
    """The one-line conversion of a TorchScript archive into a safetensors file beside it."""
    return f"promptclip convert-weights {path} {path.with_suffix('.safetensors')}"


def _refuse_torchscript(path: Path) -> TorchScriptRefusedError:
    return TorchScriptRefusedError(
        f"{path}: a TorchScript archive, and opening one runs the code stored in it, so a weights path read "
        "from a file (a run's config.yaml, a prompt's prompt_config.json, a recipe) never opens one. Convert it "
        f"once, on a machine you trust, to plain tensors: `{conversion_command(path)}`, and name the "
        ".safetensors file instead; or, if you trust the archive, name it yourself on the command line "
        f"(--weights FILE, --arch FILE or --opts model.weights FILE) or put it in ${WEIGHTS_ENV} under its "
        "architecture's name (in Python: load_clip(..., allow_torchscript=True))",
        path,
    )


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    # torch.jit.load compiles the archive's TorchScript code; only its tensors are kept. `_read_file` reaches
    # this only when the caller allows it: a file the user named, or found in the weights folder by name.
    warnings.warn(
        TorchScriptWarning(
            f"{path} is a TorchScript archive: opening it runs the code stored in it. Convert it once to plain "
            f"tensors and use the converted file from then on: {conversion_command(path)}"
        ),
        stacklevel=2,
    )
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
        keys = f" with keys {preview(obj.keys())}" if isinstance(obj, Mapping) else ""
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
        f"{path}: unknown key layout (keys {preview(sorted(state))}); accepted layouts: " + "; ".join(ACCEPTED_LAYOUTS)
    )


# File names of open_clip's checkpoints on the Hugging Face hub (open_clip_pytorch_model.bin, ...).
_OPEN_CLIP_FILE_PREFIX = "open_clip_"


def _read_file(path: Path, allow_torchscript: bool) -> Checkpoint:
    arch: ArchConfig | None = None
    activation: str | None = None
    evidence = f"its file name {path.name}" if path.name.startswith(_OPEN_CLIP_FILE_PREFIX) else ""
    if path.suffix == ".safetensors":
        raw, metadata = _read_safetensors(path)
        layout = "openai"
        if ARCH_METADATA_KEY in metadata:
            arch, layout = _metadata_arch(metadata[ARCH_METADATA_KEY], path), "promptclip"
            activation, evidence = arch.activation, "its promptclip metadata"
    elif _is_torchscript_archive(path):
        if not allow_torchscript:
            raise _refuse_torchscript(path)
        raw, layout = _read_torchscript(path), "openai-torchscript"
        activation, evidence = QUICK_GELU, "an OpenAI TorchScript archive"
    else:
        content = _read_pickle(path)
        evidence = _open_clip_evidence(content) or evidence
        raw, layout = _unwrap(content, path), "openai"
        if any(key in raw for key in _NON_PARAMETER_KEYS):
            activation, evidence = QUICK_GELU, f"OpenAI's own entries ({', '.join(_NON_PARAMETER_KEYS)})"
    state, mapped_layout = _to_openai_layout(_to_fp32(raw), path)
    return Checkpoint(
        state_dict=state,
        source=path,
        sha256=sha256_file(path),
        layout=layout if mapped_layout == "openai" else mapped_layout,
        arch=arch,
        activation=activation,
        evidence=evidence,
    )


def _open_clip_evidence(content: object) -> str:
    """How a pickled checkpoint shows it was written by open_clip's trainer, or empty."""
    if not isinstance(content, Mapping):
        return ""
    if isinstance(content.get("state_dict"), Mapping) and "epoch" in content:
        return "an open_clip training checkpoint (epoch and state_dict)"
    inner = content.get("state_dict", content)
    keys = [str(k) for k in inner] if isinstance(inner, Mapping) else []
    if keys and all(key.startswith("module.") for key in keys):
        return "its 'module.' key prefix (a data-parallel training checkpoint)"
    return ""


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
            f"{files[0]}: not in Hugging Face CLIPModel layout (keys {preview(sorted(state))}); "
            "an OpenAI-layout file should be loaded by its own path"
        )
    state = hf_to_openai(state, source=files[0])
    try:
        inferred = ArchConfig.from_state_dict(state, name=folder.name)
    except ValueError as err:
        raise WeightsError(f"{files[0]}: {err}") from err
    stated = apply_hf_config(inferred, config, config_path)
    known = match_known(stated, heads_known=True)
    return Checkpoint(
        state_dict=state,
        source=files[0] if len(files) == 1 else folder,
        sha256=sha256_files(files),
        layout="hf",
        arch=dataclasses.replace(known, activation=stated.activation) if known is not None else stated,
        activation=stated.activation,
        evidence=f"hidden_act in {config_path}",
    )


def load_checkpoint(path: str | os.PathLike[str], *, allow_torchscript: bool = False) -> Checkpoint:
    """Read any accepted weights file or HF folder into an OpenAI-layout fp32 state dict.

    Pickles are read with `weights_only=True` only: a pickle that needs code to load is refused. A TorchScript
    archive is refused (`TorchScriptRefusedError`) unless `allow_torchscript`, which a caller sets only for a
    path the user named (on the command line, in Python) or found for a name in the weights folder; it is then
    opened with `torch.jit.load`, with a `TorchScriptWarning`. HF folders never hold TorchScript."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path}: a folder must be a Hugging Face CLIPModel folder with config.json")
        return _read_hf_folder(path)
    if not path.is_file():
        raise MissingWeightsError(f"{path}: no such weights file")
    return _read_file(path, allow_torchscript)


# --------------------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------------------


def _expected_tensors(cfg: ArchConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in CLIP(cfg).state_dict().items()}


def _check_keys_and_shapes(state: Mapping[str, torch.Tensor], cfg: ArchConfig, source: Path) -> None:
    expected = _expected_tensors(cfg)
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_KEY_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [
            f"missing {preview(missing)}" if missing else "",
            f"unexpected {preview(unexpected)}" if unexpected else "",
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
    return match_known(inferred, heads_known=False) or inferred


def _frozen(model: CLIP, device: str | torch.device) -> CLIP:
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def checked_arch(checkpoint: Checkpoint, requested: ArchConfig | None = None) -> ArchConfig:
    """The architecture to build `checkpoint` with (`requested`, the file's own, or inferred from the shapes),
    its keys and shapes checked against the file's."""
    try:
        cfg = _choose_arch(checkpoint, requested)
    except ValueError as err:
        if isinstance(err, WeightsError):
            raise
        raise WeightsError(f"{checkpoint.source}: {err}") from err
    _check_keys_and_shapes(checkpoint.state_dict, cfg, checkpoint.source)
    return cfg


def build_clip(checkpoint: Checkpoint, requested: ArchConfig | None = None, activation: str | None = None) -> CLIP:
    """A CLIP holding the checkpoint's tensors (no copy), its architecture checked against `requested`; built
    with `activation` when given (else the architecture's own; `load_clip` decides it with `choose_activation`)."""
    cfg = checked_arch(checkpoint, requested)
    if activation is not None and activation != cfg.activation:
        cfg = dataclasses.replace(cfg, activation=activation)
    state = dict(checkpoint.state_dict)
    with torch.device("meta"):
        model = CLIP(cfg)  # parameters are allocated by the checkpoint's tensors, not initialised twice
    for key, value in model.state_dict().items():
        if key not in state:  # only the optional BatchNorm step counters reach here
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.weights_sha256 = checkpoint.sha256
    model.weights_source = str(checkpoint.source)
    return model


def weights_files(name_or_path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None) -> list[Path]:
    """The file(s) `load_clip(name_or_path, weights)` would read, in the order its sha256 covers them, found
    without reading any weights (a run's identity names the backbone before loading it)."""
    path = Path(weights).expanduser() if weights is not None else resolve(name_or_path)[1]
    if path.is_dir():
        return _hf_weight_files(path)
    if not path.is_file():
        raise MissingWeightsError(f"{path}: weights file not found; check --weights / model.weights")
    return [path]


def load_clip(
    name_or_path: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    allow_torchscript: bool = False,
) -> CLIP:
    """Load a frozen CLIP (eval mode, fp32 parameters, requires_grad False) on `device`.

    * `load_clip("ViT-B/16")`: the weights found for that name in `$PROMPTCLIP_WEIGHTS`;
    * `load_clip("path/to/file.pt")` or an HF folder: any accepted format, architecture inferred;
    * `load_clip("ViT-B/16", weights="path")`: that file, checked against the named architecture;
    * `load_clip("tiny-vit", weights="random")`: random initial weights (tests, benchmarks, pretraining).

    A path that is a TorchScript archive is opened only with `allow_torchscript=True`: pass it only for a path
    the user named (never for one read from a file). A file found for a name in `$PROMPTCLIP_WEIGHTS` was put
    there by the user and may be an archive. Either way opening one warns with the conversion to safetensors.
    """
    if weights is not None and str(weights) == RANDOM_WEIGHTS:
        model = CLIP(arch_config(name_or_path))
        model.weights_source = RANDOM_WEIGHTS
        return _frozen(model, device)
    if weights is not None:
        requested: ArchConfig | None = arch_config(name_or_path)
        path = Path(weights).expanduser()
        found_by_name = False
    else:
        requested, path = resolve(name_or_path)
        found_by_name = requested is not None  # the weights folder (or a bundled model), not a path
    checkpoint = load_checkpoint(path, allow_torchscript=allow_torchscript or found_by_name)
    named = str(name_or_path) if requested is not None else None
    stated = stated_activation(name_or_path) if named else None
    # The file is checked first: an activation warning only for a file that loads.
    arch = checked_arch(checkpoint, requested).name
    activation = choose_activation(checkpoint, named, stated, arch)
    return _frozen(build_clip(checkpoint, requested, activation), device)


def choose_activation(checkpoint: Checkpoint, name: str | None, stated: str | None, arch: str) -> str:
    """The MLP activation to build `checkpoint` with: the one the file states, else the one the architecture
    `name` states (`stated`). A file and a name that disagree are refused; so is an open_clip checkpoint whose
    name states nothing (open_clip's plain names are GELU, promptclip's QuickGELU). Any other file that states
    nothing is taken as QuickGELU (OpenAI's) with an `ActivationWarning`. `arch` is the architecture's base
    name, for the messages."""
    source, found = checkpoint.source, checkpoint.activation
    if found is not None and stated is not None and found != stated:
        raise WeightsError(
            f"{source}: {checkpoint.evidence} states a {found} model, but the architecture {name!r} is a {stated} "
            f"one; name it {_activation_name(arch, found)!r} (or leave the name out)"
        )
    if found is not None or stated is not None:
        return found or stated  # type: ignore[return-value]
    label = repr(name) if name else f"{arch}, inferred from the shapes"
    fix = (
        f"name the architecture with its activation: --arch {_activation_name(arch, GELU)} (GELU: open_clip's "
        f"plain names, e.g. LAION-2B and DataComp weights) or --arch {_activation_name(arch, QUICK_GELU)} "
        "(QuickGELU: OpenAI, LAION-400M, MetaCLIP, DFN weights), with --weights FILE"
    )
    if checkpoint.evidence:
        raise WeightsError(
            f"{source}: an open_clip checkpoint ({checkpoint.evidence}); neither it nor the architecture "
            f"({label}) says which MLP activation it was trained with, and the wrong one gives wrong features "
            f"without an error. To load it, {fix}"
        )
    warnings.warn(
        ActivationWarning(
            f"{source}: the file does not say which MLP activation it was trained with; loaded as OpenAI's "
            f"QuickGELU (architecture {label}): an open_clip GELU model would give wrong features. To be sure, "
            f"and silence this warning, {fix}"
        ),
        stacklevel=3,
    )
    return QUICK_GELU


def _activation_name(arch: str, activation: str) -> str:
    """The spelling of architecture `arch` that states `activation`."""
    base = split_activation(arch)[0]
    return f"{OPEN_CLIP_PREFIX}{base}" if activation == GELU else f"{base}-quickgelu"


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
    atomic_write_text(path.with_suffix(".json"), arch_json + "\n")
    return path


def export_hf(model: CLIP, folder: str | os.PathLike[str]) -> Path:
    """Write a Hugging Face `CLIPModel` folder (config.json + model.safetensors) for a ViT CLIP."""
    folder = Path(folder).expanduser()
    config = json.dumps(hf_config_dict(model.config), indent=2)
    tensors = _cpu_tensors(openai_to_hf(model.state_dict()))
    atomic_write_with(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(folder / "config.json", config + "\n")
    return folder
