"""Suite-wide settings: nothing reaches a network, and nothing is written into the user's cache folders.

And the tiny random CLIPs the tests share: each architecture and seed is built once per session.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from promptclip.clip.model import CLIP, ArchConfig
from promptclip.clip.weights import RANDOM_WEIGHTS, load_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.mktemp("promptclip-cache")
    os.environ["PROMPTCLIP_CACHE"] = str(cache)
    os.environ.setdefault("PROMPTCLIP_WEIGHTS", str(cache / "weights"))


# ---------------------------------------------------------------------------------------------------------
# Tiny random CLIPs
# ---------------------------------------------------------------------------------------------------------


Arch = str | Mapping[str, Any]
"""A registered architecture name ("tiny-vit", "tiny-rn") or an architecture as a dict (`ArchConfig`)."""


class TinyClips:
    """Frozen tiny CLIPs with random weights, built once per architecture and seed and then shared.

    * `tiny_clips(arch, seed)`: the shared model; the global random generator is left as it was.
    * `tiny_clips.seeded(arch, seed)`: the shared model, leaving the global generator where
      `torch.manual_seed(seed)` followed by building the model leaves it, as the tests did before the models
      were shared: what a test draws next (a learner's random init) is unchanged.
    * `tiny_clips.fresh(arch, seed)`: as `seeded`, but a private copy that the caller may change.
    * `tiny_clips.two_width(layers)`: the architecture of a tiny CLIP whose towers differ in width.

    A shared model must not be changed: a learner built on it freezes it and changes only its own tensors.
    """

    def __init__(self) -> None:
        self._built: dict[tuple[str, int], tuple[CLIP, torch.Tensor]] = {}

    def __call__(self, arch: Arch = "tiny-vit", seed: int = 0) -> CLIP:
        with torch.random.fork_rng(devices=[]):
            return self.seeded(arch, seed)

    def seeded(self, arch: Arch = "tiny-vit", seed: int = 0) -> CLIP:
        key = (arch if isinstance(arch, str) else json.dumps(arch, sort_keys=True), seed)
        torch.manual_seed(seed)
        if key in self._built:
            model, after = self._built[key]
            torch.set_rng_state(after)
            return model
        if isinstance(arch, str):
            model = load_clip(arch, weights=RANDOM_WEIGHTS)
        else:
            model = CLIP(ArchConfig.from_dict(dict(arch))).requires_grad_(False).eval()
        self._built[key] = (model, torch.get_rng_state())
        return model

    def fresh(self, arch: Arch = "tiny-vit", seed: int = 0) -> CLIP:
        return copy.deepcopy(self.seeded(arch, seed))

    @staticmethod
    def two_width(layers: int = 2, name: str = "tiny-two-width") -> dict[str, Any]:
        """A tiny ViT CLIP whose text (32) and vision (48) towers and embedding (24) all differ in width, so that
        a tensor sized for the wrong tower fails loudly."""
        return {
            "name": name,
            "embed_dim": 24,
            "vision": {"image_size": 32, "width": 48, "layers": layers, "heads": 2, "patch_size": 8},
            "text": {"width": 32, "heads": 2, "layers": layers},
        }


@pytest.fixture(scope="session")
def tiny_clips() -> TinyClips:
    """Every tiny CLIP of the session, by architecture and seed (see `TinyClips`)."""
    return TinyClips()


@pytest.fixture(scope="module")
def tiny_clip(tiny_clips: TinyClips) -> CLIP:
    """tiny-vit with the random weights of seed 0, shared by the whole session: do not change it. Its first use
    in a module seeds the global generator (0) as the module fixtures it replaces did."""
    return tiny_clips.seeded("tiny-vit", 0)


@pytest.fixture(scope="module")
def tiny_rn_clip(tiny_clips: TinyClips) -> CLIP:
    """tiny-rn (ResNet image tower) with the random weights of seed 0, shared: do not change it."""
    return tiny_clips.seeded("tiny-rn", 0)


@pytest.fixture
def fresh_tiny_clip(tiny_clips: TinyClips) -> CLIP:
    """A private copy of `tiny_clip`, for a test that changes the backbone."""
    return tiny_clips.fresh("tiny-vit", 0)
