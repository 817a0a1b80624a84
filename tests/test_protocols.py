"""Protocols: spec expansion, run folders, shards, skipping finished runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from promptclip.config import build_run_config
from promptclip.protocols.spec import (
    CROSS_DATASET_TARGETS,
    DG_TARGETS,
    ProtocolError,
    Sweep,
    check_dataset_options,
    dataset_options,
    expand,
    parse_shard,
    take_shard,
)
from promptclip.runs import execution as runs_execute
from promptclip.runs import inputs as run_inputs


def cfg(method: str = "coop"):
    return build_run_config({"method": method})


def sweep(tmp_path: Path, **changes: Any) -> Sweep:
    values: dict[str, Any] = {"datasets": ["synthetic_shapes", "synthetic_objects"], "runs_dir": tmp_path}
    values.update(changes)
    return Sweep(recipe="vit_b16", **values)


def test_few_shot_expands_datasets_by_shots_by_seeds(tmp_path: Path) -> None:
    specs = expand("few_shot", cfg(), sweep(tmp_path))
    assert len(specs) == 2 * 5 * 3
    assert len({s.run_dir for s in specs}) == len(specs)
    first = specs[0]
    assert first.run_dir == tmp_path / "few_shot" / "synthetic_shapes" / "coop" / "vit_b16" / "shots1" / "seed1"
    assert sorted({s.shots for s in specs}) == [1, 2, 4, 8, 16]
    assert all(s.train_subsample == "all" and [t.key for t in s.targets] == ["all"] for s in specs)
    assert all(t.subsample == "all" and t.split == "test" for s in specs for t in s.targets)
    only = expand("few_shot", cfg(), sweep(tmp_path, shots=[4], seeds=[7]))
    assert [(s.dataset, s.shots, s.seed) for s in only] == [("synthetic_shapes", 4, 7), ("synthetic_objects", 4, 7)]


def test_base2new_trains_on_base_and_names_both_evaluated_subsets(tmp_path: Path) -> None:
    specs = expand("base2new", cfg(), sweep(tmp_path, datasets=["synthetic_shapes"]))
    assert len(specs) == 3
    for spec in specs:
        assert (spec.shots, spec.train_subsample) == (16, "base")
        assert [(t.key, t.dataset, t.subsample, t.split) for t in spec.targets] == [
            ("base", "synthetic_shapes", "base", "test"),
            ("new", "synthetic_shapes", "new", "test"),
        ]
        assert spec.run_dir.parts[-6:] == (
            "base2new",
            "synthetic_shapes",
            "coop",
            "vit_b16",
            "shots16",
            f"seed{spec.seed}",
        )


def test_base2new_trains_a_transductive_method_on_all_classes_and_marks_it(tmp_path: Path) -> None:
    transductive = build_run_config({"method": "promptkd", "data": {"shots": 0}})
    (spec,) = expand("base2new", transductive, sweep(tmp_path, datasets=["synthetic_shapes"], seeds=[1]))
    assert (spec.train_subsample, spec.transductive, spec.shots) == ("all", True, 0)
    assert [t.subsample for t in spec.targets] == ["base", "new"]
    inductive = build_run_config({"method": "promptkd", "method_cfg": {"transductive": False}})
    (spec,) = expand("base2new", inductive, sweep(tmp_path, datasets=["synthetic_shapes"], seeds=[1]))
    assert (spec.train_subsample, spec.transductive) == ("base", False)


def test_cross_dataset_defaults_to_imagenet_and_the_ten_targets(tmp_path: Path) -> None:
    specs = expand("cross_dataset", cfg(), sweep(tmp_path, datasets=[]))
    assert len(specs) == 3
    keys = [t.key for t in specs[0].targets]
    assert keys == ["source", *CROSS_DATASET_TARGETS] and len(keys) == 11
    assert specs[0].dataset == "imagenet" and specs[0].targets[0].dataset == "imagenet"
    assert all(t.subsample == "all" for t in specs[0].targets)
    assert specs[0].prompt_from is None


def test_domain_generalization_reuses_the_cross_dataset_run(tmp_path: Path) -> None:
    specs = expand("domain_generalization", cfg(), sweep(tmp_path, datasets=[], seeds=[2]))
    (spec,) = specs
    assert [t.key for t in spec.targets] == ["source", *DG_TARGETS]
    assert spec.prompt_from == tmp_path / "cross_dataset" / "imagenet" / "coop" / "vit_b16" / "shots16" / "seed2"
    assert spec.run_dir == tmp_path / "domain_generalization" / "imagenet" / "coop" / "vit_b16" / "shots16" / "seed2"


def test_data_efficient_expands_ratio_by_selector_by_seed(tmp_path: Path) -> None:
    specs = expand(
        "data_efficient",
        cfg(),
        sweep(
            tmp_path, datasets=["synthetic_shapes"], ratios=[0.1, 0.5], selectors=["uniform", "herding"], seeds=[1, 2]
        ),
    )
    assert len(specs) == 2 * 2 * 2
    assert specs[0].run_dir.parts[-2:] == ("ratio0.1-uniform", "seed1")
    assert {(s.ratio, s.selector) for s in specs} == {(r, x) for r in (0.1, 0.5) for x in ("uniform", "herding")}
    assert all(s.shots == 0 for s in specs)
    with pytest.raises(ProtocolError, match="unknown nope"):
        expand("data_efficient", cfg(), sweep(tmp_path, selectors=["nope"]))
    with pytest.raises(ProtocolError, match="ratio"):
        expand("data_efficient", cfg(), sweep(tmp_path, ratios=[1.5]))


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_partition_the_sweep(tmp_path: Path, count: int) -> None:
    specs = expand("few_shot", cfg(), sweep(tmp_path))
    shards = [take_shard(specs, index, count) for index in range(count)]
    flat = [spec.run_dir for shard in shards for spec in shard]
    assert sorted(flat) == sorted(s.run_dir for s in specs)  # every spec exactly once
    assert len(flat) == len(set(flat))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_parse_shard_is_zero_based_and_checked() -> None:
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(ProtocolError, match="0-based"):
            parse_shard(bad)


def test_bad_sweeps_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="unknown protocol 'fewshot'"):
        expand("fewshot", cfg(), sweep(tmp_path))
    with pytest.raises(ProtocolError, match=r"--datasets.*no_such_dataset"):
        expand("few_shot", cfg(), sweep(tmp_path, datasets=["no_such_dataset"]))
    with pytest.raises(ProtocolError, match="--seeds"):
        expand("few_shot", cfg(), sweep(tmp_path, seeds=[]))
    with pytest.raises(ProtocolError, match="K >= 1"):
        expand("few_shot", cfg(), sweep(tmp_path, shots=[0]))


def test_transfer_and_base2new_shots_default_to_the_recipes(tmp_path: Path) -> None:
    run_cfg = build_run_config({"method": "coop", "data": {"shots": 4}})
    for protocol in ("base2new", "cross_dataset", "domain_generalization"):
        specs = expand(protocol, run_cfg, sweep(tmp_path, datasets=["synthetic_shapes"], seeds=[1]))
        assert [s.shots for s in specs] == [4]
        assert specs[0].run_dir.parent.name == "shots4"
    assert {s.shots for s in expand("few_shot", run_cfg, sweep(tmp_path))} == {1, 2, 4, 8, 16}


def test_random_backbones_do_not_depend_on_or_consume_the_run_seed() -> None:
    import torch

    run_cfg = build_run_config({"method": "coop", "model": {"arch": "tiny-vit", "weights": "random"}})
    torch.manual_seed(1)
    first = run_inputs.load_backbone(run_cfg, torch.device("cpu")).state_dict()
    torch.manual_seed(2)
    expected_draw = torch.rand(3)
    torch.manual_seed(2)
    second = run_inputs.load_backbone(run_cfg, torch.device("cpu")).state_dict()
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_finished_runs_are_skipped_without_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from promptclip.runs import plan_run
    from promptclip.runs.rundir import claim_recipe_folder

    run_cfg = build_run_config({"method": "coop", "model": {"arch": "tiny-vit", "weights": "random"}})
    specs = expand("few_shot", run_cfg, sweep(tmp_path, datasets=["synthetic_shapes"], shots=[1], seeds=[1, 2]))
    done = plan_run(specs[0], run_cfg)
    claim_recipe_folder(specs[0].run_dir.parents[1], done.identity)
    done.run_dir.path.mkdir(parents=True)
    results = {"schema": 2, "identity": done.identity.to_json(), "evaluations": {}}
    done.run_dir.results.write_text(json.dumps(results))
    executed: list[Any] = []

    def fake_work(planned: Any, *args: Any, **kwargs: Any) -> runs_execute.RunOutcome:
        executed.append(planned.spec)
        return runs_execute.RunOutcome(planned.spec, "done")

    monkeypatch.setattr(runs_execute, "_execute_locked", fake_work)
    monkeypatch.setattr(runs_execute, "_read", lambda run_dir: None)
    outcomes = runs_execute.run_specs(specs, run_cfg, report=lambda message: None)
    assert [o.status for o in outcomes] == ["skipped", "done"]
    assert executed == [specs[1]]
    assert done.finished and not plan_run(specs[1], run_cfg).finished


def test_dataset_options_go_to_the_datasets_that_take_them() -> None:
    run_cfg = build_run_config(
        {"method": "coop", "data": {"options": {"train_per_class": 3, "synthetic_scenes": {"train_per_class": 5}}}}
    )
    assert dataset_options(run_cfg, "synthetic_shapes") == {"train_per_class": 3}
    assert dataset_options(run_cfg, "synthetic_scenes") == {"train_per_class": 5}
    assert dataset_options(run_cfg, "dtd") == {}
    check_dataset_options(run_cfg, ["synthetic_shapes", "dtd"])
    with pytest.raises(ProtocolError, match=r"data\.options: train_per_class"):
        check_dataset_options(run_cfg, ["dtd"])
