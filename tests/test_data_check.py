"""`promptclip data check`: every problem is reported, all in one run, with a fix and a non-zero exit."""

from __future__ import annotations

import re

from fake_data import class_folder_tree, write_image, write_split_json

from promptclip.cli import main


def run_check(capsys, *args: str) -> tuple[int, str]:
    code = main(["data", "check", *args])
    return code, capsys.readouterr().out


def problem_titles(output: str) -> list[str]:
    return re.findall(r"^Problem \d+: (.*)$", output, flags=re.MULTILINE)


def broken_caltech(root):
    """A caltech-101 folder whose split file has one of every file problem."""
    dataset = root / "caltech-101"
    images = dataset / "101_ObjectCategories"
    write_image(images / "a" / "ok.jpg")
    write_image(images / "a" / "shared.jpg")
    write_image(images / "b" / "test.jpg")
    (images / "a" / "broken.jpg").write_text("not an image")
    train = [
        ["a/ok.jpg", 0, "a"],
        ["a/missing.jpg", 0, "a"],
        ["a/broken.jpg", 0, "a"],
        ["../../escape.jpg", 0, "a"],
        ["/etc/absolute.jpg", 0, "a"],
        ["a/shared.jpg", 0, "a"],
    ]
    test = [["b/test.jpg", 1, "b"], ["a/shared.jpg", 0, "a"]]
    write_split_json(dataset / "split_zhou_Caltech101.json", train, [], test)
    return dataset


def test_every_problem_is_reported_in_one_run_with_its_fix(tmp_path, capsys):
    broken_caltech(tmp_path)
    code, out = run_check(capsys, "--dataset", "caltech101", "--root", str(tmp_path))
    assert code == 1
    titles = problem_titles(out)
    assert titles == [
        "2 classes where 100 are expected",
        "split sizes differ from the published ones",
        "1 classes have no training image",
        "1 images are in both train and test",
        "2 image paths leave the dataset folder " + str(tmp_path / "caltech-101"),
        "1 images are missing",
        "1 images cannot be read",
    ]
    assert out.count("  fix: ") == len(titles)
    assert "train: 6 images, expected 4128" in out
    assert "101_ObjectCategories/a/missing.jpg" in out
    assert "101_ObjectCategories/a/broken.jpg" in out
    assert "../../escape.jpg" in out and "/etc/absolute.jpg" in out
    assert "1: b" in out  # the class without training images, by label and name
    assert out.rstrip().endswith("caltech101: 7 problems found.")


def test_ignore_sizes_leaves_the_other_problems(tmp_path, capsys):
    broken_caltech(tmp_path)
    code, out = run_check(capsys, "--dataset", "caltech101", "--root", str(tmp_path), "--ignore-sizes")
    assert code == 1
    assert len(problem_titles(out)) == 5
    assert "expected" not in " ".join(problem_titles(out))


def test_missing_split_file_and_image_folder_are_both_reported(tmp_path, capsys):
    (tmp_path / "caltech-101").mkdir()
    code, out = run_check(capsys, "--dataset", "caltech101", "--root", str(tmp_path))
    assert code == 1
    titles = problem_titles(out)
    assert len(titles) == 2
    assert titles[0].startswith("missing image folder") and titles[1].startswith("missing split file")
    assert "split_zhou_Caltech101.json" in titles[1]
    assert "make_split=true" in out and "DATASETS.md" in out


def test_a_missing_dataset_folder_and_an_unknown_dataset_are_problems(tmp_path, capsys):
    code, out = run_check(capsys, "--dataset", "dtd", "--root", str(tmp_path))
    assert code == 1 and problem_titles(out) == ["the dataset folder is not found"]
    assert "dtd/" in out
    code, out = run_check(capsys, "--dataset", "dtdd", "--root", str(tmp_path))
    assert code == 1 and "unknown dataset 'dtdd'" in out


def test_imagenet_without_classnames_names_the_file(tmp_path, capsys):
    for split in ("train", "val"):
        class_folder_tree(tmp_path / "imagenet" / "images" / split, ["n01440764"], 1)
    code, out = run_check(capsys, "--dataset", "imagenet", "--root", str(tmp_path))
    assert code == 1
    assert problem_titles(out) == [f"missing class names: {tmp_path / 'imagenet' / 'classnames.txt'}"]


def test_a_dataset_that_cannot_be_parsed_is_reported(tmp_path, capsys):
    dataset = tmp_path / "dtd"
    (dataset / "images").mkdir(parents=True)
    (dataset / "split_zhou_DescribableTextures.json").write_text("{not json")
    code, out = run_check(capsys, "--dataset", "dtd", "--root", str(tmp_path))
    assert code == 1 and problem_titles(out) == ["the dataset cannot be read"]
    assert "not valid JSON" in out


def test_missing_masks_are_listed_and_long_lists_are_shortened(tmp_path, capsys):
    class_folder_tree(tmp_path, ["cat"], 4, ext=".png")
    write_image(tmp_path / "mask" / "cat" / "img_000.png")
    args = ["--dataset", "folder", "--root", str(tmp_path), "--set", "split_fractions=1,0,0", "--masks"]
    code, out = run_check(capsys, *args, "--max-list", "2")
    assert code == 1
    assert problem_titles(out)[0].startswith("3 of 4 training images have no mask")
    assert str(tmp_path / "mask" / "cat" / "img_001.png") in out
    assert "... and 1 more" in out
    assert "--mask-fallback" in out
    code, out = run_check(capsys, *args, "--mask-dir", str(tmp_path / "nowhere"), "--max-list", "0")
    assert problem_titles(out)[0].startswith("4 of 4 training images have no mask")
    assert "more (--max-list 0" not in out


def test_a_healthy_dataset_passes(tmp_path, capsys):
    class_folder_tree(tmp_path, ["cat", "dog"], 5, ext=".png")
    code, out = run_check(capsys, "--dataset", "folder", "--root", str(tmp_path))
    assert code == 0
    assert problem_titles(out) == []
    assert "2 classes; train 4, val 2, test 4" in out  # round(2.5) = 2, round(1.0) = 1, the rest
    assert out.rstrip().endswith("folder: no problems found.")
    code, out = run_check(capsys, "--dataset", "synthetic_scenes", "--set", "train_per_class=1")
    assert code == 0 and "10 classes; train 10, val 80, test 320" in out


def test_bad_command_line_options_are_user_errors(tmp_path, capsys):
    assert main(["data", "check", "--dataset", "folder", "--root", str(tmp_path), "--set", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
