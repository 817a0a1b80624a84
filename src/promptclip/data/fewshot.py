"""Few-shot draws compatible with the field's sampler, their JSON cache, and the base/new class split.

The field's rule (Dassl's `generate_fewshot_dataset`, run right after `set_random_seed(seed)`): group the
train list by label in order of first appearance; per class take `random.sample(items, K)`, or every item
when the class has fewer than K (no random draw is made then); then the val list the same way with
min(K, 4) shots, continuing the same random stream. Only Python's `random` is used by the draw: numpy and
torch are seeded too in the field, but they do not touch it. Here the draw uses its own
`random.Random(seed)`, which produces the same sequence as `random.seed(seed)` followed by module-level
calls, without touching global state. So the same seed picks the same images as the official code on the
same split file (for ImageNet, whose val split is empty here, only train is drawn, as the field does).
K < 1 (0 or -1) means every image.

Draws are cached as JSON (paths relative to the dataset folder) in
`$PROMPTCLIP_CACHE/fewshot/<dataset>/shot_<K>-seed_<S>.json` (default cache `~/.cache/promptclip`), never
inside the data folder. A cached draw is used only if it was drawn from the same train/val lists (a digest
is stored); otherwise it is drawn again and rewritten, so the cache is a record and can never go stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from promptclip.data.datasets.base import DatasetError, DatasetSplits, Datum, write_text_atomic

logger = logging.getLogger("promptclip.data")

FEWSHOT_FORMAT = "promptclip-fewshot/1"
VAL_SHOTS_CAP = 4  # the field draws min(K, 4) validation images per class

Subset = Literal["all", "base", "new"]


def default_cache_root() -> Path:
    """`$PROMPTCLIP_CACHE`, else `$XDG_CACHE_HOME/promptclip`, else `~/.cache/promptclip`."""
    if os.environ.get("PROMPTCLIP_CACHE"):
        return Path(os.environ["PROMPTCLIP_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "promptclip"


def fewshot_cache_path(cache_key: str, shots: int, seed: int, cache_dir: Path | str | None = None) -> Path:
    """Where the draw of `shots` per class with `seed` is cached (`cache_dir` replaces `<cache>/fewshot`)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "fewshot"
    return base / cache_key / f"shot_{shots}-seed_{seed}.json"


@dataclass
class FewShotDraw:
    """The images drawn for one (K, seed), and the classes that had fewer than K (label -> images available)."""

    shots: int
    seed: int
    train: list[Datum]
    val: list[Datum]
    short_train: dict[int, int] = field(default_factory=dict)
    short_val: dict[int, int] = field(default_factory=dict)


def group_by_label(data: Sequence[Datum]) -> dict[int, list[Datum]]:
    """Items per label, labels in order of first appearance (as the field's defaultdict does)."""
    groups: dict[int, list[Datum]] = {}
    for datum in data:
        groups.setdefault(datum.label, []).append(datum)
    return groups


def sample_per_class(data: Sequence[Datum], shots: int, rng: random.Random) -> tuple[list[Datum], dict[int, int]]:
    """`rng.sample(items, shots)` per label; a class with fewer items is taken whole (and reported)."""
    chosen: list[Datum] = []
    short: dict[int, int] = {}
    for label, items in group_by_label(data).items():
        if len(items) >= shots:
            chosen.extend(rng.sample(items, shots))
        else:
            chosen.extend(items)
            short[label] = len(items)
    return chosen, short


def draw_fewshot(train: Sequence[Datum], val: Sequence[Datum], shots: int, seed: int) -> FewShotDraw:
    """The field's draw: K per class from train, then min(K, 4) per class from val, one random stream."""
    if shots < 1:
        return FewShotDraw(shots, seed, list(train), list(val))
    rng = random.Random(seed)
    train_draw, short_train = sample_per_class(train, shots, rng)
    val_draw, short_val = sample_per_class(val, min(shots, VAL_SHOTS_CAP), rng)
    return FewShotDraw(shots, seed, train_draw, val_draw, short_train, short_val)


def lists_digest(train: Sequence[Datum], val: Sequence[Datum]) -> str:
    """A digest of the lists a draw comes from, so a cached draw of other lists is never reused."""
    hasher = hashlib.sha256()
    for name, data in (("train", train), ("val", val)):
        hasher.update(name.encode())
        for datum in data:
            hasher.update(f"\0{datum.path}\0{datum.label}".encode())
    return hasher.hexdigest()


def draw_to_json(draw: FewShotDraw, dataset: str, digest: str) -> dict[str, Any]:
    def rows(data: list[Datum]) -> list[list[Any]]:
        return [[datum.path, datum.label, datum.classname] for datum in data]

    return {
        "format": FEWSHOT_FORMAT,
        "dataset": dataset,
        "shots": draw.shots,
        "seed": draw.seed,
        "sampler": "python random.Random(seed).sample per class, train then val with min(K, 4)",
        "lists_digest": digest,
        "short_classes": {"train": draw.short_train, "val": draw.short_val},
        "train": rows(draw.train),
        "val": rows(draw.val),
    }


def draw_from_json(
    content: Any, train: Sequence[Datum], val: Sequence[Datum], shots: int, seed: int, digest: str
) -> FewShotDraw | None:
    """The cached draw if it matches (format, K, seed, source lists), else None."""
    if not isinstance(content, dict) or content.get("format") != FEWSHOT_FORMAT:
        return None
    if content.get("shots") != shots or content.get("seed") != seed or content.get("lists_digest") != digest:
        return None
    by_path = {datum.path: datum for datum in [*train, *val]}
    try:
        chosen = {split: [by_path[row[0]] for row in content[split]] for split in ("train", "val")}
        short = {
            split: {int(label): int(count) for label, count in content["short_classes"][split].items()}
            for split in ("train", "val")
        }
    except (KeyError, TypeError, IndexError, ValueError):
        return None
    return FewShotDraw(shots, seed, chosen["train"], chosen["val"], short["train"], short["val"])


def load_or_draw(
    splits: DatasetSplits,
    shots: int,
    seed: int,
    cache_dir: Path | str | None = None,
    write_cache: bool = True,
) -> tuple[FewShotDraw, Path | None]:
    """The draw for (K, seed) from the cache when it is valid; otherwise drawn and (optionally) cached."""
    if shots < 1:
        return draw_fewshot(splits.train, splits.val, shots, seed), None
    key = str(splits.info.get("cache_key", splits.name))
    path = fewshot_cache_path(key, shots, seed, cache_dir)
    digest = lists_digest(splits.train, splits.val)
    if path.is_file():
        try:
            cached = draw_from_json(
                json.loads(path.read_text(encoding="utf-8")), splits.train, splits.val, shots, seed, digest
            )
        except json.JSONDecodeError:
            cached = None
        if cached is not None:
            return cached, path
        logger.info("few-shot cache %s does not match the current split; drawing again", path)
    draw = draw_fewshot(splits.train, splits.val, shots, seed)
    if write_cache:
        write_text_atomic(path, json.dumps(draw_to_json(draw, splits.name, digest), indent=1))
    return draw, path if write_cache else None


def fewshot_splits(
    splits: DatasetSplits,
    shots: int,
    seed: int,
    cache_dir: Path | str | None = None,
    write_cache: bool = True,
) -> DatasetSplits:
    """`splits` with train and val replaced by the K-shot draw of `seed` (test unchanged; K < 1: all)."""
    draw, path = load_or_draw(splits, shots, seed, cache_dir, write_cache)
    for split, short in (("train", draw.short_train), ("val", draw.short_val)):
        if short:
            wanted = shots if split == "train" else min(shots, VAL_SHOTS_CAP)
            logger.warning(
                "%s: %d %s classes have fewer than %d images and are used whole: %s",
                splits.name,
                len(short),
                split,
                wanted,
                describe_short(short, splits.classnames),
            )
    info = dict(splits.info)
    info["fewshot"] = {
        "shots": shots,
        "seed": seed,
        "file": str(path) if path else None,
        "short_train": draw.short_train,
        "short_val": draw.short_val,
    }
    return splits.replace(train=draw.train, val=draw.val, info=info)


def describe_short(short: dict[int, int], classnames: Sequence[str], limit: int = 10) -> str:
    items = [f"{classnames[label] if label < len(classnames) else label} ({count})" for label, count in short.items()]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def base_new_labels(num_classes: int, which: Subset) -> list[int]:
    """The field's class halves: labels sorted, base = the first ceil(n / 2), new = the rest."""
    labels = list(range(num_classes))
    cut = math.ceil(num_classes / 2)
    if which == "all":
        return labels
    if which == "base":
        return labels[:cut]
    if which == "new":
        return labels[cut:]
    raise DatasetError(f"class subset {which!r} is unknown; choose all, base or new")


def subsample_classes(splits: DatasetSplits, which: Subset) -> DatasetSplits:
    """Keep the base or new half of the classes in train, val and test, relabelled from 0, with their names.

    The halves are cut from all the dataset's classes (the field cuts from the labels present in train,
    which is the same set on every benchmark).
    """
    kept = base_new_labels(splits.num_classes, which)
    if which == "all":
        return splits
    relabel = {old: new for new, old in enumerate(kept)}

    def keep(data: list[Datum]) -> list[Datum]:
        return [
            Datum(datum.path, relabel[datum.label], datum.classname, datum.domain)
            for datum in data
            if datum.label in relabel
        ]

    info = dict(splits.info)
    info["subsample_classes"] = {"subset": which, "labels": kept}
    return splits.replace(
        classnames=[splits.classnames[label] for label in kept],
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        info=info,
    )
