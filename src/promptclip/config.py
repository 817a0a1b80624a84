"""Typed run configuration: dataclasses, YAML recipes and `--opts key value` overrides.

Every key is checked against the dataclass it lands in: an unknown key or a value of the wrong type is an
error naming the key, where it came from and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from promptclip.io import atomic_write_text
from promptclip.registry import METHODS, PLUGINS

T = TypeVar("T")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


@dataclass
class ModelConfig:
    arch: str = "ViT-B-16"
    """Architecture name (see `promptclip list archs`) or a weights file / folder."""
    weights: str | None = None
    """Weights file when `arch` is a name; None looks in the weights folder."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Autocast dtype for the frozen towers on GPU; parameters, logits and losses stay fp32."""
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    """`torch.compile` the towers while training (evaluation stays eager): `reduce-overhead` also replays each
    tower as a CUDA graph, which pays on a GPU at small batches; off by default (compiling takes a minute)."""


@dataclass
class DataConfig:
    dataset: str = "synthetic_objects"
    root: str | None = None
    shots: int = 16
    """Images per class in the training set; 0 or less keeps every image."""
    subsample: Literal["all", "base", "new"] = "all"
    """Classes trained on: all, or the base / new half (base-to-novel protocol)."""
    batch_size: int = 32
    eval_batch_size: int = 100
    num_workers: int = -1
    """Loader worker processes; -1 (auto): on a GPU every CPU core but one (at most 16), on a CPU none (the
    model's threads use the cores). docs/performance.md has the images per second a worker gives."""
    crop_cache_mb: int = 1024
    """Memory for the evaluation crops kept across the evaluations of a process (a sweep evaluates the same test
    images again and again); 0 keeps none. Bitwise the same batches either way."""
    crop_on_device: bool = False
    """On a GPU, the host only decodes; crop, resize, flip and normalisation run on the GPU. The pixels equal
    the host path's but for one 8-bit level where a rounding tie falls the other way (rare)."""
    augment: Literal["random_resized_crop", "none"] = "random_resized_crop"
    """Training augmentation: the field's random resized crop (`crop_scale`) and horizontal flip (`flip`), or
    `none`: the evaluation transform (short side resized, centre crop), the same pixels every epoch."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the random resized crop, as fractions of the image: [low, high], 0 < low <= high <= 1."""
    flip: bool = True
    """Random horizontal flip (probability 0.5) after the random resized crop."""
    options: dict[str, Any] = field(default_factory=dict)
    """Dataset-specific options (e.g. the synthetic world's `spurious`)."""
    on_bad_image: Literal["error", "skip"] = "error"
    """A missing or unreadable image found before training: stop with the list ("error"), or leave those
    images out of the run and count them in results.json ("skip")."""


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    """Constant learning rate of the warm-up epochs (the field's `WARMUP_TYPE constant`)."""
    grad_accum: int = 1
    max_grad_norm: float | None = None


@dataclass
class RunConfig:
    method: str = "coop"
    """A method, optionally with plug-ins: `maple+dapt`, `coop+dpc`."""
    method_cfg: Any = None
    """The method's own config dataclass (see `promptclip list methods`)."""
    plugins: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 1
    device: str = "auto"
    output_dir: str = "runs"

    @property
    def method_name(self) -> str:
        return self.method.split("+")[0]

    @property
    def plugin_names(self) -> list[str]:
        return self.method.split("+")[1:]


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with checks
# ---------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if isinstance(tp, type) and is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where=key)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = get_args(tp)[0] if get_args(tp) else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string; a user means the number
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and values of the wrong type."""
    types_ = _field_types(cls)
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)}; "
            f"allowed: {', '.join(prefix + k for k in types_)}"
        )
    values = {name: _coerce(value, types_[name], prefix + name) for name, value in data.items()}
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """Plain YAML-friendly data of a (nested) dataclass."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------
# Run configs: method-specific sections resolved through the registries
# ---------------------------------------------------------------------------------------------------------


def _method_config_class(name: str) -> type:
    return METHODS.get(name).Config  # type: ignore[no-any-return]


def _plugin_config_class(name: str) -> type:
    return PLUGINS.get(name).Config  # type: ignore[no-any-return]


def build_run_config(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    """A RunConfig from plain data (a parsed recipe), method and plug-in sections checked against their
    own dataclasses."""
    data = dict(data)
    method = data.get("method", RunConfig.method)
    if not isinstance(method, str) or not method:
        raise ConfigError(f"{source}: method must be a name such as 'coop' or 'maple+dapt'")
    run_cfg_data = {k: v for k, v in data.items() if k not in ("method_cfg", "plugins")}
    try:
        cfg = from_dict(RunConfig, run_cfg_data)
        cfg.method_cfg = from_dict(
            _method_config_class(cfg.method_name), data.get("method_cfg") or {}, where="method_cfg"
        )
        plugin_data = data.get("plugins") or {}
        extra = sorted(set(plugin_data) - set(cfg.plugin_names))
        if extra:
            raise ConfigError(f"plugins: {', '.join(extra)} configured but not in method {method!r}")
        cfg.plugins = {
            name: from_dict(_plugin_config_class(name), plugin_data.get(name) or {}, where=f"plugins.{name}")
            for name in cfg.plugin_names
        }
    except (ConfigError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"{source}: {message}") from None
    check_run_config(cfg, source)
    return cfg


# key: (test of the value, what the value must be)
_VALUE_RULES: dict[str, tuple[Any, str]] = {
    "optim.epochs": (lambda v: v >= 1, "at least 1"),
    "optim.lr": (lambda v: math.isfinite(v) and v > 0, "a number greater than 0"),
    "optim.warmup_epochs": (lambda v: v >= 0, "0 or more"),
    "optim.warmup_lr": (lambda v: math.isfinite(v) and v >= 0, "a number, 0 or more"),
    "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a number, 0 or more"),
    "optim.grad_accum": (lambda v: v >= 1, "at least 1"),
    "optim.max_grad_norm": (lambda v: v is None or (math.isfinite(v) and v > 0), "null or a number greater than 0"),
    "data.batch_size": (lambda v: v >= 1, "at least 1"),
    "data.eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "data.num_workers": (lambda v: v >= -1, "-1 (auto: as many as the device needs), 0 or more"),
    "data.crop_cache_mb": (lambda v: v >= 0, "0 (keep no crops) or more"),
    "data.crop_scale": (
        lambda v: len(v) == 2 and all(math.isfinite(x) for x in v) and 0 < v[0] <= v[1] <= 1,
        "two numbers [low, high] with 0 < low <= high <= 1, such as [0.5, 1.0]",
    ),
    "seed": (lambda v: v >= 0, "0 or more"),
}


def check_run_config(cfg: RunConfig, source: str = "config") -> None:
    """Refuse values no run can use (0 epochs, a negative learning rate, ...), naming the key and the fix, so a
    bad value stops `run --dry-run` and every command before any work."""
    for key, (allowed, requirement) in _VALUE_RULES.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if not allowed(value):
            raise ConfigError(f"{source}: {key} is {value!r}; it must be {requirement} (e.g. --opts {key} VALUE)")


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (method, model, data, optim, ...)")
    return data


def apply_overrides(data: dict[str, Any], opts: Sequence[str]) -> dict[str, Any]:
    """Apply `key value` pairs (dotted keys, YAML-parsed values) to plain recipe data. Type checks happen in
    `build_run_config`, which sees the merged result."""
    if len(opts) % 2:
        raise ConfigError(f"--opts takes key value pairs; {opts[-1]!r} has no value")
    merged = _deep_copy(data)
    for key, raw in zip(opts[::2], opts[1::2], strict=True):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--opts {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return merged


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_run_config(recipe: str | Path | None = None, opts: Sequence[str] = ()) -> RunConfig:
    data = load_recipe(recipe) if recipe is not None else {}
    source = str(recipe) if recipe is not None else "config"
    return build_run_config(apply_overrides(data, opts), source=source)


def dump_run_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(obj: T, **changes: Any) -> T:
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
