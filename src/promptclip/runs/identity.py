"""A run's identity: everything that can change its numbers, and nothing else.

The identity is a flat mapping of dotted keys (`optim.lr`, `method_cfg.n_ctx`, `plugins.dpc.omega_b`,
`backbone.weights_sha256`, ...) to JSON values. Two runs with equal identities compute the same numbers; a
sweep reuses a finished run only when its identity is equal, and never writes over a run of another one.

Left out on purpose: where the data and the runs live (`data.root`, `output_dir`), how the work is spread
(`device`, `data.num_workers`, `data.eval_batch_size`, `data.crop_cache_mb`; `model.compile` and PromptKD's
`method_cfg.teacher_cache_mb`, which like a change of device change the float rounding only), and the recipe's
*name* (its content is in). Keys added to the config after runs were recorded (`LATER_KEYS`) enter only with
values other than their defaults, so the runs recorded before keep their identities; `data.crop_scale` and
`data.flip` do not enter at all with `data.augment none`, where they change nothing.

Three fingerprints are derived from it:
* `run_id`: the whole identity (one run);
* `variant_id`: without the keys a run folder's leaf already names (seed, shots, ratio, selector), shared by
  every run of one variant of a recipe, which therefore share one recipe folder;
* `training_id`: without the protocol and evaluation targets: equal when one trained prompt serves both
  (domain generalisation evaluates the cross-dataset ImageNet prompts).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from promptclip.config import DataConfig, RunConfig, to_dict

LEAF_KEYS = frozenset({"seed", "data.shots", "data.ratio", "data.selector"})
EVALUATION_KEYS = frozenset({"protocol", "targets"})
# Run-config keys that cannot change a run's numbers (see the module docstring).
NEUTRAL_KEYS = frozenset(
    {
        "output_dir",
        "device",
        "data.root",
        "data.num_workers",
        "data.eval_batch_size",
        "data.crop_cache_mb",
        "model.compile",
        "method_cfg.teacher_cache_mb",
    }
)
SHORT = 8  # hex digits of a fingerprint shown in folder names and labels
_DATA_DEFAULTS = to_dict(DataConfig())
# Keys added after the first runs were recorded, with the value those runs used: absent at that value.
LATER_KEYS: dict[str, Any] = {
    f"data.{key}": _DATA_DEFAULTS[key] for key in ("augment", "crop_scale", "flip", "crop_on_device")
}
_RANDOM_AUGMENT_KEYS = ("data.crop_scale", "data.flip")  # no effect without random augmentation


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists stay values (a list is one setting)."""
    if isinstance(data, Mapping) and (data or not prefix):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: _json_value(data)}


def _json_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def fingerprint(values: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `values` (sorted keys, no spaces)."""
    text = json.dumps(dict(values), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    values: Mapping[str, Any]

    @property
    def run_id(self) -> str:
        return fingerprint(self.values)

    @property
    def variant_id(self) -> str:
        return fingerprint(self.variant_values)

    @property
    def training_id(self) -> str:
        return fingerprint({k: v for k, v in self.values.items() if not _evaluation_key(k)})

    @property
    def variant_values(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k not in LEAF_KEYS}

    def to_json(self) -> dict[str, Any]:
        return dict(sorted(self.values.items()))


def _evaluation_key(key: str) -> bool:
    """Keys that say what a run evaluates on, not how it trains: the protocol, the targets and their data."""
    return key in EVALUATION_KEYS or key.startswith("targets.")


def config_identity(cfg: RunConfig) -> dict[str, Any]:
    """The identity keys of a run config: every key but the neutral ones and the dataset options (which
    `run_identity` takes from the datasets' own root-independent identities)."""
    values = flatten(to_dict(cfg))
    if values.get("data.augment") == "none":
        values = {k: v for k, v in values.items() if k not in _RANDOM_AUGMENT_KEYS}
    return {
        k: v
        for k, v in values.items()
        if k not in NEUTRAL_KEYS and not k.startswith("data.options") and not _later_key_at_default(k, v)
    }


def _later_key_at_default(key: str, value: Any) -> bool:
    return key in LATER_KEYS and value == LATER_KEYS[key]


def run_identity(
    cfg: RunConfig,
    *,
    protocol: str,
    targets: Sequence[Mapping[str, Any]],
    dataset_name: str,
    datasets: Mapping[str, Mapping[str, Any]],
    backbone: Mapping[str, Any],
    target_datasets: Mapping[str, Mapping[str, Any]] | None = None,
    ratio: float | None = None,
    selector: str | None = None,
    stage1: RunIdentity | None = None,
    learner: Mapping[str, Any] | None = None,
) -> RunIdentity:
    """The identity of one run of `cfg` (dataset, shots, class subset and seed filled in by the spec).

    `dataset_name` is the training data's name (an own dataset's `--name`); `datasets` holds the identity of
    the training data, independent of where it lives (`data.source.<dataset>.*`: name, options, the content of
    files that options name), `target_datasets` that of the other datasets it evaluates on (`targets.data.*`);
    `backbone` holds `arch` and `weights_sha256`; `stage1` is the identity
    of a run this one starts from (its keys go under `stage1.`); `learner` holds the keys the learner adds
    (`RunNeeds.identity`)."""
    values = config_identity(cfg)
    values["data.dataset"] = dataset_name
    for dataset, identity in sorted(datasets.items()):
        values.update(flatten(dict(identity), f"data.source.{dataset}."))
    for dataset, identity in sorted((target_datasets or {}).items()):
        values.update(flatten(dict(identity), f"targets.data.{dataset}."))
    values.update({f"backbone.{k}": _json_value(v) for k, v in backbone.items()})
    values["protocol"] = protocol
    values["targets"] = [_json_value(dict(t)) for t in targets]
    if ratio is not None:
        values["data.ratio"] = ratio
        values["data.selector"] = selector
    if stage1 is not None:
        values.update({f"stage1.{k}": v for k, v in stage1.values.items() if k not in LEAF_KEYS})
    values.update({k: _json_value(v) for k, v in (learner or {}).items()})
    return RunIdentity(values)


# -- telling variants apart ----------------------------------------------------------------------------------
def differing_keys(identities: Iterable[Mapping[str, Any]]) -> list[str]:
    """The keys whose values are not the same in every one of `identities` (a missing key counts as a value)."""
    identities = list(identities)
    keys = sorted({k for values in identities for k in values})
    missing = object()
    return [k for k in keys if len({_hashable(v.get(k, missing)) for v in identities}) > 1]


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def variant_label(values: Mapping[str, Any], keys: Sequence[str], limit: int = 3) -> str:
    """`optim.lr=0.5, method_cfg.csc=true` for the differing `keys` (the first `limit`, then `+N`)."""
    shown = [f"{k}={_short_value(values.get(k))}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"+{len(keys) - limit}")
    return ", ".join(shown)


def _short_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:SHORT]  # a sha256
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."
