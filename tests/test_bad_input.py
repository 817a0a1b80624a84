"""Bad input is refused before any training, with a message that names the file (or key) and the fix:
missing, corrupt or truncated images (or, when asked, skipped and counted), malformed split files, paths that
leave the dataset folder, unusable masks, prompt files of another backbone or class count, weights of an
unknown layout, unknown config keys and wrong types."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import write_split_json
from PIL import Image

from promptclip.cli import main
from promptclip.clip.model import CLIP
from promptclip.data.datasets import DatasetError, build_dataset
from promptclip.data.loader import build_loader
from promptclip.data.masks import MaskConfig, MaskError, attach_masks, check_mask_files
from promptclip.recipes import resolve_recipe

RECIPE = resolve_recipe("smoke/coop")
CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))


def write_photo(path: Path, seed: int, size: tuple[int, int] = (40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def folder_dataset(root: Path, per_split: tuple[int, int, int] = (2, 1, 2)) -> Path:
    """`root/{train,val,test}/<class>/<i>.jpg`: the `folder` dataset with given splits."""
    for split, count in zip(("train", "val", "test"), per_split, strict=True):
        for label, name in enumerate(CLASSES):
            for i in range(count):
                write_photo(root / split / name / f"{i}.jpg", seed=100 * label + 10 * i + len(split))
    return root


def caltech(root: Path, train: list, test: list) -> Path:
    """`root/caltech-101` with images a/0..3.jpg and b/0..3.jpg and a split file of the given rows."""
    dataset = root / "caltech-101"
    for label, name in enumerate(("a", "b")):
        for i in range(4):
            write_photo(dataset / "101_ObjectCategories" / name / f"{i}.jpg", seed=10 * label + i)
    write_split_json(dataset / "split_zhou_Caltech101.json", train, [], test)
    return dataset


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def train_argv(run_dir: Path, root: Path, *opts: str, dataset: str = "folder") -> list[str]:
    argv = ["train", "--recipe", str(RECIPE), "--output", str(run_dir), "--quiet", "--no-progress"]
    options = ["data.dataset", dataset, "data.root", str(root), "data.options", "{}", "data.batch_size", "4"]
    return [*argv, "--opts", *options, *opts]


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def assert_nothing_trained(run_dir: Path) -> None:
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "results.json").exists()


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


BREAKAGES = {
    "missing": lambda path: path.unlink(),
    "corrupt": lambda path: path.write_bytes(b"\xff\xd8\xff not a jpeg at all"),
    "truncated": truncate,  # a cut JPEG passes a header check; only decoding finds it
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_broken_image_stops_the_run_before_training(tmp_path: Path, capsys, breakage: str, split: str) -> None:
    train = [["a/0.jpg", 0, "a"], ["a/1.jpg", 0, "a"], ["b/0.jpg", 1, "b"], ["b/1.jpg", 1, "b"]]
    test = [["a/2.jpg", 0, "a"], ["a/3.jpg", 0, "a"], ["b/2.jpg", 1, "b"], ["b/3.jpg", 1, "b"]]
    dataset = caltech(tmp_path / "data", train, test)
    broken = "b/1.jpg" if split == "train" else "b/3.jpg"
    BREAKAGES[breakage](dataset / "101_ObjectCategories" / broken)
    run_dir = tmp_path / "run"
    err = refused(capsys, train_argv(run_dir, tmp_path / "data", dataset="caltech101"))
    what = "training images of caltech101" if split == "train" else "test images of caltech101"
    assert f"1 of 4 {what} cannot be used (dataset folder {dataset})" in err
    assert f"101_ObjectCategories/{broken}: " + ("missing" if breakage == "missing" else "") in err
    assert "data.on_bad_image skip" in err and f"promptclip data check --dataset caltech101 --root {dataset}" in err
    assert_nothing_trained(run_dir)


def test_broken_images_are_skipped_and_counted_when_asked(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "data")
    truncate(root / "train" / "cat" / "0.jpg")
    (root / "test" / "fox" / "1.jpg").write_text("broken")
    run_dir = tmp_path / "run"
    assert main(train_argv(run_dir, root, "data.on_bad_image", "skip")) == 0
    results = json.loads((run_dir / "results.json").read_text())
    skipped = results["skipped_images"]
    assert list(skipped) == ["folder/training", "folder/test"]
    assert [line.split(": ")[0] for line in skipped["folder/training"]] == ["train/cat/0.jpg"]
    assert [line.split(": ")[0] for line in skipped["folder/test"]] == ["test/fox/1.jpg"]
    assert results["evaluations"]["all"]["total"] == [2, 2, 1]  # the broken test image is not counted
    assert "left out 1 unusable images of folder/test" in (run_dir / "log.txt").read_text()


def test_the_loader_names_an_image_that_breaks_after_the_check(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "data")
    splits = build_dataset("folder", root)
    truncate(root / "test" / "cat" / "0.jpg")
    loader = build_loader(splits, "test", batch_size=2, train=False, image_size=32)
    with pytest.raises(DatasetError, match=r"image .*test/cat/0\.jpg cannot be read .*data check.*on_bad_image skip"):
        list(loader)


# ---------------------------------------------------------------------------------------------------------
# Split files and paths
# ---------------------------------------------------------------------------------------------------------


GOOD_TEST = [["a/1.jpg", 0, "a"], ["b/1.jpg", 1, "b"]]
MALFORMED = {
    "not JSON": ("{not json", r"is not valid JSON .*download the file again"),
    "a row that is not a triple": ({"train": [["a/0.jpg", 0]], "val": [], "test": []}, r"train\[0\].*is not \["),
    "a label that is not a number": ({"train": [["a/0.jpg", "x", "a"]], "val": [], "test": []}, r"not an integer"),
    "a missing split": ({"train": [], "test": []}, r"key 'val' is missing"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_split_file_is_refused_with_its_name(tmp_path: Path, capsys, case: str) -> None:
    dataset = caltech(tmp_path / "data", [["a/0.jpg", 0, "a"], ["b/0.jpg", 1, "b"]], GOOD_TEST)
    content, reason = MALFORMED[case]
    split_file = dataset / "split_zhou_Caltech101.json"
    split_file.write_text(content if isinstance(content, str) else json.dumps(content))
    run_dir = tmp_path / "run"
    err = refused(capsys, train_argv(run_dir, tmp_path / "data", dataset="caltech101"))
    assert str(split_file) in err
    assert re.search(reason, err), err
    assert_nothing_trained(run_dir)


def test_paths_that_leave_the_dataset_folder_are_refused_even_if_the_file_exists(tmp_path: Path, capsys) -> None:
    outside = write_photo(tmp_path / "secret.jpg", seed=1)
    train = [["a/0.jpg", 0, "a"], ["b/0.jpg", 1, "b"], ["../../../secret.jpg", 1, "b"], [str(outside), 0, "a"]]
    caltech(tmp_path / "data", train, GOOD_TEST)
    run_dir = tmp_path / "run"
    err = refused(capsys, train_argv(run_dir, tmp_path / "data", dataset="caltech101"))
    assert "2 of 4 training images of caltech101 cannot be used" in err
    assert "101_ObjectCategories/../../../secret.jpg: the path leaves the dataset folder" in err
    assert f"{outside}: the path leaves the dataset folder" in err
    assert_nothing_trained(run_dir)

    splits = build_dataset("caltech101", tmp_path / "data")
    escaping = [datum for datum in splits.train if datum.path.endswith("secret.jpg")]
    assert len(escaping) == 2
    for datum in escaping:  # the reader refuses them as well, whatever check came before it
        with pytest.raises(DatasetError, match="leaves the dataset folder"):
            splits.load_image(datum)

    assert main(train_argv(run_dir, tmp_path / "data", "data.on_bad_image", "skip", dataset="caltech101")) == 0
    skipped = json.loads((run_dir / "results.json").read_text())["skipped_images"]["caltech101/training"]
    assert len(skipped) == 2 and all(line.endswith("the path leaves the dataset folder") for line in skipped)


def test_a_csv_path_outside_the_root_is_refused(tmp_path: Path, capsys) -> None:
    root = tmp_path / "images"
    write_photo(root / "a.jpg", seed=1)
    outside = write_photo(tmp_path / "elsewhere" / "b.jpg", seed=2)
    csv_file = tmp_path / "data.csv"
    rows = ["path,label,classname,split", "a.jpg,0,cat,train", f"{outside},1,dog,train", "a.jpg,0,cat,test"]
    csv_file.write_text("\n".join(rows) + "\n")
    argv = train_argv(tmp_path / "run", root, "data.shots", "1", dataset="csv")
    argv += ["data.options", json.dumps({"csv": str(csv_file)})]
    err = refused(capsys, argv)
    assert f"{outside}: the path leaves the dataset folder" in err
    assert_nothing_trained(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------


def write_mask(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)
    return path


def masked_dataset(root: Path) -> Path:
    folder_dataset(root)
    for label, name in enumerate(CLASSES):
        for i in range(2):
            values = np.zeros((40, 40))
            values[10:30, 10:30] = 1 + label  # label-index masks: small ids on background 0
            write_mask(root / "mask" / "train" / name / f"{i}.png", values)
    return root


def test_good_masks_pass_the_check(tmp_path: Path) -> None:
    splits = attach_masks(build_dataset("folder", masked_dataset(tmp_path)), MaskConfig())
    check_mask_files(splits)  # no error
    scaled = np.zeros((80, 80))
    scaled[20:60, 20:60] = 255
    write_mask(tmp_path / "mask" / "train" / "cat" / "0.png", scaled)  # another resolution, the same shape
    check_mask_files(splits)


def test_a_mask_of_another_shape_is_refused_with_its_file(tmp_path: Path) -> None:
    root = masked_dataset(tmp_path)
    wrong = write_mask(root / "mask" / "train" / "dog" / "1.png", np.full((40, 64), 2))
    splits = attach_masks(build_dataset("folder", root), MaskConfig())
    with pytest.raises(MaskError, match=rf"1 of 6 training masks cannot be used[\s\S]*{wrong}: 64x40 pixels, but"):
        check_mask_files(splits)


def test_an_unreadable_mask_is_refused(tmp_path: Path) -> None:
    root = masked_dataset(tmp_path)
    broken = root / "mask" / "train" / "fox" / "0.png"
    broken.write_bytes(b"\x89PNG broken")
    splits = attach_masks(build_dataset("folder", root), MaskConfig())
    with pytest.raises(MaskError, match=rf"{broken}: cannot be read"):
        check_mask_files(splits)


def test_a_run_that_reads_masks_refuses_a_bad_one_before_training(tmp_path: Path, capsys) -> None:
    root = masked_dataset(tmp_path / "data")
    wrong = write_mask(root / "mask" / "train" / "dog" / "1.png", np.full((40, 64), 2))
    run_dir = tmp_path / "run"
    err = refused(capsys, train_argv(run_dir, root, "method", "coop+dapt"))
    assert f"{wrong}: 64x40 pixels, but its image train/dog/1.jpg is 40x40" in err
    assert_nothing_trained(run_dir)


def test_binary_masks_read_as_label_indices_are_refused(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path)
    for name in CLASSES:
        for i in range(2):
            values = np.zeros((40, 40))
            values[5:35, 5:35] = 255  # 0/255 masks: under "index", 255 means ignore
            write_mask(root / "mask" / "train" / name / f"{i}.png", values)
    splits = attach_masks(build_dataset("folder", root), MaskConfig(encoding="index"))
    with pytest.raises(MaskError, match=r"6 of 6 training masks have non-zero pixels but no foreground.*'index'"):
        check_mask_files(splits)
    check_mask_files(attach_masks(build_dataset("folder", root), MaskConfig(encoding="binary")))


# ---------------------------------------------------------------------------------------------------------
# Prompt files and weights
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def coop_prompt(tiny_clip: CLIP, tmp_path: Path) -> Path:
    """A run's prompt trained with a saved tiny-vit backbone."""
    from promptclip.clip.weights import save_clip

    weights = save_clip(tiny_clip, tmp_path / "tiny-vit.safetensors")
    run_dir = tmp_path / "run"
    argv = ["train", "--recipe", str(RECIPE), "--output", str(run_dir), "--quiet", "--no-progress"]
    assert main([*argv, "--opts", "model.weights", str(weights)]) == 0
    return run_dir / "prompt"


def eval_argv(prompt: Path, *extra: str) -> list[str]:
    options = ["--set", "train_per_class=2", "--set", "test_per_class=1", "--set", "image_size=32"]
    return ["eval", "--prompt", str(prompt), "--dataset", "synthetic_shapes", *options, "--no-progress", *extra]


def test_a_prompt_for_another_backbone_is_refused(
    tiny_rn_clip, tiny_clips, coop_prompt: Path, tmp_path: Path, capsys
) -> None:
    from promptclip.clip.weights import save_clip

    other = save_clip(tiny_rn_clip, tmp_path / "tiny-rn.safetensors")
    err = refused(capsys, eval_argv(coop_prompt, "--arch", "tiny-rn", "--weights", str(other)))
    assert f"{coop_prompt}: prompt was trained on backbone 'tiny-vit'" in err and "load the matching CLIP" in err
    same_arch = save_clip(tiny_clips("tiny-vit", 1), tmp_path / "other-vit.safetensors")
    err = refused(capsys, eval_argv(coop_prompt, "--arch", "tiny-vit", "--weights", str(same_arch)))
    assert "trained on CLIP weights with sha256" in err and "load the same weights file" in err


def test_a_damaged_prompt_file_is_refused_with_its_name(coop_prompt: Path, capsys) -> None:
    weights = coop_prompt / "prompt.safetensors"
    truncate(weights)
    err = refused(capsys, eval_argv(coop_prompt))
    assert f"{weights}: not a readable prompt file" in err and "save the prompt again" in err


def test_a_class_specific_prompt_for_another_class_count_is_refused(tiny_clip, tmp_path: Path) -> None:
    from promptclip.methods.base import PromptModel
    from promptclip.methods.coop import CoOp, CoOpConfig

    clip = tiny_clip
    CoOp(clip, ["a", "b", "c"], CoOpConfig(n_ctx=2, csc=True)).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'p'}.*class-specific context"):
        PromptModel.from_pretrained(clip, tmp_path / "p", classnames=["a", "b", "c", "d"])


def test_weights_of_an_unknown_layout_are_refused(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "mystery.safetensors"
    save_file({"encoder.layer0.weight": torch.zeros(2, 2)}, str(weights))
    run_dir = tmp_path / "run"
    err = refused(
        capsys, ["train", "--recipe", str(RECIPE), "--output", str(run_dir), "--opts", "model.weights", str(weights)]
    )
    assert f"{weights}: unknown key layout" in err and "accepted layouts" in err
    assert_nothing_trained(run_dir)


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        (["optim.epoch", "3"], r"unknown key optim\.epoch; allowed: optim\.name, optim\.lr"),
        (["optim.epochs", "three"], r"optim\.epochs: expected int, got 'three'"),
        (
            ["data.on_bad_image", "ignore"],
            r"data\.on_bad_image: 'ignore' is not allowed; choose one of 'error' \| 'skip'",
        ),
        (["method_cfg.n_ctx", "1.5"], r"method_cfg\.n_ctx: 1\.5 is not a int"),
    ],
)
def test_unknown_config_keys_and_wrong_types_are_refused(tmp_path: Path, capsys, opts, expected) -> None:
    run_dir = tmp_path / "run"
    err = refused(capsys, ["train", "--recipe", str(RECIPE), "--output", str(run_dir), "--opts", *opts])
    assert str(RECIPE) in err and re.search(expected, err), err
    assert not run_dir.exists()
