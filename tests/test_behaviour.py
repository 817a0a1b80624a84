"""Behaviour of the methods on the bundled `tiny-synthetic` CLIP: the papers' claims, measured.

The fast tests check that the demo's world leaves room to tune: zero-shot accuracy clearly above chance and
clearly below the ceiling on every task of the demo. The slow tests (`pytest -m slow tests/test_behaviour.py`,
about twenty minutes on two cores) run `promptclip demo --full` (every method, three seeds, the three style
tasks and the misleading-background task) through the same runner, and assert each claim the world shows:
the effect has the claimed sign and is at least three times its seed standard deviation
(`promptclip.reports.claims`). docs/tiny-clip.md lists the measured table and the claims the world does
not show, with their numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promptclip.commands.demo import DEMO_CLAIMS, PROFILES, SPURIOUS_TASK, STYLE_TASKS, claim_results
from promptclip.reports.claims import Claim, format_claim

# Claims the world does not show (docs/tiny-clip.md, "What the numbers show", gives the numbers and why); every
# other claim is asserted, and a claim listed here is checked to stay unshown, so the list cannot go stale.
NOT_SHOWN: frozenset[str] = frozenset(
    {
        "CoOp lowers new-class accuracy below zero-shot CLIP",
        "KgCoOp recovers part of CoOp's new-class loss (HM above CoOp's)",
        "CoCoOp recovers part of CoOp's new-class loss (HM above CoOp's)",
        "MaPLe recovers part of CoOp's new-class loss (HM above CoOp's)",
        "PromptSRC recovers part of CoOp's new-class loss (HM above CoOp's)",
        "DAPT raises MaPLe's accuracy when training backgrounds mislead",
        "DAPT raises CoOp's accuracy when training backgrounds mislead",
        "DAPT-S (exact masks) is at least as good as DAPT-G (Grad-CAM masks)",
        "MaPLe + DPC raises base accuracy over its stage-1 MaPLe",
        "DPC as a plug-in beats DePT on MaPLe (HM)",
    }
)


def _zero_shot_accuracy(task_name: str) -> dict[str, float]:
    """Zero-shot base and new accuracy (%) of the bundled model on a task's test split, as the demo runs it."""
    from promptclip import load_clip
    from promptclip.clip.tokenizer import tokenize
    from promptclip.data import synthetic
    from promptclip.pretraining.batches import images_to_pixels

    clip = load_clip("tiny-synthetic")
    task = synthetic.build_task(task_name, train_per_class=1, val_per_class=0, test_per_class=16)
    halves = {
        "base": range((len(task.classnames) + 1) // 2),
        "new": range((len(task.classnames) + 1) // 2, len(task.classnames)),
    }
    accuracy = {}
    for half, labels in halves.items():
        samples = [s for s in task.test if s.label in labels]
        images = torch.stack([images_to_pixels(task.render_sample(s)[0][None], clip.image_size)[0] for s in samples])
        prompts = tokenize([task.template.format(task.classnames[c]) for c in labels])
        with torch.no_grad():
            image = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
            text = torch.nn.functional.normalize(clip.encode_text(prompts), dim=-1)
        predicted = (image @ text.T).argmax(dim=-1) + labels.start
        truth = torch.tensor([s.label for s in samples])
        accuracy[half] = 100.0 * (predicted == truth).float().mean().item()
    return accuracy


@pytest.mark.parametrize("task", STYLE_TASKS)
def test_demo_world_leaves_room_above_zero_shot(task: str) -> None:
    # 15 classes per half: chance is 6.7%. Measured on the shipped model: 59-78% (docs/tiny-clip.md).
    accuracy = _zero_shot_accuracy(task)
    for half, value in accuracy.items():
        assert value >= 5 * 100.0 / 15, (half, accuracy)  # the model knows the kinds' names
        assert value <= 85.0, (half, accuracy)  # and the style leaves room for few-shot tuning


def test_the_misleading_backgrounds_point_to_a_wrong_class_and_the_kinds_are_known() -> None:
    from promptclip.data import synthetic

    task = synthetic.build_task(SPURIOUS_TASK, train_per_class=8, val_per_class=0, test_per_class=8)
    assert all(s.spec.scene == task.scene_of_class[s.label] for s in task.train)
    assert all(s.spec.scene == task.scene_of_class[(s.label + 1) % 10] for s in task.test)
    accuracy = _zero_shot_accuracy(SPURIOUS_TASK)  # 5 classes per half: chance 20%
    assert min(accuracy.values()) >= 60.0, accuracy


@pytest.fixture(scope="module")
def full_scores(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, int], dict[str, float]]:
    """(method, task, seed) -> base/new accuracy of `promptclip demo --full`, run once for the module."""
    from promptclip.commands.demo import DEMO_METHODS, demo_config, run_jobs
    from promptclip.protocols.spec import Sweep, expand

    profile = PROFILES["full"]
    runs_dir: Path = tmp_path_factory.mktemp("behaviour-runs")
    by_name = {item.name: item for item in DEMO_METHODS}
    jobs = []
    for dataset, names in profile.runs.items():
        for name in names:
            cfg = demo_config(by_name[name], device="cpu")
            sweep = Sweep(datasets=[dataset], seeds=profile.seeds_for(dataset), runs_dir=runs_dir, recipe="demo")
            jobs += [(by_name[name], spec, cfg) for spec in expand("base2new", cfg, sweep)]
    scores: dict[tuple[str, str, int], dict[str, float]] = {}
    for item, spec, _, accuracy in run_jobs(jobs, processes=None):
        assert accuracy is not None
        scores[(item.name, spec.dataset, spec.seed)] = accuracy
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("claim", [c for c in DEMO_CLAIMS if c.text not in NOT_SHOWN], ids=lambda c: c.text)
def test_the_world_shows_the_claim(claim: Claim, full_scores: dict[tuple[str, str, int], dict[str, float]]) -> None:
    (result,) = [r for r in claim_results(full_scores) if r.claim == claim]
    assert result.shown, format_claim(result)


@pytest.mark.slow
@pytest.mark.parametrize("claim", [c for c in DEMO_CLAIMS if c.text in NOT_SHOWN], ids=lambda c: c.text)
def test_the_documented_gaps_are_still_gaps(
    claim: Claim, full_scores: dict[tuple[str, str, int], dict[str, float]]
) -> None:
    (result,) = [r for r in claim_results(full_scores) if r.claim == claim]
    assert not result.shown, f"now shown; move it out of NOT_SHOWN and update docs/tiny-clip.md: {format_claim(result)}"
