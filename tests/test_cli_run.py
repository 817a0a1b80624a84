"""The command line end to end on the synthetic world with a tiny CLIP: train, run, eval, predict, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from promptclip.cli import main
from promptclip.clip.model import CLIP
from promptclip.clip.weights import load_clip, save_clip
from promptclip.commands.run import load_config
from promptclip.io import sha256_file
from promptclip.protocols.spec import single_run_spec
from promptclip.recipes import resolve_recipe
from promptclip.runs import RunOptions, execute

CONFIGS = resolve_recipe("smoke/coop").parent  # the smoke recipes shipped with promptclip
SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring", "hexagon", "crescent"]
TEST_PER_CLASS = 3  # smoke recipes: 10 classes x 3 test images


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def weights(tiny_clip: CLIP, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP with fixed random weights, saved so that every command loads the same backbone."""
    path = tmp_path_factory.mktemp("weights") / "tiny-vit.safetensors"
    save_clip(tiny_clip, path)
    return path


def train(method: str, runs: Path, weights: Path, *extra: str) -> int:
    argv = ["train", "--recipe", str(CONFIGS / f"{method}.yaml"), "--runs-dir", str(runs), "--quiet"]
    return main([*argv, *extra, "--opts", "model.weights", str(weights)])


def run_folder(runs: Path, method: str, protocol: str = "few_shot", seed: int = 1) -> Path:
    return runs / protocol / "synthetic_shapes" / method / method / "shots2" / f"seed{seed}"


def read_results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


SMOKE_METHODS = sorted(path.stem for path in CONFIGS.glob("*.yaml"))


def test_smoke_recipes_cover_the_baselines() -> None:
    assert {"zeroshot", "coop", "cocoop", "kgcoop"} <= set(SMOKE_METHODS)


@pytest.mark.parametrize("method", SMOKE_METHODS)
def test_one_epoch_train_writes_results(method: str, tmp_path: Path, weights: Path) -> None:
    assert train(method, tmp_path / "runs", weights) == 0
    folder = run_folder(tmp_path / "runs", method)
    results = read_results(folder)
    assert (results["protocol"], results["dataset"], results["method"], results["shots"]) == (
        "few_shot",
        "synthetic_shapes",
        method,
        2,
    )
    assert results["selection"] == {"policy": "last_epoch"}
    recipe = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())
    assert results["transductive"] is bool((recipe.get("method_cfg") or {}).get("transductive", False))
    assert (results["backbone"]["arch"], results["backbone"]["weights_sha256"]) == ("tiny-vit", sha256_file(weights))
    assert results["run_id"] == json.loads((folder / "identity.json").read_text())["run_id"]
    assert results["identity"]["optim.epochs"] == 1 and "data.root" not in results["identity"]
    entry = results["evaluations"]["all"]
    assert entry["classnames"] == SHAPES
    assert entry["total"] == [TEST_PER_CLASS] * 10 and sum(entry["total"]) == 30
    assert all(0 <= c <= t for c, t in zip(entry["correct"], entry["total"], strict=True))
    assert entry["accuracy"] == pytest.approx(100 * sum(entry["correct"]) / 30, abs=1e-4)
    assert (folder / "prompt" / "prompt.safetensors").is_file()
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    if method in ("zeroshot", "lp"):  # nothing runs the training loop (the linear probe is fitted in one call)
        assert results["train"]["epochs"] == 0 and not (folder / "checkpoints").exists()
        assert [m.get("eval") for m in metrics] == ["all"]
    else:
        # 2 shots x 10 classes = 20 images, in full batches (drop_last) during the one epoch.
        assert (results["train"]["epochs"], results["train"]["steps"]) == (1, 20 // recipe["data"]["batch_size"])
        assert metrics[0]["epoch"] == 1 and metrics[0]["lr"] == 1e-5  # the constant warm-up epoch
        assert metrics[0]["loss"] == pytest.approx(results["train"]["final_loss"])
        assert (folder / "checkpoints" / "last.pt").is_file()
    assert "accuracy" in (folder / "log.txt").read_text()


def test_run_base2new_evaluates_both_halves_then_skips(tmp_path: Path, weights: Path, capsys) -> None:
    argv = ["run", "base2new", "--recipe", str(CONFIGS / "coop.yaml"), "--datasets", "synthetic_shapes"]
    argv += ["--seeds", "1", "--shots", "2", "--runs-dir", str(tmp_path), "--quiet"]
    argv += ["--opts", "model.weights", str(weights)]
    assert main(argv) == 0
    results = read_results(run_folder(tmp_path, "coop", "base2new"))
    base, new = results["evaluations"]["base"], results["evaluations"]["new"]
    assert (base["subsample"], new["subsample"]) == ("base", "new")
    assert base["classnames"] == SHAPES[:5] and new["classnames"] == SHAPES[5:]
    assert sum(base["total"]) == sum(new["total"]) == 15
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 runs finished, 1 skipped" in capsys.readouterr().out


def test_eval_command_reproduces_the_runs_counts(tmp_path: Path, weights: Path) -> None:
    assert train("coop", tmp_path / "runs", weights) == 0
    folder = run_folder(tmp_path / "runs", "coop")
    out = tmp_path / "eval.json"
    options = ["train_per_class=4", "val_per_class=2", "test_per_class=3", "image_size=32"]
    argv = ["eval", "--prompt", str(folder / "prompt"), "--dataset", "synthetic_shapes", "--no-progress"]
    argv += [arg for option in options for arg in ("--set", option)]
    assert main([*argv, "--output", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    expected = read_results(folder)["evaluations"]["all"]
    assert (evaluated["correct"], evaluated["total"]) == (expected["correct"], expected["total"])
    assert main([*argv, "--subsample", "new", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["classnames"] == SHAPES[5:]


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path: Path, weights: Path) -> None:
    opts = ["optim.epochs", "3", "optim.lr", "0.05"]
    straight_runs, cut_runs = tmp_path / "straight3", tmp_path / "cut"
    assert train("coop", straight_runs, weights, "--opts", *opts) == 0

    cfg = load_config(CONFIGS / "coop.yaml", None, [*opts, "model.weights", str(weights)])
    spec = single_run_spec(cfg, "coop", cut_runs)

    def stop_after_first_epoch(epoch: int, trainer) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        execute(spec, cfg, RunOptions(echo=False, progress=False, callbacks=[stop_after_first_epoch]))
    assert not (spec.run_dir / "results.json").exists()
    assert train("coop", cut_runs, weights, "--resume", "--opts", *opts) == 0

    straight, resumed = read_results(run_folder(straight_runs, "coop")), read_results(spec.run_dir)
    assert resumed["train"]["resumed_from_epoch"] == 1
    assert resumed["train"]["steps"] == straight["train"]["steps"] == 6
    assert resumed["run_id"] == straight["run_id"]
    assert resumed["evaluations"] == straight["evaluations"]
    a = load_file(str(run_folder(straight_runs, "coop") / "prompt" / "prompt.safetensors"))
    b = load_file(str(spec.run_dir / "prompt" / "prompt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def epoch_lines(folder: Path) -> list[tuple[int, float, float]]:
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(m["epoch"], m["lr"], m["loss"]) for m in lines if "epoch" in m]

    assert epoch_lines(spec.run_dir) == epoch_lines(run_folder(straight_runs, "coop"))
    assert [e for e, _, _ in epoch_lines(spec.run_dir)] == [1, 2, 3]


def write_images(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_predict_prints_topk_probabilities(tmp_path: Path, weights: Path, capsys) -> None:
    from promptclip.clip.transforms import EvalTransform
    from promptclip.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig

    images = write_images(tmp_path, 2)
    argv = ["predict", *images, "--classes", "circle,square,star", "--topk", "2", "--device", "cpu"]
    assert main([*argv, "--arch", "tiny-vit", "--weights", str(weights), "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    clip = load_clip("tiny-vit", weights=str(weights))
    learner = ZeroShotCLIP(clip, ["circle", "square", "star"], ZeroShotConfig()).eval()
    pixels = torch.stack([EvalTransform(clip.image_size)(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        expected = learner({"image": pixels}).logits.softmax(-1)
    for row, probs in zip(predictions, expected, strict=True):
        assert len(row["top"]) == 2
        top = probs.topk(2)
        assert [r["class"] for r in row["top"]] == [["circle", "square", "star"][int(i)] for i in top.indices]
        assert [r["probability"] for r in row["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert main([*argv, "--arch", "tiny-vit", "--weights", str(weights)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == images[0] and text[1].strip().endswith(predictions[0]["top"][0]["class"])


def test_predict_with_a_saved_prompt_uses_its_classes(tmp_path: Path, weights: Path, capsys) -> None:
    assert train("coop", tmp_path / "runs", weights) == 0
    prompt = run_folder(tmp_path / "runs", "coop") / "prompt"
    images = write_images(tmp_path, 1)
    capsys.readouterr()
    assert main(["predict", *images, "--prompt", str(prompt), "--topk", "10", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert sorted(r["class"] for r in row["top"]) == sorted(SHAPES)
    assert sum(r["probability"] for r in row["top"]) == pytest.approx(1.0, abs=1e-4)


def test_user_errors_name_the_key_or_file(tmp_path: Path, weights: Path, capsys) -> None:
    assert train("coop", tmp_path, weights, "--opts", "optim.lrr", "0.1") == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "allowed" in err and "Traceback" not in err
    assert main(["train", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["run", "few_shot", "--recipe", str(CONFIGS / "coop.yaml"), "--shard", "2/2", "--dry-run"]) == 2
    assert "0-based" in capsys.readouterr().err
    assert main(["train", "--recipe", str(CONFIGS / "coop.yaml"), "--method", "kgcoop"]) == 2
    assert "not 'kgcoop'" in capsys.readouterr().err


def test_cross_dataset_then_domain_generalization_reuses_the_prompt(tmp_path: Path, weights: Path) -> None:
    common = ["--recipe", str(CONFIGS / "coop.yaml"), "--datasets", "synthetic_shapes", "--seeds", "1"]
    common += ["--shots", "2", "--runs-dir", str(tmp_path), "--quiet", "--opts", "model.weights", str(weights)]
    assert main(["run", "cross_dataset", *common, "--targets", "synthetic_objects,synthetic_scenes"]) == 0
    cross = read_results(run_folder(tmp_path, "coop", "cross_dataset"))
    assert list(cross["evaluations"]) == ["source", "synthetic_objects", "synthetic_scenes"]
    assert sum(cross["evaluations"]["synthetic_objects"]["total"]) == 24 * TEST_PER_CLASS
    assert len(cross["evaluations"]["synthetic_scenes"]["classnames"]) == 10
    assert main(["run", "domain_generalization", *common, "--targets", "synthetic_objects"]) == 0
    dg = read_results(run_folder(tmp_path, "coop", "domain_generalization"))
    assert dg["train"]["reused_from"] == str(run_folder(tmp_path, "coop", "cross_dataset"))
    assert dg["evaluations"]["source"] == cross["evaluations"]["source"]
    assert dg["evaluations"]["synthetic_objects"] == cross["evaluations"]["synthetic_objects"]


def test_data_efficient_trains_on_the_selected_ratio(tmp_path: Path, weights: Path) -> None:
    argv = ["run", "data_efficient", "--recipe", str(CONFIGS / "coop.yaml"), "--datasets", "synthetic_shapes"]
    argv += ["--ratios", "0.5", "--selectors", "uniform,herding", "--seeds", "3", "--runs-dir", str(tmp_path)]
    assert main([*argv, "--quiet", "--opts", "model.weights", str(weights)]) == 0
    base = tmp_path / "data_efficient" / "synthetic_shapes" / "coop" / "coop"
    for selector, scored_by in (("uniform", None), ("herding", "zero-shot CLIP")):
        results = read_results(base / f"ratio0.5-{selector}" / "seed3")
        assert (results["ratio"], results["selector"]) == (0.5, selector)
        # The pool is the whole training split (4 per class x 10); half of each class is kept.
        selection = results["data_selection"]
        assert (selection["pool"], selection["kept"], selection["scored_by"]) == (40, 20, scored_by)
        assert results["train"]["steps"] == 20 // 8
        assert sum(results["evaluations"]["all"]["total"]) == 30


def test_class_specific_context_cannot_transfer_to_other_classes(tmp_path: Path, weights: Path, capsys) -> None:
    argv = ["run", "cross_dataset", "--recipe", str(CONFIGS / "coop.yaml"), "--datasets", "synthetic_shapes"]
    argv += ["--targets", "synthetic_objects", "--seeds", "1", "--runs-dir", str(tmp_path), "--quiet"]
    assert main([*argv, "--opts", "model.weights", str(weights), "method_cfg.csc", "true"]) == 2
    err = capsys.readouterr().err
    assert "cannot be evaluated on 'synthetic_objects'" in err and "class-specific context" in err
    assert "nothing was trained" in err  # found before training, not after it
    assert not list(tmp_path.rglob("last.pt")) and not list(tmp_path.rglob("results.json"))


def test_a_method_recipe_takes_plug_ins_on_top_but_not_another_method() -> None:
    from promptclip.commands.run import load_config
    from promptclip.config import ConfigError
    from promptclip.recipes import resolve_recipe

    recipe = resolve_recipe("maple/vit_b16_c2_ep5_batch4_2ctx")
    cfg = load_config(recipe, "maple+dapt", [], {})
    assert cfg.method == "maple+dapt" and "dapt" in cfg.plugins
    with pytest.raises(ConfigError, match="this recipe is for method 'maple'"):
        load_config(recipe, "coop", [], {})
