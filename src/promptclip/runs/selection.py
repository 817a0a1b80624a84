"""Data-efficient training: keep a ratio of the training images, chosen by a selector that may read zero-shot
CLIP's features and predictions on them (see `promptclip.data.selection`)."""

from __future__ import annotations

from typing import Any

import torch

from promptclip.clip.model import CLIP
from promptclip.config import RunConfig
from promptclip.data.datasets import DatasetSplits
from promptclip.protocols.spec import RunSpec
from promptclip.runs.inputs import eval_loader


def zero_shot_outputs(
    clip: CLIP, splits: DatasetSplits, cfg: RunConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, image features, logits) of zero-shot CLIP on the training images, without augmentation."""
    from promptclip.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig

    zero_shot = ZeroShotCLIP(clip, splits.classnames, ZeroShotConfig(), template=splits.template).to(device)
    zero_shot.eval()
    loader = eval_loader(splits, "train", cfg, clip, device)
    labels, features, logits = [], [], []
    with torch.no_grad():
        for batch in loader:
            output = zero_shot({"image": batch["image"].to(device)})
            labels.append(batch["label"])
            features.append(output.image_features.float().cpu())
            logits.append(output.logits.float().cpu())
    return torch.cat(labels), torch.cat(features), torch.cat(logits)


def select_training_data(
    clip: CLIP, splits: DatasetSplits, spec: RunSpec, cfg: RunConfig, device: torch.device
) -> tuple[DatasetSplits, dict[str, Any]]:
    from promptclip.data.selection import SelectionInput, select
    from promptclip.registry import SELECTORS

    assert spec.ratio is not None and spec.selector is not None
    needs = SELECTORS.get(spec.selector).needs
    if needs:
        labels, features, logits = zero_shot_outputs(clip, splits, cfg, device)
    else:
        labels, features, logits = torch.tensor([d.label for d in splits.train]), None, None
    data = SelectionInput(
        labels=labels, features=features if "features" in needs else None, logits=logits if "logits" in needs else None
    )
    result = select(spec.selector, data, spec.ratio, spec.seed)
    kept = [splits.train[i] for i in result.indices]
    record = {
        "selector": spec.selector,
        "ratio": spec.ratio,
        "seed": spec.seed,
        "scored_by": "zero-shot CLIP" if needs else None,
        "kept": len(kept),
        "pool": len(splits.train),
        "warnings": result.warnings,
    }
    return splits.replace(train=kept), record
