"""Few-shot draws against an independent rewrite of the field's rule; the JSON cache; base/new splits."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
from fake_data import caltech_with_split

from promptclip.cli import main
from promptclip.data.datasets import Datum, build_dataset
from promptclip.data.fewshot import (
    base_new_labels,
    draw_fewshot,
    fewshot_cache_path,
    fewshot_splits,
    subsample_classes,
)

CLASSES = ["accordion", "bass", "camera", "dolphin", "face"]


def field_rule(train, val, shots, seed):
    """The field's sampler, written from its description: global random, groups by first appearance."""
    state = random.getstate()
    random.seed(seed)
    try:

        def per_class(items, k):
            groups = defaultdict(list)
            for item in items:
                groups[item.label].append(item)
            chosen = []
            for members in groups.values():
                chosen.extend(random.sample(members, k) if len(members) >= k else members)
            return chosen

        return per_class(train, shots), per_class(val, min(shots, 4))
    finally:
        random.setstate(state)


@pytest.fixture
def caltech(tmp_path):
    caltech_with_split(tmp_path, CLASSES, (9, 6, 1))
    return build_dataset("caltech101", tmp_path)


@pytest.mark.parametrize(("shots", "seed"), [(1, 1), (2, 2), (4, 3), (8, 1), (16, 2)])
def test_same_seed_picks_the_same_paths_as_the_field(caltech, tmp_path, shots, seed):
    expected_train, expected_val = field_rule(caltech.train, caltech.val, shots, seed)
    drawn = fewshot_splits(caltech, shots, seed, cache_dir=tmp_path / "cache")
    assert [d.path for d in drawn.train] == [d.path for d in expected_train]
    assert [d.path for d in drawn.val] == [d.path for d in expected_val]
    assert drawn.test == caltech.test


def test_the_draw_does_not_touch_global_random_state(caltech):
    before = random.getstate()
    draw_fewshot(caltech.train, caltech.val, 4, 1)
    assert random.getstate() == before


def test_small_classes_are_taken_whole_and_reported(caltech):
    draw = draw_fewshot(caltech.train, caltech.val, 8, 1)
    assert len(draw.train) == 8 * len(CLASSES)
    assert len(draw.val) == 4 * len(CLASSES)  # min(K, 4)
    large = draw_fewshot(caltech.train, caltech.val, 16, 1)
    assert large.short_train == dict.fromkeys(range(len(CLASSES)), 9)
    assert large.short_val == {}  # min(16, 4) = 4 <= 6 per class
    assert sorted(d.path for d in large.train) == sorted(d.path for d in caltech.train)


def test_non_positive_shots_mean_all_images_and_write_nothing(caltech, tmp_path):
    for shots in (0, -1):
        kept = fewshot_splits(caltech, shots, 1, cache_dir=tmp_path / "cache")
        assert kept.train == caltech.train and kept.val == caltech.val
    assert not (tmp_path / "cache").exists()


def test_the_cache_is_json_with_relative_paths_outside_the_data(caltech, tmp_path):
    cache = tmp_path / "cache"
    fewshot_splits(caltech, 2, 1, cache_dir=cache)
    path = fewshot_cache_path("caltech101", 2, 1, cache)
    assert path == cache / "caltech101" / "shot_2-seed_1.json"
    content = json.loads(path.read_text())
    assert content["shots"] == 2 and content["seed"] == 1
    assert all(not row[0].startswith("/") and row[0].startswith("101_ObjectCategories/") for row in content["train"])
    assert not list(caltech.root.rglob("*.json"))[1:]  # only the split file lives in the data folder
    assert not list(caltech.root.rglob("*.pkl"))


def test_a_valid_cache_is_read_and_a_stale_one_is_redrawn(caltech, tmp_path):
    cache = tmp_path / "cache"
    first = fewshot_splits(caltech, 1, 1, cache_dir=cache)
    path = fewshot_cache_path("caltech101", 1, 1, cache)
    content = json.loads(path.read_text())
    unused = next(d for d in caltech.train if d.label == 0 and d.path != content["train"][0][0])
    content["train"][0] = [unused.path, 0, "accordion"]  # a hand-edited but consistent record is honoured
    path.write_text(json.dumps(content))
    assert fewshot_splits(caltech, 1, 1, cache_dir=cache).train[0].path == unused.path
    content["lists_digest"] = "0" * 64  # drawn from other lists: ignored and rewritten
    path.write_text(json.dumps(content))
    assert fewshot_splits(caltech, 1, 1, cache_dir=cache).train == first.train
    assert json.loads(path.read_text())["lists_digest"] != "0" * 64


def test_the_default_cache_follows_promptclip_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "pc"))
    assert fewshot_cache_path("dtd", 4, 2) == tmp_path / "pc" / "fewshot" / "dtd" / "shot_4-seed_2.json"


def test_imagenet_like_splits_draw_train_only(tmp_path):
    train = [Datum(f"images/train/{label}/{i}.JPEG", label, str(label)) for i in range(5) for label in range(3)]
    expected, _ = field_rule(train, [], 2, 3)
    draw = draw_fewshot(train, [], 2, 3)
    assert draw.val == [] and draw.train == expected


def test_cli_prints_and_writes_the_draw(caltech, tmp_path, capsys):
    out = tmp_path / "draw.json"
    argv = ["data", "fewshot", "--dataset", "caltech101", "--root", str(caltech.root.parent), "--shots", "2"]
    code = main([*argv, "--seed", "3", "--cache-dir", str(tmp_path / "c"), "--out", str(out), "--print"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    expected_train, _ = field_rule(caltech.train, caltech.val, 2, 3)
    assert [row[0] for row in printed["train"]] == [d.path for d in expected_train]
    assert json.loads(out.read_text()) == printed
    assert main([*argv[:-1], "0"]) == 2
    assert "K >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("num_classes", "base", "new"), [(5, 3, 2), (37, 19, 18), (101, 51, 50), (10, 5, 5), (1, 1, 0)]
)
def test_base_new_counts_for_odd_and_even_class_counts(num_classes, base, new):
    assert len(base_new_labels(num_classes, "base")) == base
    assert len(base_new_labels(num_classes, "new")) == new
    assert base_new_labels(num_classes, "base") + base_new_labels(num_classes, "new") == list(range(num_classes))


def test_subsample_relabels_every_split_and_carries_class_names(caltech):
    base = subsample_classes(caltech, "base")
    new = subsample_classes(caltech, "new")
    assert base.classnames == CLASSES[:3] and new.classnames == CLASSES[3:]
    for split in ("train", "val", "test"):
        assert {d.label for d in base.split(split)} == {0, 1, 2}
        assert {d.label for d in new.split(split)} == {0, 1}
        assert all(d.classname == new.classnames[d.label] for d in new.split(split))
    assert len(new.train) == 2 * 9 and len(base.test) == 3
    assert subsample_classes(caltech, "all") is caltech


def test_prepare_splits_draws_over_all_classes_before_keeping_a_half(caltech, tmp_path):
    from promptclip.data.loader import prepare_splits

    splits = prepare_splits(
        "caltech101", caltech.root.parent, shots=2, seed=1, subset="new", cache_dir=tmp_path / "cache"
    )
    expected_train, _ = field_rule(caltech.train, caltech.val, 2, 1)
    new_labels = {3: 0, 4: 1}
    assert [(d.path, d.label) for d in splits.train] == [
        (d.path, new_labels[d.label]) for d in expected_train if d.label in new_labels
    ]
    assert splits.classnames == CLASSES[3:]
