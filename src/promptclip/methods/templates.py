"""Hand-written prompt templates used by the field."""

from __future__ import annotations

# The 7-template ensemble of zero-shot CLIP in the CoOp code base (ZeroshotCLIP2); the dataset's own template is
# added to these for every dataset other than ImageNet.
IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
