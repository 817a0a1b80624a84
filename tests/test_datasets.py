"""Dataset parsing on small fake trees that mimic each real layout, including the field's name cleaning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_data import caltech_with_split, class_folder_tree, write_image, write_lines, write_split_json

from promptclip.cli import main
from promptclip.data.datasets import DatasetError, build_dataset
from promptclip.data.datasets.actions import split_camel_case
from promptclip.data.datasets.fine_grained import car_classname, pet_breed
from promptclip.data.datasets.scenes import sun397_classname
from promptclip.registry import DATASETS

FIELD_DATASETS = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
    "imagenetv2",
    "imagenet_sketch",
    "imagenet_a",
    "imagenet_r",
)


def labels_of(data):
    return sorted({d.label for d in data})


# --------------------------------------------------------------------------------------------- registry


def test_every_field_dataset_is_registered_with_a_useful_summary(capsys):
    from promptclip.data.synthetic import TASK_NAMES

    for name in (*FIELD_DATASETS, "folder", "csv", *TASK_NAMES):
        assert name in DATASETS
    assert {"synthetic_kinds", "synthetic_kinds_pixel", "synthetic_kinds_spurious"} <= set(TASK_NAMES)
    assert main(["list", "datasets"]) == 0
    listing = capsys.readouterr().out
    for name in FIELD_DATASETS:
        line = next(line for line in listing.splitlines() if line.startswith(name + " "))
        assert "template" in line and "{}" in line
    assert "200-class" in next(line for line in listing.splitlines() if line.startswith("imagenet_a "))


def test_templates_match_the_field():
    expected = {
        "oxford_pets": "a photo of a {}, a type of pet.",
        "oxford_flowers": "a photo of a {}, a type of flower.",
        "food101": "a photo of {}, a type of food.",
        "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
        "dtd": "{} texture.",
        "eurosat": "a centered satellite photo of {}.",
        "ucf101": "a photo of a person doing {}.",
        "imagenet": "a photo of a {}.",
        "sun397": "a photo of a {}.",
    }
    for name, template in expected.items():
        assert DATASETS.get(name).template == template


# ------------------------------------------------------------------------------------ split-file datasets


def test_caltech_reads_the_split_file_with_paths_below_the_image_folder(tmp_path):
    caltech_with_split(tmp_path, ["accordion", "face"], (3, 2, 1))
    splits = build_dataset("caltech101", tmp_path)
    assert splits.root == tmp_path / "caltech-101"
    assert splits.sizes() == {"train": 6, "val": 4, "test": 2}
    assert splits.classnames == ["accordion", "face"]
    assert splits.train[0].path == "101_ObjectCategories/face/train_000.jpg"
    assert splits.load_image(splits.train[0]).size == (8, 8)
    assert splits.prompts() == ["a photo of a accordion.", "a photo of a face."]


def test_the_dataset_folder_itself_is_accepted_as_root(tmp_path):
    dataset = caltech_with_split(tmp_path, ["a", "b"], (1, 1, 1))
    assert build_dataset("caltech101", dataset).root == dataset


def test_a_missing_split_file_names_the_file_and_both_fixes(tmp_path):
    class_folder_tree(tmp_path / "caltech-101" / "101_ObjectCategories", ["a"], 2)
    with pytest.raises(DatasetError, match=r"split_zhou_Caltech101\.json.*make_split=true"):
        build_dataset("caltech101", tmp_path)


def test_unknown_option_lists_the_valid_ones(tmp_path):
    with pytest.raises(DatasetError, match=r"no option shots.*make_split"):
        build_dataset("caltech101", tmp_path, shots=3)
    with pytest.raises(DatasetError, match="unknown dataset 'caltec'"):
        build_dataset("caltec", tmp_path)


def test_underscores_become_spaces_in_prompt_names(tmp_path):
    dataset = tmp_path / "oxford_pets"
    write_image(dataset / "images" / "great_pyrenees_1.jpg")
    row = ["great_pyrenees_1.jpg", 0, "great_pyrenees"]
    write_split_json(dataset / "split_zhou_OxfordPets.json", [row], [row], [row])
    splits = build_dataset("oxford_pets", tmp_path)
    assert splits.classnames == ["great pyrenees"]
    assert splits.train[0].classname == "great_pyrenees"  # the raw name stays on the datum
    assert splits.train[0].path == "images/great_pyrenees_1.jpg"


def test_stanford_cars_split_paths_start_at_the_dataset_folder(tmp_path):
    dataset = tmp_path / "stanford_cars"
    write_image(dataset / "cars_train" / "00001.jpg")
    write_image(dataset / "cars_test" / "00001.jpg")
    train = [["cars_train/00001.jpg", 0, "2012 Tesla Model S Sedan"]]
    test = [["cars_test/00001.jpg", 0, "2012 Tesla Model S Sedan"]]
    write_split_json(dataset / "split_zhou_StanfordCars.json", train, [], test)
    splits = build_dataset("stanford_cars", tmp_path)
    assert [d.path for d in splits.train + splits.test] == ["cars_train/00001.jpg", "cars_test/00001.jpg"]
    assert splits.load_image(splits.test[0]).mode == "RGB"


def test_inconsistent_class_names_in_a_split_file_are_reported(tmp_path):
    dataset = tmp_path / "dtd"
    write_image(dataset / "images" / "a" / "1.jpg")
    write_split_json(dataset / "split_zhou_DescribableTextures.json", [["a/1.jpg", 0, "a"]], [], [["a/1.jpg", 0, "b"]])
    with pytest.raises(DatasetError, match="two class names"):
        build_dataset("dtd", tmp_path)


# --------------------------------------------------------------------------- raw layouts and name cleaning


def test_caltech_raw_split_drops_background_and_renames(tmp_path):
    folders = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes"]
    class_folder_tree(tmp_path / "caltech-101" / "101_ObjectCategories", folders, 10)
    splits = build_dataset("caltech101", tmp_path, make_split=True, split_seed=3)
    assert splits.classnames == ["face", "leopard", "motorbike", "accordion", "airplane"]
    assert splits.sizes() == {"train": 25, "val": 10, "test": 15}  # 5/2/3 of 10 per class
    assert not any("BACKGROUND" in d.path or "Faces_easy" in d.path for d in splits.train + splits.test)
    again = build_dataset("caltech101", tmp_path, make_split=True, split_seed=3)
    assert again.train == splits.train
    other = build_dataset("caltech101", tmp_path, make_split=True, split_seed=4)
    assert other.train != splits.train


def test_pets_breed_comes_from_the_file_name(tmp_path):
    assert pet_breed("Great_Pyrenees_101") == "great_pyrenees"
    assert pet_breed("Abyssinian_1") == "abyssinian"
    dataset = tmp_path / "oxford_pets"
    trainval = [f"Abyssinian_{i} 1 1 1" for i in range(10)] + [f"great_pyrenees_{i} 2 2 14" for i in range(10)]
    write_lines(dataset / "annotations" / "trainval.txt", trainval)
    write_lines(dataset / "annotations" / "test.txt", ["Abyssinian_99 1 1 1", "great_pyrenees_99 2 2 14"])
    (dataset / "images").mkdir(parents=True)
    splits = build_dataset("oxford_pets", tmp_path, make_split=True)
    assert splits.classnames == ["abyssinian", "great pyrenees"]
    assert splits.sizes() == {"train": 16, "val": 4, "test": 2}  # round(10 * 0.2) = 2 val per class
    assert {d.path for d in splits.test} == {"images/Abyssinian_99.jpg", "images/great_pyrenees_99.jpg"}


def test_cars_year_moves_to_the_front():
    assert car_classname("Tesla Model S Sedan 2012") == "2012 Tesla Model S Sedan"
    assert car_classname("AM General Hummer SUV 2000") == "2000 AM General Hummer SUV"


def test_cars_raw_split_from_the_devkit_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    dataset = tmp_path / "stanford_cars"
    names = np.empty((1, 2), dtype=object)
    names[0, 0], names[0, 1] = "AM General Hummer SUV 2000", "Tesla Model S Sedan 2012"
    (dataset / "devkit").mkdir(parents=True)
    scipy_io.savemat(dataset / "devkit" / "cars_meta.mat", {"class_names": names})

    def annotations(count):
        table = np.zeros((1, count), dtype=[("fname", "O"), ("class", "O")])
        for i in range(count):
            table[0, i] = (f"{i:05d}.jpg", np.array([[i % 2 + 1]], dtype=np.uint8))
        return {"annotations": table}

    scipy_io.savemat(dataset / "devkit" / "cars_train_annos.mat", annotations(10))
    scipy_io.savemat(dataset / "cars_test_annos_withlabels.mat", annotations(4))
    splits = build_dataset("stanford_cars", tmp_path, make_split=True)
    assert splits.classnames == ["2000 AM General Hummer SUV", "2012 Tesla Model S Sedan"]
    assert splits.sizes() == {"train": 8, "val": 2, "test": 4}
    assert all(d.path.startswith("cars_test/") for d in splits.test)
    assert {d.label for d in splits.test if d.path == "cars_test/00001.jpg"} == {1}


def test_flowers_raw_split_names_from_cat_to_name(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    dataset = tmp_path / "oxford_flowers"
    dataset.mkdir()
    scipy_io.savemat(dataset / "imagelabels.mat", {"labels": np.array([[2] * 10 + [1] * 10])})
    (dataset / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid"}))
    splits = build_dataset("oxford_flowers", tmp_path, make_split=True)
    assert splits.classnames == ["pink primrose", "hard-leaved pocket orchid"]
    assert splits.sizes() == {"train": 10, "val": 4, "test": 6}
    assert {d.path for d in splits.train if d.label == 1} <= {f"jpg/image_{i:05d}.jpg" for i in range(1, 11)}


def test_sun397_reverses_the_path_parts(tmp_path):
    assert sun397_classname("c/church/indoor") == "indoor church"
    assert sun397_classname("/a/abbey") == "abbey"
    dataset = tmp_path / "sun397"
    write_lines(dataset / "ClassName.txt", ["/a/abbey", "/c/church/indoor", "/s/shoe_shop"])
    training = [f"/a/abbey/sun_{i}.jpg" for i in range(5)] + [f"/c/church/indoor/sun_{i}.jpg" for i in range(5)]
    training += [f"/s/shoe_shop/sun_{i}.jpg" for i in range(5)]
    write_lines(dataset / "Training_01.txt", training)
    write_lines(dataset / "Testing_01.txt", ["/c/church/indoor/sun_99.jpg"])
    (dataset / "SUN397").mkdir()
    splits = build_dataset("sun397", tmp_path, make_split=True)
    assert splits.classnames == ["abbey", "indoor church", "shoe shop"]
    assert splits.test[0].path == "SUN397/c/church/indoor/sun_99.jpg" and splits.test[0].label == 1
    assert splits.sizes() == {"train": 12, "val": 3, "test": 1}


def test_ucf101_camel_case_becomes_words(tmp_path):
    assert split_camel_case("ApplyEyeMakeup") == "Apply_Eye_Makeup"
    assert split_camel_case("YoYo") == "Yo_Yo"
    dataset = tmp_path / "ucf101"
    lists = dataset / "ucfTrainTestlist"
    write_lines(lists / "classInd.txt", ["1 ApplyEyeMakeup", "2 YoYo"])
    train = [f"ApplyEyeMakeup/v_ApplyEyeMakeup_g{i:02d}_c01.avi 1" for i in range(5)]
    train += [f"YoYo/v_YoYo_g{i:02d}_c01.avi 2" for i in range(5)]
    write_lines(lists / "trainlist01.txt", train)
    write_lines(lists / "testlist01.txt", ["YoYo/v_YoYo_g99_c01.avi"])
    (dataset / "UCF-101-midframes").mkdir()
    splits = build_dataset("ucf101", tmp_path, make_split=True)
    assert splits.classnames == ["Apply Eye Makeup", "Yo Yo"]
    assert splits.test[0].path == "UCF-101-midframes/Yo_Yo/v_YoYo_g99_c01.jpg"
    assert splits.test[0].classname == "Yo_Yo" and splits.test[0].label == 1


def test_eurosat_folders_get_readable_names(tmp_path):
    class_folder_tree(tmp_path / "eurosat" / "2750", ["AnnualCrop", "Forest", "SeaLake"], 10)
    splits = build_dataset("eurosat", tmp_path, make_split=True)
    assert splits.classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]
    assert splits.template.format(splits.classnames[2]) == "a centered satellite photo of Sea or Lake."


def test_dtd_and_food_raw_splits_use_folder_names(tmp_path):
    class_folder_tree(tmp_path / "dtd" / "images", ["banded", "zigzagged"], 10)
    class_folder_tree(tmp_path / "food-101" / "images", ["apple_pie", "ramen"], 10)
    assert build_dataset("dtd", tmp_path, make_split=True).classnames == ["banded", "zigzagged"]
    food = build_dataset("food101", tmp_path, make_split=True)
    assert food.classnames == ["apple pie", "ramen"]
    assert food.sizes() == {"train": 10, "val": 4, "test": 6}


def test_aircraft_reads_the_official_variant_lists(tmp_path):
    dataset = tmp_path / "fgvc_aircraft"
    write_lines(dataset / "variants.txt", ["707-320", "A300B4", "F-16A/B"])
    write_lines(dataset / "images_variant_train.txt", ["1025794 707-320", "1340192 F-16A/B"])
    write_lines(dataset / "images_variant_val.txt", ["0056978 A300B4"])
    write_lines(dataset / "images_variant_test.txt", ["1514522 F-16A/B"])
    (dataset / "images").mkdir()
    splits = build_dataset("fgvc_aircraft", tmp_path)
    assert splits.classnames == ["707-320", "A300B4", "F-16A/B"]
    assert [(d.path, d.label) for d in splits.train] == [("images/1025794.jpg", 0), ("images/1340192.jpg", 2)]
    assert splits.val[0].label == 1 and splits.test[0].label == 2


def test_aircraft_unknown_variant_names_the_file(tmp_path):
    dataset = tmp_path / "fgvc_aircraft"
    write_lines(dataset / "variants.txt", ["707-320"])
    for split in ("train", "val", "test"):
        write_lines(dataset / f"images_variant_{split}.txt", ["1 747-400"])
    with pytest.raises(DatasetError, match=r"images_variant_train\.txt.*747-400"):
        build_dataset("fgvc_aircraft", tmp_path)


# ------------------------------------------------------------------------------------------------ ImageNet

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]


def write_classnames(folder: Path) -> None:
    write_lines(folder / "classnames.txt", [f"{w} {n}" for w, n in zip(WNIDS, NAMES, strict=True)])


def test_imagenet_reads_train_and_val_folders_with_classnames(tmp_path):
    dataset = tmp_path / "imagenet"
    write_classnames(dataset)
    for split in ("train", "val"):
        class_folder_tree(dataset / "images" / split, WNIDS[:3], 2, ext=".JPEG")
    splits = build_dataset("imagenet", tmp_path)
    assert splits.classnames == NAMES[:3]
    assert splits.sizes() == {"train": 6, "val": 0, "test": 6}
    assert splits.test[0].path == "images/val/n01440764/img_000.JPEG"
    assert labels_of(splits.train) == [0, 1, 2]


@pytest.mark.parametrize(
    ("name", "folder", "images"),
    [("imagenet_a", "imagenet-adversarial", "imagenet-a"), ("imagenet_r", "imagenet-rendition", "imagenet-r")],
)
def test_imagenet_a_and_r_are_subsets_of_their_sorted_wnid_folders(tmp_path, name, folder, images):
    dataset = tmp_path / folder
    write_classnames(dataset)
    class_folder_tree(dataset / images, [WNIDS[4], WNIDS[1], WNIDS[3]], 2)
    write_lines(dataset / images / "README.txt", ["not a class"])
    splits = build_dataset(name, tmp_path)
    assert splits.classnames == ["goldfish", "tiger shark", "hammerhead shark"]  # sorted wnids, looked up
    assert splits.train == [] and splits.val == [] and len(splits.test) == 6
    assert splits.test[0].path == f"{images}/{WNIDS[1]}/img_000.jpg" and splits.test[0].label == 0
    assert splits.expected.num_classes == 200


def test_imagenet_variants_find_classnames_in_the_sibling_imagenet_folder(tmp_path):
    write_classnames(tmp_path / "imagenet")
    class_folder_tree(tmp_path / "imagenet-sketch" / "images", WNIDS, 1)
    splits = build_dataset("imagenet_sketch", tmp_path)
    assert splits.classnames == NAMES


def test_unknown_wnid_folder_is_an_error(tmp_path):
    dataset = tmp_path / "imagenet-adversarial"
    write_classnames(dataset)
    class_folder_tree(dataset / "imagenet-a", ["n99999999"], 1)
    with pytest.raises(DatasetError, match="n99999999"):
        build_dataset("imagenet_a", tmp_path)


def test_imagenetv2_numeric_folders_are_labels(tmp_path):
    dataset = tmp_path / "imagenetv2"
    write_classnames(dataset)
    top = dataset / "imagenetv2-matched-frequency-format-val"
    class_folder_tree(top, ["0", "2", "4"], 2, ext=".jpeg")
    splits = build_dataset("imagenetv2", tmp_path)
    assert splits.classnames == NAMES  # all classes of classnames.txt, folder i = class i
    assert [d.label for d in splits.test] == [0, 0, 2, 2, 4, 4]
    assert splits.test[2].classname == "great white shark"
    assert splits.test[2].path == "imagenetv2-matched-frequency-format-val/2/img_000.jpeg"


# ---------------------------------------------------------------------------------------------- own data


def test_folder_dataset_splits_with_a_seed_and_renames_classes(tmp_path):
    class_folder_tree(tmp_path, ["cat", "dog_breed"], 10, ext=".png")
    write_image(tmp_path / "mask" / "cat" / "img_000.png")  # the mask folder is not a class
    (tmp_path / "names.json").write_text(json.dumps({"cat": "tabby cat"}))
    splits = build_dataset("folder", tmp_path, classnames="names.json", split_seed=7, template="a {} photo.")
    assert splits.classnames == ["tabby cat", "dog breed"]
    assert splits.sizes() == {"train": 10, "val": 4, "test": 6}
    assert splits.prompts()[0] == "a tabby cat photo."
    assert build_dataset("folder", tmp_path, classnames="names.json", split_seed=7).train == splits.train
    assert build_dataset("folder", tmp_path, split_seed=8).train != splits.train
    assert splits.info["cache_key"].startswith("folder-")


def test_folder_dataset_with_given_splits_and_custom_fractions(tmp_path):
    for split in ("train", "test"):
        class_folder_tree(tmp_path / split, ["a", "b"], 2)
    splits = build_dataset("folder", tmp_path)
    assert splits.sizes() == {"train": 4, "val": 0, "test": 4}
    assert splits.train[0].path == "train/a/img_000.jpg"
    other = tmp_path / "other"
    class_folder_tree(other, ["x"], 10)
    assert build_dataset("folder", other, split_fractions="0.8,0.1,0.1").sizes() == {"train": 8, "val": 1, "test": 1}
    with pytest.raises(DatasetError, match="split_fractions"):
        build_dataset("folder", other, split_fractions="0.8,0.1")


def test_folder_class_name_map_with_an_unknown_class_is_refused(tmp_path):
    class_folder_tree(tmp_path, ["cat"], 2)
    (tmp_path / "names.json").write_text(json.dumps({"cta": "cat"}))
    with pytest.raises(DatasetError, match="cta"):
        build_dataset("folder", tmp_path, classnames=str(tmp_path / "names.json"))


def test_csv_dataset_with_header_names_and_splits(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / "img" / name)
    (tmp_path / "data.csv").write_text(
        "path,label,classname,split\nimg/a.png,0,sea_lion,train\nimg/b.png,1,otter,test\nimg/c.png,0,sea_lion,val\n"
    )
    splits = build_dataset("csv", tmp_path, csv="data.csv")
    assert splits.classnames == ["sea lion", "otter"]
    assert [d.path for d in splits.train] == ["img/a.png"]
    assert splits.test[0].label == 1 and splits.val[0].path == "img/c.png"


def test_csv_dataset_with_text_labels_and_no_split_is_split_by_seed(tmp_path):
    rows = [f"img/{cls}_{i}.png,{cls}" for cls in ("zebra", "ant") for i in range(10)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")  # no header: path,label
    splits = build_dataset("csv", tmp_path, csv=str(tmp_path / "list.csv"))
    assert splits.classnames == ["ant", "zebra"]  # text labels sorted
    assert splits.sizes() == {"train": 10, "val": 4, "test": 6}


def test_csv_errors_name_the_line_and_the_fix(tmp_path):
    (tmp_path / "bad.csv").write_text("path,label,classname,split\nx.png,0,fox,training\n")
    with pytest.raises(DatasetError, match=r"line 2: split 'training'"):
        build_dataset("csv", tmp_path, csv="bad.csv")
    (tmp_path / "nameless.csv").write_text("path,label\nx.png,0\n")
    with pytest.raises(DatasetError, match="no class name"):
        build_dataset("csv", tmp_path, csv="nameless.csv")
    (tmp_path / "names.json").write_text(json.dumps(["wolf"]))
    assert build_dataset("csv", tmp_path, csv="nameless.csv", classnames="names.json").classnames == ["wolf"]
    with pytest.raises(DatasetError, match="--csv"):
        build_dataset("csv", tmp_path)


def test_a_path_that_leaves_the_root_is_refused_when_loading(tmp_path):
    (tmp_path / "data.csv").write_text("path,label,classname,split\n../outside.png,0,x,train\n")
    splits = build_dataset("csv", tmp_path, csv="data.csv")
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        splits.load_image(splits.train[0])


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_datasets_render_images_and_exact_masks():
    from promptclip.data import synthetic

    splits = build_dataset("synthetic_shapes", None, train_per_class=2, val_per_class=1, test_per_class=3, seed=5)
    assert splits.root is None and splits.has_masks
    assert splits.sizes() == {"train": 20, "val": 10, "test": 30}
    assert splits.classnames == list(synthetic.SHAPES)
    task = synthetic.build_task("synthetic_shapes", seed=5, train_per_class=2, val_per_class=1, test_per_class=3)
    image, mask = synthetic.render(task.train[3].spec, 64)
    assert np.array_equal(np.asarray(splits.load_image(splits.train[3])), image)
    assert np.array_equal(np.asarray(splits.load_mask(splits.train[3])) == 255, mask)


def test_synthetic_options_pass_through_and_bad_values_are_dataset_errors():
    splits = build_dataset("synthetic_objects", "/ignored", train_per_class=1, image_size=32, spurious=1.0)
    assert splits.load_image(splits.train[0]).size == (32, 32)
    assert splits.info["task_options"]["spurious"] == 1.0
    with pytest.raises(DatasetError, match="spurious"):
        build_dataset("synthetic_scenes", None, spurious=0.5)


def test_synthetic_style_and_test_scene_options_pass_through():
    from promptclip.data import synthetic
    from promptclip.data.datasets import dataset_identity

    counts = {"train_per_class": 1, "val_per_class": 1, "test_per_class": 2, "image_size": 32}
    # As they come from `--set key=value`: strings, converted to the option's type.
    given = {"style": "faded", "style_strength": "0.5", "test_scenes": "flipped", "spurious": "1"}
    splits = build_dataset("synthetic_kinds", None, **counts, **given)
    options = splits.info["task_options"]
    assert (options["style"], options["style_strength"], options["test_scenes"]) == ("faded", 0.5, "flipped")
    task = synthetic.build_task(
        "synthetic_kinds", **counts, style="faded", style_strength=0.5, test_scenes="flipped", spurious=1.0
    )
    assert splits.classnames == task.classnames
    for index in (0, 7, 31):
        datum, sample = splits.test[index], task.test[index]
        assert sample.spec.scene == task.scene_of_class[(sample.label + 1) % len(task.classnames)]
        image, mask = synthetic.render(sample.spec, 32)
        loaded = np.asarray(splits.load_image(datum))
        assert np.array_equal(loaded, synthetic.apply_style(image, "faded", 0.5, sample.spec.seed))
        assert not np.array_equal(loaded, image)
        assert np.array_equal(np.asarray(splits.load_mask(datum)) == 255, mask)  # styles leave masks alone
    styled = dataset_identity("synthetic_kinds", None, {"style": "noise", "style_strength": 0.1})
    assert styled != dataset_identity("synthetic_kinds", None, {})


def test_kind_datasets_render_in_their_own_style_unless_told_otherwise():
    from promptclip.data import synthetic

    counts = {"train_per_class": 1, "val_per_class": 1, "test_per_class": 1, "image_size": 32}
    pixel = build_dataset("synthetic_kinds_pixel", None, **counts)
    task = synthetic.build_task("synthetic_kinds_pixel", **counts)
    assert task.style == "pixelate" and "style" not in pixel.info["task_options"]  # the task's default
    image, _ = task.render_sample(task.train[0])
    assert np.array_equal(np.asarray(pixel.load_image(pixel.train[0])), image)
    assert not np.array_equal(image, synthetic.render(task.train[0].spec, 32)[0])
    plain = build_dataset("synthetic_kinds_pixel", None, **counts, style="none")
    assert np.array_equal(np.asarray(plain.load_image(plain.train[0])), synthetic.render(task.train[0].spec, 32)[0])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("synthetic_kinds", {"style": "sepia"}, r"synthetic_kinds: unknown style 'sepia'; choose one of: none, pix"),
        ("synthetic_kinds_noise", {"style_strength": "strong"}, r"style_strength='strong' is not a number"),
        ("synthetic_kinds_pixel", {"style_strength": 20}, r"synthetic_kinds_pixel: style 'pixelate'.*\[2, 8\]"),
        ("synthetic_shapes", {"test_scenes": "sideways"}, r"test_scenes must be one of uniform, flipped"),
        ("synthetic_scenes", {"test_scenes": "flipped"}, r"synthetic_scenes.*uniform"),
    ],
)
def test_bad_synthetic_style_and_scene_options_are_dataset_errors(name, options, message):
    with pytest.raises(DatasetError, match=message):
        build_dataset(name, None, train_per_class=1, val_per_class=1, test_per_class=1, **options)


def test_malformed_raw_annotations_are_dataset_errors(tmp_path):
    dataset = tmp_path / "oxford_pets"
    write_lines(dataset / "annotations" / "trainval.txt", ["Abyssinian_1 one 1 1"])
    write_lines(dataset / "annotations" / "test.txt", ["Abyssinian_2 1 1 1"])
    (dataset / "images").mkdir()
    with pytest.raises(DatasetError, match="cannot be parsed"):
        build_dataset("oxford_pets", tmp_path, make_split=True)
