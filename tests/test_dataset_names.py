"""Own data (`folder`, `csv`) go by names of their own in run folders and reports; the field's datasets by
theirs. The name and the data identity are known before any data is read and do not depend on the root."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fake_data import class_folder_tree, write_image

from promptclip.cli import main
from promptclip.commands.run import load_config
from promptclip.data.datasets import DatasetError, build_dataset, dataset_display_name, dataset_identity


def _folder_data(root: Path) -> Path:
    class_folder_tree(root, ["cat", "dog"], 3)
    return root


def test_two_folder_datasets_in_different_roots_get_different_names(tmp_path: Path) -> None:
    pets = build_dataset("folder", _folder_data(tmp_path / "pets"))
    birds = build_dataset("folder", _folder_data(tmp_path / "birds"))
    assert (pets.name, birds.name) == ("folder", "folder")  # what --dataset takes
    assert (pets.display_name, birds.display_name) == ("pets", "birds")
    assert dataset_display_name("folder", tmp_path / "pets", {}) == "pets"
    assert dataset_display_name("folder", f"{tmp_path / 'birds'}/", {}) == "birds"  # trailing slash
    assert dataset_identity("folder", tmp_path / "pets", {}) != dataset_identity("folder", tmp_path / "birds", {})


def test_name_option_overrides_and_follows_the_data_to_another_root(tmp_path: Path) -> None:
    first = _folder_data(tmp_path / "disk1" / "images")
    splits = build_dataset("folder", first, name="my_pets", split_seed=3)
    assert splits.display_name == "my_pets"
    moved = shutil.copytree(first, tmp_path / "disk2" / "copy")
    options = {"name": "my_pets", "split_seed": 3}
    assert dataset_display_name("folder", moved, options) == "my_pets"
    assert dataset_identity("folder", first, options) == dataset_identity("folder", moved, options)
    assert dataset_identity("folder", first, options) == {
        "dataset": "folder",
        "name": "my_pets",
        "options": {"split_seed": 3},
    }
    assert dataset_identity("folder", moved, {**options, "split_seed": 4}) != dataset_identity("folder", first, options)
    # The name is known without the data: no root needed once it is given.
    assert dataset_display_name("folder", None, {"name": "my_pets"}) == "my_pets"


def test_identity_ignores_defaults_and_reads_option_files_by_content(tmp_path: Path) -> None:
    root = _folder_data(tmp_path / "pets")
    (root / "names.json").write_text('{"cat": "tabby cat"}')
    plain = dataset_identity("folder", root, {"name": "pets"})
    assert plain == dataset_identity("folder", root, {"name": "pets", "split_fractions": "0.5,0.2,0.3"})
    named = dataset_identity("folder", root, {"name": "pets", "classnames": "names.json"})
    assert named["options"]["classnames"].startswith("sha256:")
    elsewhere = tmp_path / "other" / "names.json"
    elsewhere.parent.mkdir()
    shutil.copy(root / "names.json", elsewhere)
    assert dataset_identity("folder", root, {"name": "pets", "classnames": str(elsewhere)}) == named
    (root / "names.json").write_text('{"cat": "house cat"}')
    assert dataset_identity("folder", root, {"name": "pets", "classnames": "names.json"}) != named


def test_csv_names_come_from_the_folder_and_the_csv_file(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for index in range(4):
        write_image(root / "images" / f"{index}.jpg")
    rows = ["path,label", *(f"images/{index}.jpg,{'cat' if index % 2 else 'dog'}" for index in range(4))]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "pets.csv").write_text("\n".join(rows) + "\n")
    assert build_dataset("csv", root, csv="labels.csv").display_name == "pets-labels"
    assert dataset_display_name("csv", root, {"csv": "pets.csv"}) == "pets"
    assert dataset_display_name("csv", root, {"csv": "labels.csv", "name": "own"}) == "own"
    identity = dataset_identity("csv", root, {"csv": "labels.csv", "name": "own"})
    assert identity["options"]["csv"].startswith("sha256:") and str(root) not in str(identity)


def test_builtin_datasets_keep_their_name(tmp_path: Path) -> None:
    assert dataset_display_name("dtd", tmp_path, {}) == "dtd"
    assert dataset_display_name("synthetic_shapes", None, {"seed": 2}) == "synthetic_shapes"
    assert build_dataset("synthetic_shapes", None, train_per_class=1).display_name == "synthetic_shapes"
    assert dataset_identity("dtd", tmp_path, {"make_split": True}) == dataset_identity(
        "dtd", None, {"make_split": True}
    )
    assert dataset_identity("dtd", None, {}) == {"dataset": "dtd", "name": "dtd", "options": {}}


def test_default_names_are_made_safe(tmp_path: Path) -> None:
    assert dataset_display_name("folder", tmp_path / "My Photos (2024)", {}) == "My_Photos_2024_"
    assert dataset_display_name("folder", tmp_path / "dtd", {}) == "folder-dtd"  # never a field dataset's runs
    assert dataset_display_name("folder", tmp_path / "EuroSAT", {}) == "folder-EuroSAT"


@pytest.mark.parametrize("bad", ["my pets", "../up", "a/b", ".hidden", "", "x" * 81, "dtd", "Oxford_Pets"])
def test_invalid_names_are_refused_naming_the_flag(tmp_path: Path, bad: str) -> None:
    root = _folder_data(tmp_path / "pets")
    with pytest.raises(DatasetError, match="--name"):
        build_dataset("folder", root, name=bad)
    with pytest.raises(DatasetError, match="--name"):
        dataset_display_name("csv", root, {"name": bad})


def test_data_commands_take_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(_folder_data(tmp_path / "pets"))
    assert main(["data", "info", "--dataset", "folder", "--root", root]) == 0
    assert capsys.readouterr().out.startswith("pets (folder): 2 classes")
    assert main(["data", "info", "--dataset", "folder", "--root", root, "--name", "cats_and_dogs"]) == 0
    assert capsys.readouterr().out.startswith("cats_and_dogs (folder): 2 classes")
    assert main(["data", "info", "--dataset", "folder", "--root", root, "--name", "cats and dogs"]) == 2
    assert "--name" in capsys.readouterr().err
    assert main(["data", "info", "--dataset", "dtd", "--root", root, "--name", "x"]) == 2
    assert "no option name" in capsys.readouterr().err


def test_train_and_run_put_name_into_the_dataset_options() -> None:
    cfg = load_config(None, "coop", ["data.dataset", "folder"], {"root": "/data/pets", "name": "pets_v2"})
    assert cfg.data.options["name"] == "pets_v2"
    kept = load_config(None, "coop", ["data.options.split_seed", "2"], {"name": "pets_v2"})
    assert kept.data.options == {"split_seed": 2, "name": "pets_v2"}
    assert "name" not in load_config(None, "coop", [], {"name": None}).data.options
