"""Domain generalisation: the ImageNet prompt evaluated on ImageNetV2, -Sketch, -A and -R.

The field evaluates the very models of cross-dataset transfer, so a finished cross-dataset run with the same
method, recipe, shots and seed is reused (its saved prompt is loaded, nothing is trained); otherwise the run
trains its own. ImageNet-A and -R are 200-class subsets: the classifier is built from those 200 names only.
Results hold "source" and one entry per target; the field reports the mean of the four targets.
"""

from __future__ import annotations

from promptclip.config import RunConfig
from promptclip.protocols import cross_dataset
from promptclip.protocols.spec import DG_TARGETS, RunSpec, Sweep

NAME = "domain_generalization"


def expand(cfg: RunConfig, sweep: Sweep) -> list[RunSpec]:
    return cross_dataset.transfer_specs(NAME, cfg, sweep, DG_TARGETS, prompt_from_protocol=cross_dataset.NAME)
