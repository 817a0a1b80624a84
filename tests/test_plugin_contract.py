"""The plug-in contract as a plug-in author outside the package meets it: `needs()` declares masks and a stage-1
run, `promptclip run` supplies them with no change to the run layer; the contract's state hooks are forwarded
through any plug-in; and the import graph keeps its layers."""

from __future__ import annotations

import ast
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from promptclip.cli import main
from promptclip.config import RunConfig, build_run_config, to_dict
from promptclip.data.masks import MaskConfig
from promptclip.engine.checkpoint import seed_everything
from promptclip.engine.train import Trainer
from promptclip.methods.base import Batch, LearnerOutput, PromptModel, RunNeeds, StagePlan
from promptclip.plugins.base import PluginContext, PluginModel
from promptclip.registry import PLUGINS

SEEN: dict[str, Any] = defaultdict(list)


@dataclass
class ProbeConfig:
    masks: bool = True
    stage1: bool = True
    weight: float = 0.1


@PLUGINS.register("probe")
class Probe(PluginModel):
    """A minimal two-stage plug-in: reads foreground masks in training and starts from a finished run of the
    learner it wraps (loading its prompt), as DAPT and DPC do."""

    name = "probe"
    Config = ProbeConfig

    @classmethod
    def needs(cls, cfg: ProbeConfig, run: RunConfig) -> RunNeeds:
        stage1 = None
        if cfg.stage1:
            data = to_dict(run)
            data.update(method=run.method_name, plugins={})
            stage1 = StagePlan(build_run_config(data, source="probe stage 1"), recipe="probe_stage1")
        return RunNeeds(masks=MaskConfig() if cfg.masks else None, stage1=stage1)

    def __init__(self, inner: PromptModel, cfg: ProbeConfig, context: PluginContext | None = None) -> None:
        super().__init__(inner, cfg, context)
        if context is not None and context.stage1_dir is not None:
            from promptclip.methods.base import read_prompt_weights

            SEEN["stage1_dir"].append(context.stage1_dir)
            inner.load_trainable_state(read_prompt_weights(context.stage1_dir / "prompt"))

    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        losses = self.inner.loss(batch, output)
        mask = batch.get("mask")
        SEEN["mask_batches"].append(mask is not None)
        if mask is not None:
            losses["probe"] = self.cfg.weight * mask.float().mean() * output.logits.mean()
        return losses


def test_a_plugin_outside_the_package_gets_masks_and_a_stage1_run(tmp_path: Path) -> None:
    SEEN.clear()
    recipe = {
        "method": "coop+probe",
        "method_cfg": {"n_ctx": 4, "ctx_init": "a photo of a"},
        "model": {"arch": "tiny-vit", "weights": "random", "precision": "fp32"},
        "data": {
            "dataset": "synthetic_shapes",
            "shots": 2,
            "batch_size": 4,
            "eval_batch_size": 50,
            "options": {"train_per_class": 2, "val_per_class": 1, "test_per_class": 2, "image_size": 32},
        },
        "optim": {"lr": 0.01, "epochs": 1},
        "device": "cpu",
    }
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = tmp_path / "runs"
    argv = ["run", "base2new", "--recipe", str(path), "--seeds", "1", "--runs-dir", str(runs), "--quiet"]
    assert main(argv) == 0
    leaf = Path("shots2") / "seed1"
    stage1 = runs / "base2new" / "synthetic_shapes" / "coop" / "probe_stage1" / leaf
    stage2 = runs / "base2new" / "synthetic_shapes" / "coop+probe" / "probe" / leaf
    assert (stage1 / "results.json").is_file() and (stage2 / "results.json").is_file()
    assert SEEN["stage1_dir"] == [stage1]
    assert SEEN["mask_batches"] and all(SEEN["mask_batches"])  # every training batch carried its masks
    results = json.loads((stage2 / "results.json").read_text())
    assert results["train"]["stage1_run"] == str(stage1)
    assert results["identity"]["stage1.method"] == "coop"  # the stage's identity is part of the run's
    # Run again: both found finished, neither is trained again.
    SEEN.clear()
    assert main(argv) == 0
    assert not SEEN["stage1_dir"] and not SEEN["mask_batches"]


# -- state hooks forwarded through a plug-in ---------------------------------------------------------------------
class Bare(PluginModel):
    """A plug-in that overrides nothing: everything of the contract must reach the inner learner."""

    name = "bare"
    Config = ProbeConfig


class Interrupt(Exception):
    pass


def test_promptsrc_inside_a_plugin_resumes_bitwise(tiny_clips, tmp_path: Path) -> None:
    """PromptSRC's Gaussian prompt aggregation keeps a running sum across epochs; wrapped in a plug-in that
    does nothing about it, the checkpoint still carries it (PluginModel forwards `training_state`)."""
    from promptclip.config import OptimConfig
    from promptclip.data.datasets import build_dataset
    from promptclip.data.loader import build_loader
    from promptclip.methods.promptsrc import PromptSRC, PromptSRCConfig

    clip = tiny_clips.seeded("tiny-vit", 0)
    splits = build_dataset("synthetic_shapes", train_per_class=2, val_per_class=1, test_per_class=1, image_size=32)
    cfg = OptimConfig(lr=0.05, epochs=3, warmup_epochs=1, warmup_lr=1e-3)
    method_cfg = PromptSRCConfig(n_ctx_text=2, n_ctx_vision=2, depth_text=2, depth_vision=2, gpa_mean=1.0, gpa_std=1.0)

    def run(run_dir: Path, resume: bool, callbacks: Any = ()) -> Trainer:
        seed_everything(1)
        learner = Bare(PromptSRC(clip, splits.classnames, method_cfg), ProbeConfig())
        loader = build_loader(splits, "train", batch_size=6, image_size=clip.image_size, seed=5)
        trainer = Trainer(learner, loader, cfg, run_dir=run_dir, progress=False, callbacks=callbacks)
        trainer.fit(resume=resume)
        return trainer

    def stop_after_first(epoch: int, trainer: Trainer) -> None:
        if epoch == 1:
            raise Interrupt

    straight = run(tmp_path / "straight", resume=False)
    assert straight.learner.training_state()  # the aggregate is visible through the plug-in
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", resume=False, callbacks=[stop_after_first])
    resumed = run(tmp_path / "cut", resume=True)
    a, b = straight.learner.trainable_state(), resumed.learner.trainable_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_set_template_and_eval_subset_reach_the_inner_learner(tiny_clip) -> None:
    from promptclip.factory import get_prompt_model

    inner = get_prompt_model(tiny_clip, {"method": "coop", "n_ctx": 2}, ["a", "b"])
    seen: list[str] = []
    inner.set_eval_subset = seen.append  # type: ignore[method-assign]
    outer = Bare(Bare(inner, ProbeConfig()), ProbeConfig())
    outer.set_template("a drawing of a {}.")
    outer.set_eval_subset("new")
    assert inner.template == "a drawing of a {}." and seen == ["new"]


# -- the import graph ----------------------------------------------------------------------------------------------
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "promptclip"
# Each package may import only packages of a lower rank (and the root package, for its version).
LAYERS = (
    ("faults", "registry", "classnames"),
    ("io",),
    ("errors", "locks"),
    ("config",),
    ("recipes",),
    ("clip",),
    ("data",),
    ("engine",),
    ("methods",),
    ("plugins",),
    ("factory",),
    ("official_import",),
    ("protocols",),
    ("runs",),
    ("reports",),
    ("pretraining",),
    ("commands",),
    ("cli",),
    ("__main__",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def imports_by_module() -> Mapping[str, set[str]]:
    """`promptclip.x.y` -> the promptclip modules it imports (anywhere in the file, also inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m.startswith("promptclip")}
    return graph


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_every_package_imports_only_lower_layers() -> None:
    """clip/, engine/ and data/ know no method, plug-in, run or command; methods know no plug-in; and so on."""
    graph = imports_by_module()
    known = set(graph)
    unranked = sorted({package_of(m).split(".")[-1] for m in graph} - set(RANK) - {"promptclip"})
    assert not unranked, f"add these packages to LAYERS: {unranked}"
    offending = []
    for module, targets in graph.items():
        own = package_of(module).split(".")[-1]
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            other = package_of(target).split(".")[-1]
            if target in known and other != own and other != "promptclip" and RANK[other] >= RANK[own]:
                offending.append(f"{module} imports {target}")
    assert not offending, sorted(offending)


def test_no_cycles_between_promptclip_packages() -> None:
    graph = imports_by_module()
    known = set(graph)
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        for target in targets:
            while target not in known and "." in target:  # `from promptclip.x import name` names a module or not
                target = target.rsplit(".", 1)[0]
            if package_of(target) != package_of(module) and target in known:
                edges[package_of(module)].add(package_of(target))
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif len(path) < 12:
                visit(nxt, [*path, nxt])

    for start in sorted(edges):
        visit(start, [start])
    assert not cycles, sorted(set(cycles))[:10]


# -- DePT's claims on every learner of the contract ----------------------------------------------------------------
DEPT_CLASSES = ["cat", "golden retriever", "red sports car", "tree"]
DEPT_OTHER = ["airplane", "blue whale", "house"]
# Each registered learner trained by the engine, small enough for the tiny CLIP.
DEPT_LEARNERS: dict[str, dict[str, Any]] = {
    "zeroshot": {},
    "coop": {"n_ctx": 2},
    "cocoop": {"text_chunk_size": 7},
    "kgcoop": {},
    "maple": {"depth": 2},
    "ivlp": {"depth_text": 2, "depth_vision": 2},
    "vpt": {"n_ctx": 2, "depth": 2},
    "deep_lang": {"depth": 2},
    "promptsrc": {"depth_text": 2, "depth_vision": 2},
    "promptkd": {"depth_vision": 2, "teacher_arch": ""},
}


def dept_over(method: str, clip: Any, weight: float = 0.7) -> tuple[Any, dict[str, Any]]:
    """DePT over `method` (seeded), after one SGD step so that its head and the prompts have moved, and a batch."""
    from promptclip.factory import get_prompt_model
    from promptclip.plugins.dept import DePT, DePTConfig

    torch.manual_seed(0)
    inner = get_prompt_model(clip, {"method": method, **DEPT_LEARNERS[method]}, DEPT_CLASSES)
    learner = DePT(inner, DePTConfig(weight=weight))
    generator = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(3, 3, clip.image_size, clip.image_size, generator=generator),
        "label": torch.tensor([0, 3, 1]),
    }
    optimizer = torch.optim.SGD(learner.trainable_parameters().values(), lr=0.5)
    learner.train()
    sum(learner.loss(batch, learner(batch)).values()).backward()  # type: ignore[union-attr]
    optimizer.step()
    optimizer.zero_grad()
    return learner, batch


def test_dept_covers_every_learner_the_engine_trains() -> None:
    from promptclip.registry import METHODS

    trained = {name for name, cls in METHODS.items() if not getattr(cls, "fits_on_features", False)}
    assert trained == set(DEPT_LEARNERS), sorted(trained ^ set(DEPT_LEARNERS))


@pytest.mark.parametrize("method", sorted(DEPT_LEARNERS))
def test_dept_with_its_head_off_predicts_exactly_as_the_learner(tiny_clip, method: str) -> None:
    """New classes (and any class set the head has no rows for) get the wrapped learner's logits, bitwise."""
    learner, batch = dept_over(method, tiny_clip)
    learner.eval()
    with torch.no_grad():
        fused = learner(batch).logits
        learner.set_eval_subset("new")  # the training classes evaluated as "new": the head is off
        assert torch.equal(learner(batch).logits, learner.inner(batch).logits)
        assert not torch.equal(fused, learner(batch).logits)  # the head did change the base prediction
        learner.set_eval_subset("base")
        learner.set_classnames(DEPT_OTHER)  # no head rows for these classes
        assert torch.equal(learner(batch).logits, learner.inner(batch).logits)
        learner.set_eval_subset("new")
        assert torch.equal(learner(batch).logits, learner.inner(batch).logits)


@pytest.mark.parametrize("method", sorted(DEPT_LEARNERS))
def test_dept_fuses_its_head_on_the_training_classes_and_trains_it_with_the_prompts(tiny_clip, method: str) -> None:
    learner, batch = dept_over(method, tiny_clip, weight=0.6)
    learner.eval()
    with torch.no_grad():
        output = learner(batch)
        own = learner.inner(batch).logits
        head = learner.head.image_logits(output.image_features)
    assert output.logits.shape == head.shape == (3, len(DEPT_CLASSES))
    # The same fp32 products in the same order as the plug-in: equal to rounding of the last operation.
    assert torch.allclose(output.logits, 0.4 * own + 0.6 * head, rtol=1e-6, atol=1e-6)
    assert torch.equal(output.backbone_logits, own)
    learner.train()
    terms = learner.loss(batch, learner(batch))
    prompts = [p for p in learner.inner.trainable_parameters().values()]
    head_params = list(learner.head.parameters())
    grads = torch.autograd.grad(terms["cat"], head_params + prompts, allow_unused=True)
    head_grads, prompt_grads = grads[: len(head_params)], grads[len(head_params) :]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in head_grads)
    if prompts:  # the head's loss reaches the prompts too: both are tuned together
        assert any(g is not None and g.abs().sum() > 0 for g in prompt_grads)
