"""The common checker: every (method, config) case in CASES against the same contract checks.

Adding a method or a plug-in is one line in CASES. A case names a registered method and its config fields; a
plug-in case names the stack (`method="coop+dapt"`) and gives the plug-in configs (`plugins={"dapt": {...}}`).
`build`, a function (clip, classnames, template) -> learner, is for learners that need more than configs (e.g.
a plug-in that loads a stage-1 prompt). Set `transfers=False` for learners tied to their training classes
(class-specific context).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dpc_cases import dpc_builder

from promptclip.clip.model import CLIP
from promptclip.engine.evaluate import evaluate
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.plugins.base import wrap_with_plugins

DPC_K3 = {"dpc": {"top_k": 3}}  # DPC cases: a fixed stage-1 learner and a small picture library (dpc_cases.py)
SRC_2 = {"depth_text": 2, "depth_vision": 2}
KD_2 = {"depth_vision": 2, "teacher_arch": ""}

TEMPLATE = "a photo of a {}."
CLASSES = ["cat", "golden retriever", "red_sports_car", "tree"]
OTHER_CLASSES = ["airplane", "blue whale", "house"]
BATCH = 3


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    cfg: dict[str, Any] = field(default_factory=dict)
    transfers: bool = True
    """Can switch to another class set (false for class-specific context)."""
    class_head: bool = False
    """Has a head with one row per training class (DePT): its logits fuse the scaled cosine (`backbone_logits`)
    with the head's, and a learner built for another class set has another head shape, so the class-switch
    check builds it for the training classes and then switches."""
    arch: str = "tiny-vit"
    plugins: dict[str, Any] = field(default_factory=dict)
    """Plug-in name -> config, wrapped around the method in order (`method` is then e.g. "coop+dapt")."""
    build: Callable[[CLIP, Sequence[str], str], PromptModel] | None = None
    """Builds the learner itself; otherwise the method from `cfg`, wrapped in `plugins`."""
    text_classifier: bool = True
    """The logits are `logit_scale · image · class featuresᵀ` with class features from the text tower (false
    for the linear probe: an affine head learned on the image features, whose rows are its class features)."""

    @property
    def method_name(self) -> str:
        return self.method.split("+")[0]


CASES = [
    Case("zeroshot", "zeroshot"),
    Case("zeroshot-ensemble", "zeroshot", {"ensemble": True}),
    Case("coop-end", "coop", {"ctx_init": "a photo of a"}),
    Case("coop-middle", "coop", {"n_ctx": 4, "class_token_position": "middle"}),
    Case("coop-front", "coop", {"n_ctx": 3, "class_token_position": "front"}),
    Case("coop-csc", "coop", {"n_ctx": 2, "csc": True}, transfers=False),
    Case("coop-random", "coop", {"n_ctx": 4, "text_chunk_size": 3}),
    Case("coop-resnet", "coop", {"n_ctx": 2}, arch="tiny-rn"),
    Case("cocoop", "cocoop", {"text_chunk_size": 7}),
    Case("cocoop-middle", "cocoop", {"n_ctx": 2, "ctx_init": "", "class_token_position": "middle"}),
    Case("kgcoop", "kgcoop"),
    Case("maple", "maple", {"depth": 2}),
    Case("ivlp", "ivlp", {"depth_text": 2, "depth_vision": 2}),
    Case(
        "ivlp-shallow", "ivlp", {"n_ctx_text": 3, "depth_text": 1, "n_ctx_vision": 1, "depth_vision": 1, "ctx_init": ""}
    ),
    Case("vpt", "vpt", {"n_ctx": 3, "depth": 2}),
    Case("deep_lang", "deep_lang", {"depth": 2, "text_chunk_size": 3}),
    Case("promptsrc", "promptsrc", {"depth_text": 2, "depth_vision": 2}),
    Case("promptkd", "promptkd", {"depth_vision": 2, "teacher_arch": ""}),
    Case("lp", "lp", {"C": 1.0}, transfers=False, text_classifier=False),
    Case("lp-search", "lp", {"c_grid": [10.0, 0.1], "search_steps": 2}, transfers=False, text_classifier=False),
    Case("maple+dapt-s", "maple+dapt", {"depth": 2}, plugins={"dapt": {}}),
    Case("maple+dapt-g", "maple+dapt", {"depth": 2}, plugins={"dapt": {"mask_source": "gradcam"}}),
    Case("src+dapt", "promptsrc+dapt", {"depth_text": 2, "depth_vision": 2}, plugins={"dapt": {"schedule": "joint"}}),
    Case("kd+dapt", "promptkd+dapt", {"depth_vision": 2, "teacher_arch": ""}, plugins={"dapt": {"schedule": "joint"}}),
    Case("coop+dapt-g", "coop+dapt", {"n_ctx": 4}, plugins={"dapt": {"mask_source": "gradcam", "schedule": "joint"}}),
    Case("coop+dpc", "coop+dpc", {"n_ctx": 4}, plugins=DPC_K3, build=dpc_builder("coop", {"n_ctx": 4})),
    Case("maple+dpc", "maple+dpc", {"depth": 2}, plugins=DPC_K3, build=dpc_builder("maple", {"depth": 2})),
    Case("src+dpc", "promptsrc+dpc", SRC_2, plugins=DPC_K3, build=dpc_builder("promptsrc", SRC_2)),
    Case("kd+dpc", "promptkd+dpc", KD_2, plugins=DPC_K3, build=dpc_builder("promptkd", KD_2)),
    Case("coop+dept", "coop+dept", {"n_ctx": 4}, plugins={"dept": {}}, class_head=True),
    Case("cocoop+dept", "cocoop+dept", {"text_chunk_size": 7}, plugins={"dept": {}}, class_head=True),
    Case("maple+dept", "maple+dept", {"depth": 2}, plugins={"dept": {}}, class_head=True),
    Case("src+dept", "promptsrc+dept", SRC_2, plugins={"dept": {"ce_weight": 0.6}}, class_head=True),
    Case("kd+dept", "promptkd+dept", KD_2, plugins={"dept": {}}, class_head=True),
]
IDS = [case.name for case in CASES]


# -- helpers -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_of(tiny_clips) -> Callable[[str], CLIP]:
    """The CLIP of an architecture ("tiny-vit", "tiny-rn"): random weights of seed 1234, shared by the checks
    (they never change it)."""
    return lambda arch: tiny_clips(arch, 1234)


@pytest.fixture
def build(clip_of: Callable[[str], CLIP]) -> Callable[..., PromptModel]:
    """build(case, classnames, seed, clip): the case's learner, its own tensors drawn from `seed`."""

    def make(case: Case, classnames: Sequence[str] = CLASSES, seed: int = 0, clip: CLIP | None = None) -> PromptModel:
        clip = clip or clip_of(case.arch)
        torch.manual_seed(seed)
        if case.build is not None:
            return case.build(clip, classnames, TEMPLATE)
        learner = get_prompt_model(clip, {"method": case.method_name, **case.cfg}, classnames, template=TEMPLATE)
        return wrap_with_plugins(learner, case.plugins) if case.plugins else learner

    return make


def make_batch(clip: CLIP, num_classes: int = len(CLASSES), seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    size = clip.image_size
    return {
        "image": torch.randn(BATCH, 3, size, size, generator=generator),
        "label": torch.arange(BATCH) % num_classes,
        "index": torch.arange(BATCH),
        "mask": (torch.rand(BATCH, 1, size, size, generator=generator) > 0.5).float(),
        "path": [f"image{i}.png" for i in range(BATCH)],
    }


def total_loss(learner: PromptModel, batch: dict[str, Any]) -> torch.Tensor:
    output = learner(batch)
    losses = learner.loss(batch, output)
    assert losses, "loss() returned no terms"
    for name, value in losses.items():
        assert value.dim() == 0, f"loss term {name} is not a scalar"
        assert torch.isfinite(value), f"loss term {name} is {value}"
    return sum(losses.values())  # type: ignore[return-value]


def train_step(learner: PromptModel, batch: dict[str, Any], lr: float = 0.5) -> None:
    params = list(learner.trainable_parameters().values())
    if not params:
        return
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    learner.train()
    optimizer.zero_grad()
    total_loss(learner, batch).backward()
    optimizer.step()


def eval_logits(learner: PromptModel, batch: dict[str, Any]) -> torch.Tensor:
    learner.eval()
    with torch.no_grad():
        return learner(batch).logits


class TextTowerCalls:
    """Counts forward passes of the frozen text transformer."""

    def __init__(self, clip: CLIP) -> None:
        self.count = 0
        self.handle = clip.transformer.register_forward_hook(self._hook)

    def _hook(self, *args: Any) -> None:
        self.count += 1

    def __enter__(self) -> TextTowerCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# -- the checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_output_shapes_and_logits(build, case: Case) -> None:
    learner = build(case)
    clip = learner.clip
    learner.train()
    out = learner(make_batch(clip))
    dim = clip.config.embed_dim
    assert out.logits.shape == (BATCH, len(CLASSES))
    assert out.image_features.shape == (BATCH, dim)
    text_shape = (BATCH, len(CLASSES), dim) if learner.image_conditioned_text else (len(CLASSES), dim)
    assert out.text_features.shape == text_shape
    if not case.text_classifier:
        assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(BATCH), atol=1e-5)
        assert torch.equal(out.logits, learner.classify_image_features(out.image_features))
        return
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(BATCH), atol=1e-5)
    assert torch.allclose(out.text_features.norm(dim=-1), torch.ones(text_shape[:-1]), atol=1e-5)
    if learner.image_conditioned_text:
        expected = learner.logit_scale * torch.einsum("bd,bcd->bc", out.image_features, out.text_features)
    else:
        expected = learner.logit_scale * out.image_features @ out.text_features.t()
    cosine = out.backbone_logits if case.class_head else out.logits  # type: ignore[attr-defined]
    assert torch.allclose(cosine, expected, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_reach_only_trainable_tensors(build, case: Case) -> None:
    learner = build(case)
    learner.train()
    loss = total_loss(learner, make_batch(learner.clip))
    trainable = learner.trainable_parameters()
    if not trainable:
        assert not loss.requires_grad, "a learner without trainable tensors produced a differentiable loss"
        return
    loss.backward()
    for name, param in trainable.items():
        assert param.grad is not None, f"trainable {name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in trainable.values())
    frozen_with_grad = [name for name, p in learner.clip.named_parameters() if p.grad is not None]
    assert not frozen_with_grad, f"frozen CLIP tensors got gradients: {frozen_with_grad[:5]}"
    assert not any(p.requires_grad for p in learner.clip.parameters())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backbone_bitwise_unchanged_after_optimizer_steps(build, case: Case) -> None:
    learner = build(case)
    before = {k: v.clone() for k, v in learner.clip.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in learner.trainable_state().items()}
    batch = make_batch(learner.clip)
    for _ in range(2):
        train_step(learner, batch)
    after = learner.clip.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"training changed the frozen backbone: {changed[:5]}"
    moved = [k for k, v in trainable_before.items() if not torch.equal(v, learner.trainable_state()[k])]
    assert sorted(moved) == sorted(trainable_before), "some trainable tensors did not move in two steps"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_and_load_round_trip_gives_identical_logits(build, case: Case, tmp_path: Path) -> None:
    learner = build(case)
    batch = make_batch(learner.clip)
    train_step(learner, batch)
    expected = eval_logits(learner, batch)
    learner.save_pretrained(tmp_path / "prompt")
    loaded = PromptModel.from_pretrained(learner.clip, tmp_path / "prompt")
    assert type(loaded) is type(learner)
    assert loaded.classnames == learner.classnames
    assert torch.equal(eval_logits(loaded, batch), expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_seed_gives_same_logits(build, clip_of, case: Case) -> None:
    batch = make_batch(clip_of(case.arch))
    first = eval_logits(build(case, seed=7), batch)
    second = eval_logits(build(case, seed=7), batch)
    assert torch.equal(first, second)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_switching_the_class_set(build, case: Case) -> None:
    learner = build(case)
    batch = make_batch(learner.clip)
    train_step(learner, batch)
    if not case.transfers:
        with pytest.raises(ValueError, match="class"):
            learner.set_classnames(OTHER_CLASSES)
        return
    learner.set_classnames(OTHER_CLASSES)
    switched = eval_logits(learner, batch)
    assert switched.shape == (BATCH, len(OTHER_CLASSES))
    # Same learned tensors, built directly for the other classes: the same logits.
    fresh = build(case, classnames=CLASSES if case.class_head else OTHER_CLASSES, seed=99)
    fresh.load_trainable_state(learner.trainable_state())
    if case.class_head:
        fresh.set_classnames(OTHER_CLASSES)
    assert torch.allclose(eval_logits(fresh, batch), switched, atol=1e-6)
    # And back: the original class set gives its own logits again.
    learner.set_classnames(CLASSES)
    assert eval_logits(learner, batch).shape == (BATCH, len(CLASSES))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_text_features_are_encoded_once_in_eval(build, case: Case) -> None:
    learner = build(case)
    batch = make_batch(learner.clip)
    learner.eval()
    if not case.text_classifier:  # its class features are learned rows: the text tower is never run
        with TextTowerCalls(learner.clip) as calls, torch.no_grad():
            learner(batch)
            learner.train()
            learner.text_features()
        assert calls.count == 0
        return
    with TextTowerCalls(learner.clip) as calls, torch.no_grad():
        learner.text_features()
        first = calls.count
        learner.text_features()
        assert first > 0 and calls.count == first, "text_features() re-encoded the class set in eval mode"
        learner(batch)
        after_forward = calls.count
        learner(batch)
        if learner.image_conditioned_text:
            assert calls.count > after_forward, "per-image class features must be encoded for every batch"
        else:
            assert after_forward == first and calls.count == first, "forward re-encoded the cached class set"
        learner.set_classnames(OTHER_CLASSES if case.transfers else CLASSES)
        learner.text_features()
        assert calls.count > after_forward or learner.image_conditioned_text, "set_classnames kept a stale cache"
    # In training the prompts change after every step, so nothing may be cached.
    learner.train()
    with TextTowerCalls(learner.clip) as calls:
        learner.text_features()
        once = calls.count
        learner.text_features()
        assert calls.count == 2 * once


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_evaluation_counts_follow_the_logits(build, case: Case) -> None:
    learner = build(case)
    batch = make_batch(learner.clip)
    train_step(learner, batch)
    learner.train()
    with torch.no_grad():
        train_mode_logits = learner(batch).logits
    predictions = eval_logits(learner, batch).argmax(dim=-1)
    assert torch.allclose(eval_logits(learner, batch), train_mode_logits, atol=1e-5)
    learner.train()
    counts = evaluate(learner, [batch, batch])
    hits = (predictions == batch["label"]).long()
    expected_correct = torch.zeros(len(CLASSES), dtype=torch.long).index_add_(0, batch["label"], hits) * 2
    assert counts.correct == expected_correct.tolist()
    assert counts.total == (torch.bincount(batch["label"], minlength=len(CLASSES)) * 2).tolist()
    assert learner.training, "evaluate() must restore the learner's mode"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loading_onto_another_backbone_is_refused(
    build, clip_of, case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    learner = build(case)
    clip = learner.clip
    monkeypatch.setattr(clip, "weights_sha256", "a" * 64)
    learner.save_pretrained(tmp_path / "prompt")
    monkeypatch.setattr(clip, "weights_sha256", "b" * 64)
    with pytest.raises(ValueError, match="sha256"):
        PromptModel.from_pretrained(clip, tmp_path / "prompt")
    other_arch = "tiny-rn" if case.arch == "tiny-vit" else "tiny-vit"
    with pytest.raises(ValueError, match="backbone"):
        PromptModel.from_pretrained(clip_of(other_arch), tmp_path / "prompt")


def test_case_names_are_unique() -> None:
    assert len(set(IDS)) == len(IDS), sorted(name for name in IDS if IDS.count(name) > 1)


def test_every_registered_method_has_a_case() -> None:
    from promptclip.methods import load_all
    from promptclip.registry import METHODS

    load_all()
    covered = {case.method_name for case in CASES}
    missing = sorted(set(METHODS) - covered)
    assert not missing, f"methods without a case in the common checker: {missing}"


def test_trainable_parameter_counts_are_reported(build) -> None:
    learner = build(CASES[IDS.index("cocoop")])
    trainable, total = learner.num_parameters()
    in_width, hidden, out_width = 32, 2, 64  # tiny-vit: image features 32 wide, text width 64
    expected = 4 * out_width + (in_width * hidden + hidden) + (hidden * out_width + out_width)
    assert trainable == expected
    assert total == expected + sum(p.numel() for p in learner.clip.parameters())
    line = learner.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in line and not math.isnan(100 * trainable / total)


# -- one epoch through the command line, on the synthetic shapes --------------------------------------------

SMOKE_DATA = {
    "dataset": "synthetic_shapes",
    "shots": 1,
    "batch_size": 4,
    "eval_batch_size": 32,
    "num_workers": 0,
    "options": {"train_per_class": 2, "val_per_class": 1, "test_per_class": 2, "image_size": 32},
}
SMOKE_CLASSES = 10


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_epoch_command_line_run(clip_of, case: Case, tmp_path: Path) -> None:
    from promptclip.cli import main

    recipe = {
        "method": case.method,
        "method_cfg": case.cfg,
        "plugins": case.plugins,
        "model": {"arch": case.arch, "weights": "random", "precision": "fp32"},
        "data": {**SMOKE_DATA, "options": {**SMOKE_DATA["options"], "image_size": clip_of(case.arch).image_size}},
        "optim": {"lr": 0.002, "epochs": 1, "warmup_epochs": 1},
        "device": "cpu",
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    argv = ["train", "--recipe", str(recipe_path), "--output", str(run_dir), "--runs-dir", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == case.method
    evaluation = results["evaluations"]["all"]
    assert len(evaluation["total"]) == SMOKE_CLASSES and sum(evaluation["total"]) == 2 * SMOKE_CLASSES
    assert evaluation["accuracy"] == pytest.approx(100 * sum(evaluation["correct"]) / sum(evaluation["total"]))
    loaded = PromptModel.from_pretrained(clip_of(case.arch), run_dir / "prompt")
    assert loaded.describe()["method"] == case.method_name
    assert list(loaded.describe()["plugins"]) == list(case.plugins)
    assert len(loaded.classnames) == SMOKE_CLASSES
