"""Architecture names and where their weights are found: the names `load_clip` accepts (architecture configs
in `clip/archs/`, bundled models in `assets/`), the weights folder (`$PROMPTCLIP_WEIGHTS`), and the table of
`promptclip list archs`. Nothing here reads a weights file.

A name may state the MLP activation, which a state dict cannot show. promptclip's plain names (`ViT-B-16`,
OpenAI's `ViT-B/16`) are OpenAI's models, QuickGELU. open_clip's names are accepted with open_clip's meaning:
`ViT-B-16-quickgelu` is QuickGELU (the same model as `ViT-B-16`), and open_clip's plain `ViT-B-16`, GELU (its
LAION-2B and DataComp weights), is written `open_clip:ViT-B-16` or `ViT-B-16-gelu` (its canonical name here).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
from pathlib import Path

import torch

from promptclip.clip.errors import MissingWeightsError, WeightsError
from promptclip.clip.model import CLIP, GELU, QUICK_GELU, ArchConfig

__all__ = [
    "RANDOM_WEIGHTS",
    "WEIGHTS_ENV",
    "WEIGHT_SUFFIXES",
    "arch_config",
    "available_archs",
    "canonical_name",
    "describe_archs",
    "find_weights",
    "match_known",
    "parameter_count",
    "resolve",
    "stated_activation",
    "weights_dir",
]

WEIGHTS_ENV = "PROMPTCLIP_WEIGHTS"
DEFAULT_WEIGHTS_DIR = "~/.cache/promptclip/weights"
RANDOM_WEIGHTS = "random"
WEIGHT_SUFFIXES = (".pt", ".safetensors", ".pth", ".bin")

# OpenAI's own spellings of the architectures and of its published file names.
_NAME_ALIASES = {"ViT-L/14@336px": "ViT-L-14-336", "ViT-L-14@336px": "ViT-L-14-336", "ViT-L-14-336px": "ViT-L-14-336"}
_OPENAI_FILE_STEMS = {"ViT-L-14-336": ("ViT-L-14-336px",)}

# How a name states its activation: open_clip's prefix (its plain names are GELU) and suffixes.
OPEN_CLIP_PREFIX = "open_clip:"
_ACTIVATION_SUFFIXES = {"-quickgelu": QUICK_GELU, "-gelu": GELU}


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


def split_activation(name: str) -> tuple[str, str | None]:
    """(base name, the activation the name states, or None): `open_clip:ViT-B-16` -> (`ViT-B-16`, gelu),
    `ViT-B-16-quickgelu` -> (`ViT-B-16`, quick_gelu), `ViT-B-16-gelu` -> (`ViT-B-16`, gelu), `ViT-B-16` ->
    (`ViT-B-16`, None)."""
    base, stated = name, None
    open_clip = base.lower().startswith(OPEN_CLIP_PREFIX)
    if open_clip:
        base = base[len(OPEN_CLIP_PREFIX) :]
    for suffix, activation in _ACTIVATION_SUFFIXES.items():
        if base.lower().endswith(suffix):
            base, stated = base[: -len(suffix)], activation
            break
    if open_clip and stated is None:
        stated = GELU  # open_clip's plain names build GELU models
    return base, stated


def _known_base(name: str) -> str | None:
    name = _NAME_ALIASES.get(name, name).replace("/", "-")
    by_lower = {known.lower(): known for known in available_archs()}
    return by_lower.get(name.lower())


def canonical_name(name: str) -> str | None:
    """`ViT-B/16`, `vit-b-16`, `ViT-B-16` and open_clip's `ViT-B-16-quickgelu` all name `ViT-B-16` (OpenAI's
    QuickGELU model); open_clip's GELU `ViT-B-16` (`open_clip:ViT-B-16`) is `ViT-B-16-gelu`. None for an unknown
    name."""
    base, stated = split_activation(name)
    known = _known_base(base)
    if known is None:
        return None
    return f"{known}-gelu" if stated == GELU else known


def stated_activation(name: str | os.PathLike[str]) -> str | None:
    """The activation a name states (see `split_activation`), or that an architecture JSON file gives in its
    `activation` field; None for promptclip's plain names (OpenAI's QuickGELU unless the weights say otherwise)
    and for weights paths."""
    text = str(name)
    if text.endswith(".json") and Path(text).is_file():
        try:
            data = json.loads(Path(text).read_text())
        except (OSError, ValueError):
            return None  # arch_config reports the broken file
        value = data.get("activation") if isinstance(data, dict) else None
        return str(value) if value is not None else None
    if isinstance(name, os.PathLike) or canonical_name(text) is None:
        return None
    return split_activation(text)[1]


def arch_config(name: str | os.PathLike[str]) -> ArchConfig:
    """The ArchConfig of a known architecture name (with the activation it states), a bundled model, or an
    architecture JSON file."""
    if str(name).endswith(".json") and Path(name).is_file():
        try:
            return ArchConfig.from_json(Path(name))
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # JSONDecodeError is a ValueError
            raise WeightsError(
                f"{name}: not an architecture file ({type(err).__name__}: {err}); copy one of "
                "promptclip/clip/archs/*.json and edit its values"
            ) from None
    base, stated = split_activation(str(name))
    known = _known_base(base)
    if known is None:
        raise WeightsError(
            f"unknown architecture {str(name)!r}; known: {', '.join(available_archs())} (open_clip's names too: "
            "<name>-quickgelu, open_clip:<name>)"
        )
    path = _archs_dir() / f"{known}.json"
    cfg = ArchConfig.from_json(path if path.is_file() else _assets_dir() / f"{known}.json")
    if stated is None or stated == cfg.activation:
        return cfg
    return dataclasses.replace(cfg, name=canonical_name(str(name)) or cfg.name, activation=stated)


def _known_configs() -> list[ArchConfig]:
    return [ArchConfig.from_json(p) for p in sorted(_archs_dir().glob("*.json"))]


def _without_heads(cfg: ArchConfig) -> ArchConfig:
    return dataclasses.replace(
        cfg,
        name="",
        vision=dataclasses.replace(cfg.vision, heads=0),
        text=dataclasses.replace(cfg.text, heads=0),
    )


def match_known(cfg: ArchConfig, heads_known: bool) -> ArchConfig | None:
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


def _looks_like_path(value: str | os.PathLike[str]) -> bool:
    text = str(value)
    return isinstance(value, os.PathLike) or text.endswith((*WEIGHT_SUFFIXES, ".json")) or Path(text).exists()


def resolve(name_or_path: str | os.PathLike[str]) -> tuple[ArchConfig | None, Path]:
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
        "These names are OpenAI's models (QuickGELU). open_clip's names state their activation: "
        "<name>-quickgelu (QuickGELU: OpenAI, LAION-400M, MetaCLIP, DFN weights) and open_clip:<name> = "
        "<name>-gelu (GELU: open_clip's plain names, LAION-2B and DataComp weights).",
    ]
    return "\n".join(line.rstrip() for line in lines)
