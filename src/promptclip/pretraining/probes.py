"""Zero-shot probes of the model being pretrained on the downstream synthetic tasks (all classes, and the
base and new halves of a base-to-novel split), and their summary table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import tokenize
from promptclip.data import synthetic
from promptclip.pretraining.batches import RENDER_SIZE, images_to_pixels
from promptclip.reports.collect import harmonic_mean

__all__ = ["ZeroShotProbe", "build_probes", "format_zero_shot_table", "zero_shot_accuracy"]


@dataclass
class ZeroShotProbe:
    """Rendered images of one downstream task split, with its classes and prompt template."""

    task: str
    classnames: list[str]
    template: str
    images: np.ndarray
    labels: np.ndarray


#: The tasks checked during pretraining: the three plain-world tasks, the kinds, and the kinds in two styles.
PROBE_TASKS: tuple[str, ...] = (
    "synthetic_objects",
    "synthetic_shapes",
    "synthetic_scenes",
    "synthetic_kinds",
    "synthetic_kinds_pixel",
    "synthetic_kinds_noise",
)


def build_probes(split: str = "val", per_class: int = 8, seed: int = 0) -> list[ZeroShotProbe]:
    """One probe per task of :data:`PROBE_TASKS`: `per_class` images of every class from the task's `split`
    (in the task's own style)."""
    probes = []
    for name in PROBE_TASKS:
        counts = {"val_per_class": per_class} if split == "val" else {"test_per_class": per_class}
        task = synthetic.build_task(name, seed=seed, image_size=RENDER_SIZE, **counts)  # type: ignore[arg-type]
        samples = task.split(split)
        images = np.stack([task.render_sample(s)[0] for s in samples])
        labels = np.array([s.label for s in samples], dtype=np.int64)
        probes.append(ZeroShotProbe(name, list(task.classnames), task.template, images, labels))
    return probes


def _halves(num_classes: int) -> dict[str, list[int]]:
    cut = math.ceil(num_classes / 2)  # the field's base/new cut: base = first ceil(n/2) labels
    return {"all": list(range(num_classes)), "base": list(range(cut)), "new": list(range(cut, num_classes))}


@torch.no_grad()
def zero_shot_accuracy(
    model: CLIP, probes: Sequence[ZeroShotProbe], batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy (%) of `model` on each probe with the task's template: over all classes, and over
    the base and new halves (each half classified among its own classes, as in base-to-novel)."""
    was_training = model.training
    model.eval()
    device = model.token_embedding.weight.device
    results: dict[str, dict[str, float]] = {}
    for probe in probes:
        prompts = [probe.template.format(name) for name in probe.classnames]
        text = F.normalize(model.encode_text(tokenize(prompts, model.context_length).to(device)).float(), dim=-1)
        image = torch.cat(
            [
                F.normalize(
                    model.encode_image(
                        images_to_pixels(probe.images[i : i + batch_size], model.image_size).to(device)
                    ).float(),
                    dim=-1,
                )
                for i in range(0, len(probe.images), batch_size)
            ]
        )
        labels = torch.from_numpy(probe.labels).to(device)
        scores = image @ text.t()
        results[probe.task] = {}
        for half, classes in _halves(len(probe.classnames)).items():
            chosen = torch.tensor(classes, device=device)
            rows = torch.isin(labels, chosen)
            predicted = chosen[scores[rows][:, chosen].argmax(dim=1)]
            results[probe.task][half] = round(100.0 * (predicted == labels[rows]).float().mean().item(), 2)
    model.train(was_training)
    return results


def format_zero_shot_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of `zero_shot_accuracy` results, with the chance level of each half."""
    lines = [
        "| task | classes | base | new | HM | all | chance base / new |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        count = len(synthetic.build_task(task, train_per_class=1, val_per_class=0, test_per_class=1).classnames)
        halves = _halves(count)
        chance = f"{100 / len(halves['base']):.1f} / {100 / len(halves['new']):.1f}"
        hm = harmonic_mean(r["base"], r["new"])
        lines.append(f"| {task} | {count} | {r['base']:.1f} | {r['new']:.1f} | {hm:.1f} | {r['all']:.1f} | {chance} |")
    return "\n".join(lines)
