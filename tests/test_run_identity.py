"""A run is its configuration: a sweep reuses a finished run only when everything that can change its numbers
is equal, gives another variant its own folder, and never writes over a user's files or an interrupted run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from promptclip.cli import main
from promptclip.clip.weights import load_clip, save_clip
from promptclip.config import build_run_config
from promptclip.protocols.spec import Sweep, expand
from promptclip.recipes import resolve_recipe
from promptclip.runs import RunFolderError, plan_run
from promptclip.runs.identity import RunIdentity, differing_keys, variant_label
from promptclip.runs.rundir import RunDir, RunState

SMOKE = str(resolve_recipe("smoke/coop"))


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))


def saved_weights(tiny_clips, folder: Path, seed: int) -> Path:
    path = folder / f"tiny-vit-{seed}.safetensors"
    save_clip(tiny_clips("tiny-vit", seed), path)
    return path


def sweep(runs: Path, *opts: str, method: str | None = None) -> int:
    argv = ["run", "few_shot", "--recipe", SMOKE, "--shots", "2", "--seeds", "1", "--runs-dir", str(runs), "--quiet"]
    return main([*argv, *(["--method", method] if method else []), *(["--opts", *opts] if opts else [])])


def results_under(runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs.rglob("results.json"))]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` with the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


# -- identity ------------------------------------------------------------------------------------------------------
def identity_of(data: dict, **sweep_changes: object) -> RunIdentity:
    cfg = build_run_config({"method": "coop", "model": {"arch": "tiny-vit", "weights": "random"}, **data})
    values: dict = {"datasets": ["synthetic_shapes"], "seeds": [1], "shots": [2], "runs_dir": Path("runs")}
    values.update(sweep_changes)
    (spec,) = expand("few_shot", cfg, Sweep(recipe="r", **values))  # type: ignore[arg-type]
    return plan_run(spec, cfg).identity


def test_identity_holds_what_changes_numbers_and_nothing_else() -> None:
    base = identity_of({})
    assert identity_of({"optim": {"lr": 0.5}}).run_id != base.run_id
    assert identity_of({"method_cfg": {"n_ctx": 8}}).run_id != base.run_id
    assert identity_of({"model": {"arch": "tiny-vit", "weights": "random", "precision": "fp16"}}).run_id != base.run_id
    assert identity_of({}, seeds=[2]).run_id != base.run_id
    # Where data and runs live and how the work is spread do not change the numbers.
    assert identity_of({"data": {"root": "/elsewhere", "num_workers": 4, "eval_batch_size": 7}}).run_id == base.run_id
    assert identity_of({"device": "cpu", "output_dir": "x"}).run_id == base.run_id
    assert identity_of({}, runs_dir=Path("other")).run_id == base.run_id


def test_augmentation_settings_are_in_the_identity_and_defaults_keep_earlier_identities() -> None:
    base = identity_of({})
    assert not any(key in base.values for key in ("data.augment", "data.crop_scale", "data.flip"))
    assert identity_of({"data": {"augment": "random_resized_crop", "crop_scale": [0.08, 1], "flip": True}}) == base
    none = identity_of({"data": {"augment": "none"}})
    assert len({base.run_id, none.run_id}) == 2 and none.values["data.augment"] == "none"
    assert identity_of({"data": {"crop_scale": [0.5, 1.0]}}).values["data.crop_scale"] == [0.5, 1.0]
    assert identity_of({"data": {"flip": False}}).run_id not in (base.run_id, none.run_id)
    # Without random augmentation the crop range and the flip change nothing, so they are left out.
    assert identity_of({"data": {"augment": "none", "crop_scale": [0.5, 1.0], "flip": False}}) == none
    # Cropping on the device may move a pixel by one level at a rounding tie; the crop cache changes nothing.
    assert identity_of({"data": {"crop_on_device": True}}).values["data.crop_on_device"] is True
    assert identity_of({"data": {"crop_cache_mb": 0, "num_workers": 3}}) == base
    # Compiled towers change the float rounding only, as another device does.
    assert identity_of({"model": {"arch": "tiny-vit", "weights": "random", "compile": "reduce-overhead"}}) == base


def test_promptkd_teacher_cache_is_not_in_the_identity() -> None:
    # Kept teacher features were encoded beside other images: the float rounding changes, nothing else.
    promptkd = {"method": "promptkd", "method_cfg": {"teacher_arch": ""}}
    base = identity_of(promptkd)
    assert identity_of({**promptkd, "method_cfg": {"teacher_arch": "", "teacher_cache_mb": 0}}) == base
    assert identity_of({**promptkd, "method_cfg": {"teacher_arch": "", "kd_weight": 200.0}}) != base


def test_dpc_runs_whose_negatives_now_follow_other_augmentation_get_a_key_of_their_own() -> None:
    # DPC's negatives took the field's crops whatever the run said; runs with other settings changed numbers.
    dpc = {"method": "coop+dpc", "plugins": {"dpc": {}}}
    key = "plugins.dpc.negatives_augmented_as"
    assert key not in identity_of(dpc).values  # the field's augmentation: numbers and identities unchanged
    for data in ({"crop_scale": [0.5, 1.0]}, {"flip": False}, {"augment": "none"}):
        assert identity_of({**dpc, "data": data}).values[key] == "data", data
    assert key not in identity_of({"data": {"crop_scale": [0.5, 1.0]}}).values  # no DPC, no key


def test_seeds_and_shots_share_a_variant_and_other_keys_do_not() -> None:
    base = identity_of({})
    assert identity_of({}, seeds=[3]).variant_id == base.variant_id
    assert identity_of({}, shots=[4]).variant_id == base.variant_id
    assert identity_of({"optim": {"lr": 0.5}}).variant_id != base.variant_id


def test_variants_are_labelled_by_the_keys_in_which_they_differ() -> None:
    a, b = identity_of({}).values, identity_of({"optim": {"lr": 0.5}, "seed": 1}).values
    keys = differing_keys([a, b])
    assert keys == ["optim.lr"]
    assert variant_label(b, keys) == "optim.lr=0.5"


# -- sweeps ----------------------------------------------------------------------------------------------------------
def test_an_opts_change_is_a_new_run_in_its_own_folder(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert sweep(runs) == 0
    first = snapshot(runs)
    assert sweep(runs, "optim.lr", "0.5") == 0
    found = results_under(runs)
    assert sorted(r["identity"]["optim.lr"] for r in found) == [0.002, 0.5]
    assert {r["run_id"] for r in found} and len({r["run_id"] for r in found}) == 2
    recipe_folders = sorted(p.name for p in (runs / "few_shot" / "synthetic_shapes" / "coop").iterdir())
    assert recipe_folders[0] == "coop" and recipe_folders[1].startswith("coop-") and len(recipe_folders) == 2
    assert all(snapshot(runs).get(name) == digest for name, digest in first.items())  # the first run, untouched
    # The same command again finds each variant done.
    assert sweep(runs, "optim.lr", "0.5") == 0 and sweep(runs) == 0
    assert len(results_under(runs)) == 2


def test_a_method_field_and_a_plugin_field_are_variants(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert sweep(runs, "method_cfg.class_token_position", "end") == 0
    assert sweep(runs, "method_cfg.class_token_position", "front") == 0
    assert sorted(r["identity"]["method_cfg.class_token_position"] for r in results_under(runs)) == ["end", "front"]
    dapt = tmp_path / "dapt"
    assert sweep(dapt, "plugins.dapt.margin", "1.5", method="coop+dapt") == 0
    assert sweep(dapt, "plugins.dapt.margin", "0.5", method="coop+dapt") == 0
    assert sorted(r["identity"]["plugins.dapt.margin"] for r in results_under(dapt)) == [0.5, 1.5]


def test_other_backbone_weights_are_another_run(tiny_clips, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first, second = saved_weights(tiny_clips, tmp_path, 0), saved_weights(tiny_clips, tmp_path, 1)
    assert sweep(runs, "model.weights", str(first)) == 0
    assert sweep(runs, "model.weights", str(second)) == 0
    found = results_under(runs)
    assert len(found) == 2
    assert {r["backbone"]["weights_sha256"] for r in found} == {
        load_clip("tiny-vit", weights=str(path)).weights_sha256 for path in (first, second)
    }
    assert sweep(runs, "model.weights", str(first)) == 0 and len(results_under(runs)) == 2  # found, not redone


def test_a_longer_run_is_not_reused_by_a_shorter_sweep(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert sweep(runs, "optim.epochs", "2") == 0
    assert sweep(runs) == 0
    assert sorted(r["train"]["epochs"] for r in results_under(runs)) == [1, 2]


# -- folders a run must not touch ------------------------------------------------------------------------------------
def train_into(folder: Path, *extra: str) -> int:
    return main(["train", "--recipe", SMOKE, "--output", str(folder), "--quiet", *extra])


def test_a_folder_of_user_files_is_refused_and_left_intact(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own notes\n")
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    (folder / "thesis.tex").write_text("\\section{results}\n")
    before = snapshot(folder)
    assert train_into(folder) == 2
    error = capsys.readouterr().err
    assert str(folder) in error and "--overwrite" in error and "thesis.tex" in error
    assert snapshot(folder) == before
    # --overwrite moves the folder aside, byte for byte, and runs in a fresh one.
    assert train_into(folder, "--overwrite") == 0
    (moved,) = [p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-")]
    assert snapshot(moved) == before and (folder / "results.json").is_file()


def test_a_run_of_another_configuration_is_refused_in_a_chosen_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    assert train_into(folder) == 0
    before = snapshot(folder)
    assert train_into(folder, "--opts", "optim.lr", "0.5") == 2
    assert snapshot(folder) == before
    assert train_into(folder) == 0 and snapshot(folder) == before  # the same configuration: finished, skipped


class Interrupt(Exception):
    pass


def test_an_interrupted_run_is_resumed_or_refused_never_restarted(tmp_path: Path) -> None:
    from promptclip.commands.run import load_config
    from promptclip.protocols.spec import single_run_spec
    from promptclip.recipes import recipe_name
    from promptclip.runs import RunOptions, execute

    folder = tmp_path / "run"
    opts = ["optim.epochs", "3"]
    cfg = load_config(Path(SMOKE), None, opts)
    spec = single_run_spec(cfg, recipe_name(Path(SMOKE)), tmp_path, folder)

    def stop_after_second_epoch(epoch: int, trainer: object) -> None:
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        execute(spec, cfg, RunOptions(echo=False, progress=False, callbacks=[stop_after_second_epoch]))
    assert RunDir(folder).state(plan_run(spec, cfg).identity) is RunState.INTERRUPTED
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match="--resume"):
        execute(spec, cfg, RunOptions(echo=False, progress=False))
    assert train_into(folder, "--opts", *opts) == 2
    assert snapshot(folder) == before
    assert train_into(folder, "--resume", "--opts", *opts) == 0
    results = json.loads((folder / "results.json").read_text())
    assert results["train"]["resumed_from_epoch"] == 2 and results["train"]["epochs"] == 3


def test_a_symlink_in_a_run_folder_is_never_written_through(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep\n")
    (folder / "log.txt").symlink_to(outside)
    assert train_into(folder) == 2
    assert outside.read_text() == "keep\n"


def test_dry_run_shows_each_state_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    assert sweep(runs) == 0
    before = snapshot(runs)
    capsys.readouterr()
    argv = ["run", "few_shot", "--recipe", SMOKE, "--shots", "2", "--seeds", "1,2", "--runs-dir", str(runs)]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("done  ") == 1 and out.count("todo  ") == 1 and "2 runs, 1 done, 1 to run" in out
    assert main([*argv, "--dry-run", "--opts", "optim.lr", "0.5"]) == 0
    assert "2 runs, 0 done, 2 to run" in capsys.readouterr().out
    assert snapshot(runs) == before


# -- own data ----------------------------------------------------------------------------------------------------
def image_folders(root: Path, classes: list[str], per_class: int = 4) -> Path:
    from PIL import Image

    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (32, 32), (40 * label, 10 * index, 90)).save(root / name / f"{index}.png")
    return root


def own_sweep(runs: Path, root: Path, *extra: str) -> int:
    import yaml

    recipe = yaml.safe_load(Path(SMOKE).read_text())
    recipe["data"].pop("options")  # the synthetic world's options; own data take none here
    path = runs.parent / "own.yaml"
    path.write_text(yaml.safe_dump(recipe))
    argv = ["run", "few_shot", "--recipe", str(path), "--datasets", "folder", "--root", str(root), "--shots", "1"]
    return main([*argv, "--seeds", "1", "--runs-dir", str(runs), "--quiet", *extra])


def test_own_datasets_in_other_folders_are_other_runs_and_moved_data_keep_theirs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    pets = image_folders(tmp_path / "pets", ["cat", "dog", "fox"], per_class=10)
    tools = image_folders(tmp_path / "tools", ["saw", "axe"], per_class=10)
    assert own_sweep(runs, pets) == 0 and own_sweep(runs, tools) == 0
    found = results_under(runs)
    assert sorted(r["dataset"] for r in found) == ["pets", "tools"]
    assert sorted(len(r["evaluations"]["all"]["total"]) for r in found) == [2, 3]  # nothing reused across them
    # The same data under another root, with the same --name: the same run, found finished.
    moved = image_folders(tmp_path / "elsewhere" / "pets-copy", ["cat", "dog", "fox"], per_class=10)
    assert own_sweep(runs, moved, "--name", "pets") == 0
    assert len(results_under(runs)) == 2
