"""DePT (`+dept`): the released training step written out here, the head's learning rate through the engine,
its configuration checks, what is saved, and `promptclip run base2new --method coop+dept` end to end.

The claims it shares with every learner (new-class logits are the learner's own, the fused head's shape and
gradients) are in the common checkers (tests/test_plugin_contract.py, tests/test_methods_common.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from promptclip.config import ConfigError, OptimConfig, build_run_config
from promptclip.engine.train import Trainer
from promptclip.factory import get_prompt_model
from promptclip.methods.base import PromptModel
from promptclip.plugins.dept import DePT, DePTConfig

CLASSES = ["cat", "golden retriever", "red sports car", "tree"]


def coop_dept(clip: Any, seed: int = 0, **cfg: Any) -> DePT:
    torch.manual_seed(seed)
    inner = get_prompt_model(clip, {"method": "coop", "n_ctx": 2}, CLASSES)
    return DePT(inner, DePTConfig(**cfg))


def make_batch(clip: Any, labels: tuple[int, ...] = (0, 3, 1, 3), seed: int = 1) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    size = clip.image_size
    return {"image": torch.randn(len(labels), 3, size, size, generator=generator), "label": torch.tensor(labels)}


def released_loss(learner: DePT, batch: dict[str, Any], weight: float) -> torch.Tensor:
    """The released CoOp+DePT loss (trainers/elp_coop.py `_loss`), on the same features and head tensors:
    (1 - w) CE(ITM logits) + w CE(linear(FiLM(concat(text[y], image))), concat(y, y))."""
    head = learner.head
    image = learner.inner.image_features(batch["image"])
    text = learner.inner.text_features()
    labels = batch["label"]
    itm = learner.inner.logit_scale * image @ text.t()
    film_text = head.text_transform.scale * text[labels] + head.text_transform.shift
    film_image = head.image_transform.scale * image + head.image_transform.shift
    rows = torch.cat([film_text, film_image])
    cat = rows @ head.classifier.weight.t() + head.classifier.bias
    return (1 - weight) * F.cross_entropy(itm, labels) + weight * F.cross_entropy(cat, torch.cat([labels, labels]))


def test_the_loss_is_the_released_training_step(tiny_clip) -> None:
    learner = coop_dept(tiny_clip, weight=0.7)
    with torch.no_grad():  # a head away from its identity start, so that every tensor of the formula matters
        for param in learner.head.parameters():
            param.add_(0.1 * torch.randn_like(param))
    batch = make_batch(tiny_clip)
    learner.train()
    terms = learner.loss(batch, learner(batch))
    assert set(terms) == {"ce", "cat"}
    # The same products summed in another order: fp32 rounding of a loss near 1.
    assert torch.allclose(sum(terms.values()), released_loss(learner, batch, 0.7), rtol=1e-5, atol=1e-6)


def test_ce_weight_scales_only_the_learner_s_cross_entropy(tiny_clip) -> None:
    torch.manual_seed(0)
    inner = get_prompt_model(tiny_clip, {"method": "kgcoop"}, CLASSES)
    batch = make_batch(tiny_clip)
    inner.train()
    own = inner.loss(batch, inner(batch))
    for ce_weight, expected in ((None, 0.3), (0.6, 0.6)):
        learner = DePT(inner, DePTConfig(weight=0.7, ce_weight=ce_weight))
        learner.train()
        terms = learner.loss(batch, learner(batch))
        assert torch.allclose(terms["ce"], expected * own["ce"], rtol=1e-6)
        assert torch.equal(terms["kg"], own["kg"])  # KgCoOp's regulariser keeps its own weight


def test_base_classes_fuse_logits_or_use_the_head_alone(tiny_clip) -> None:
    batch = make_batch(tiny_clip)
    fused_learner = coop_dept(tiny_clip, weight=0.25).eval()
    head_learner = coop_dept(tiny_clip, weight=0.25, fusion=False).eval()
    with torch.no_grad():
        own = fused_learner.inner(batch).logits
        head = fused_learner.head.image_logits(fused_learner.inner.image_features(batch["image"]))
        assert torch.allclose(fused_learner(batch).logits, 0.75 * own + 0.25 * head, rtol=1e-6, atol=1e-6)
        assert torch.equal(head_learner(batch).logits, head)


def test_the_head_trains_at_its_multiple_of_the_learning_rate(tiny_clip) -> None:
    """One step with no warm-up: every tensor moves by -lr_group * (grad + wd * value) (SGD, first momentum
    step), with lr_group = 6.5 lr for the head and lr for the prompt."""
    learner = coop_dept(tiny_clip, head_lr_scale=6.5)
    batch = make_batch(tiny_clip)
    before = {k: v.clone() for k, v in learner.trainable_state().items()}
    learner.train()
    sum(learner.loss(batch, learner(batch)).values()).backward()  # type: ignore[union-attr]
    grads = {k: p.grad.clone() for k, p in learner.trainable_parameters().items() if p.grad is not None}
    learner.zero_grad(set_to_none=True)
    Trainer(learner, [batch], OptimConfig(lr=0.01, epochs=1, warmup_epochs=0), progress=False).fit()
    after = learner.trainable_state()
    assert set(grads) == set(before)
    for name, grad in grads.items():
        lr = 0.01 * (6.5 if name.startswith("head.") else 1.0)
        expected = before[name] - lr * (grad + 5e-4 * before[name])
        # One SGD update of tensors near 1 in fp32: rounding of the subtraction only.
        assert torch.allclose(after[name], expected, rtol=1e-5, atol=1e-7), name


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_bitwise_with_its_learning_rate_groups(tiny_clip, tmp_path: Path) -> None:
    """The head's optimiser group (and its momentum) comes back from the checkpoint: stopped after epoch 2 of 3
    and resumed, the prompt and the head end bitwise where an uninterrupted run ends."""
    batches = [make_batch(tiny_clip, seed=s) for s in (1, 2)]
    cfg = OptimConfig(lr=0.05, epochs=3, warmup_epochs=1, warmup_lr=1e-3)

    def run(run_dir: Path, resume: bool, callbacks: Any = ()) -> dict[str, torch.Tensor]:
        learner = coop_dept(tiny_clip)
        Trainer(learner, batches, cfg, run_dir=run_dir, progress=False, callbacks=callbacks).fit(resume=resume)
        return learner.trainable_state()

    def stop_after_second(epoch: int, trainer: Trainer) -> None:
        if epoch == 2:
            raise Interrupt

    straight = run(tmp_path / "straight", resume=False)
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", resume=False, callbacks=[stop_after_second])
    resumed = run(tmp_path / "cut", resume=True)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_warm_up_runs_every_group_at_the_warm_up_rate(tiny_clip) -> None:
    from promptclip.engine.optim import WarmupCosineSchedule, build_optimizer, parameter_groups

    learner = coop_dept(tiny_clip, head_lr_scale=6.5)
    groups = parameter_groups(learner.trainable_parameters(), learner.learning_rate_scales())
    assert [g["lr_scale"] for g in groups] == [1.0, 6.5]
    assert [len(g["params"]) for g in groups] == [1, 6]  # the context; two channel transforms and the linear layer
    cfg = OptimConfig(lr=0.0035, epochs=10, warmup_epochs=1, warmup_lr=1e-5)
    schedule = WarmupCosineSchedule(build_optimizer(groups, cfg), cfg)
    assert schedule.get_last_lr() == [1e-5, 1e-5]  # Dassl's constant warm-up sets one rate for all groups
    schedule.step()
    assert schedule.get_last_lr() == pytest.approx([0.0035, 0.0035 * 6.5])


def test_a_transductive_learner_trains_the_head_on_its_own_predictions(tiny_clip) -> None:
    torch.manual_seed(0)
    inner = get_prompt_model(tiny_clip, {"method": "promptkd", "depth_vision": 2, "teacher_arch": ""}, CLASSES)
    assert inner.transductive
    batch = make_batch(tiny_clip)
    for labels, uses_labels in (("auto", False), ("predicted", False), ("ground_truth", True)):
        learner = DePT(inner, DePTConfig(labels=labels)).train()
        output = learner(batch)
        own = learner.inner(batch).logits.argmax(dim=-1)
        expected = batch["label"] if uses_labels else own
        assert not torch.equal(own, batch["label"])  # the check can tell the two apart
        got = learner.head_labels(batch, learner.inner(batch))
        assert torch.equal(got, expected), labels
        assert torch.isfinite(learner.loss(batch, output)["cat"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("weight", 0.0, "plugins.dept.weight: 0.0 is outside (0, 1]"),
        ("weight", 1.5, "plugins.dept.weight: 1.5 is outside (0, 1]"),
        ("ce_weight", -0.1, "plugins.dept.ce_weight: -0.1 must be a number, 0 or more"),
        ("head_lr_scale", 0, "plugins.dept.head_lr_scale: 0"),
        ("feature_scale", float("nan"), "plugins.dept.feature_scale: nan"),
        ("labels", "mine", "plugins.dept.labels: 'mine' is not allowed"),
        ("head", "linear", "unknown key plugins.dept.head"),
    ],
)
def test_a_bad_value_is_refused_when_the_recipe_is_read(field: str, value: Any, message: str) -> None:
    data = {"method": "coop+dept", "plugins": {"dept": {field: value}}}
    with pytest.raises(ConfigError, match=r"my\.yaml: ") as err:
        build_run_config(data, source="my.yaml")
    assert message in str(err.value)
    build_run_config({"method": "coop+dept", "plugins": {"dept": {"weight": 1.0, "ce_weight": 0}}})  # edges


def test_a_prompt_saved_on_other_classes_loads_with_its_head_classes(tiny_clip, tmp_path: Path) -> None:
    learner = coop_dept(tiny_clip)
    batch = make_batch(tiny_clip)
    learner.set_classnames(["airplane", "house"])
    learner.save_pretrained(tmp_path / "prompt")
    assert learner.classnames == ["airplane", "house"]  # the active classes are restored after saving
    loaded = PromptModel.from_pretrained(tiny_clip, tmp_path / "prompt")
    assert isinstance(loaded, DePT) and loaded.classnames == loaded.head_classnames == CLASSES
    learner.set_classnames(CLASSES)
    learner.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, learner(batch).logits)


def test_training_on_classes_without_head_rows_is_refused(tiny_clip) -> None:
    learner = coop_dept(tiny_clip).train()
    learner.set_classnames(["airplane", "house"])
    batch = make_batch(tiny_clip, labels=(0, 1))
    with pytest.raises(ValueError, match="not the head's 4 training classes"):
        learner.loss(batch, learner(batch))


def test_run_base2new_with_coop_dept_end_to_end(tmp_path: Path) -> None:
    """`promptclip run base2new --method coop+dept` over a plain CoOp recipe, on the bundled tiny CLIP and the
    synthetic world: trained on the base classes, evaluated on base (fused) and new (the prompts alone), then
    reported beside the same recipe's CoOp run."""
    from promptclip.cli import main

    recipe = {
        "method": "coop",
        "method_cfg": {"n_ctx": 4, "ctx_init": "a photo of a"},
        "model": {"arch": "tiny-synthetic", "precision": "fp32"},
        "data": {
            "dataset": "synthetic_objects",
            "shots": 2,
            "batch_size": 8,
            "options": {"train_per_class": 2, "val_per_class": 1, "test_per_class": 2},
        },
        "optim": {"lr": 0.002, "epochs": 1},
        "device": "cpu",
    }
    path = tmp_path / "tiny_coop.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = tmp_path / "runs"
    for method in ("coop+dept", "coop"):
        argv = ["run", "base2new", "--recipe", str(path), "--method", method, "--seeds", "1"]
        assert main([*argv, "--runs-dir", str(runs), "--quiet"]) == 0
    folder = runs / "base2new" / "synthetic_objects" / "coop+dept" / "tiny_coop" / "shots2" / "seed1"
    results = json.loads((folder / "results.json").read_text())
    assert results["method"] == "coop+dept"
    assert results["identity"]["plugins.dept.weight"] == 0.7
    assert {"base", "new"} <= set(results["evaluations"])
    assert len(results["evaluations"]["new"]["total"]) == 12  # the 12 new classes of synthetic_objects
    loaded = PromptModel.from_pretrained(load_tiny_synthetic(), folder / "prompt")
    assert isinstance(loaded, DePT) and len(loaded.head_classnames) == 12
    # The report puts CoOp and CoOp+DePT side by side: a group of Base/New/HM bars per method.
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    assert (out / "plots" / "base2new_shots2_plugins.png").is_file()
    assert "![base2new_shots2_plugins](plots/base2new_shots2_plugins.png)" in (out / "report.md").read_text()


def load_tiny_synthetic() -> Any:
    from promptclip import load_clip

    return load_clip("tiny-synthetic")


def test_the_recipes_are_the_official_settings() -> None:
    from promptclip.recipes import resolve_recipe

    def recipe(name: str) -> dict[str, Any]:
        return yaml.safe_load(resolve_recipe(name).read_text())

    coop = recipe("coop_dept/vit_b16_ep10_bs4_lr35")
    assert coop["method_cfg"]["n_ctx"] == 16 and coop["method_cfg"]["ctx_init"] == ""
    assert (coop["optim"]["lr"], coop["optim"]["epochs"], coop["data"]["batch_size"]) == (0.0035, 10, 4)
    assert coop["plugins"]["dept"] | {} == {
        "weight": 0.7, "ce_weight": None, "head_lr_scale": 6.5, "fusion": True, "channel_transform": True,
    }  # fmt: skip
    maple = recipe("maple_dept/vit_b16_c2_ep10_batch4_2ctx")
    assert (maple["optim"]["lr"], maple["optim"]["epochs"], maple["method_cfg"]["depth"]) == (0.0035, 10, 9)
    src = recipe("promptsrc_dept/vit_b16_c2_ep20_batch4_4+4ctx")
    assert (src["plugins"]["dept"]["ce_weight"], src["plugins"]["dept"]["head_lr_scale"]) == (0.6, 6.0)
    assert (src["optim"]["lr"], src["optim"]["epochs"]) == (0.0025, 20)


def test_the_report_groups_each_method_with_its_plug_ins(tmp_path: Path) -> None:
    """One panel per method with plug-in series; in it a group per series holding its Base, New and HM bars."""
    from test_reports import acc, write_run

    from promptclip.reports.collect import collect_runs, harmonic_mean
    from promptclip.reports.index import ResultIndex
    from promptclip.reports.long import build_long_tables
    from promptclip.reports.plots import plugin_panels

    base_new = {"coop": (800, 600), "coop+dept": (850, 610), "coop+dpc": (900, 600), "maple": (820, 640),
                "maple+dpc": (880, 640), "cocoop": (810, 650), "zeroshot": (700, 700)}  # fmt: skip
    for method, (base, new) in base_new.items():
        for dataset, shift in (("dtd", 0), ("eurosat", 100)):
            for seed in (1, 2):
                evaluations = {"base": acc(base - shift + seed), "new": acc(new - shift + seed)}
                write_run(tmp_path, "base2new", dataset, method, seed, evaluations)
    (table,) = build_long_tables(ResultIndex(collect_runs(tmp_path).runs))
    panels = plugin_panels(table)
    assert [panel.title for panel in panels] == ["coop", "maple"]  # cocoop has no plug-in, zeroshot is a line
    assert [group.label for group in panels[0].groups] == ["coop", "coop+dept", "coop+dpc"]
    dept = panels[0].groups[1].bars
    assert [bar.series for bar in dept] == ["Base", "New", "HM"]
    # Average over the two datasets of the seed means (accuracies of 1000 images: count / 10).
    base, new = (85.0 + 0.15 - 5.0, 61.0 + 0.15 - 5.0)
    assert [bar.value for bar in dept] == pytest.approx([base, new, harmonic_mean(base, new)])
    # One dataset: its rows, with the seed spread as error bars (population std of two seeds 0.1 apart).
    (one,) = build_long_tables(ResultIndex([run for run in collect_runs(tmp_path).runs if run.dataset == "dtd"]))
    (bar_base, _, _) = plugin_panels(one)[0].groups[1].bars
    assert bar_base.value == pytest.approx(85.15) and bar_base.error == pytest.approx(0.05)
