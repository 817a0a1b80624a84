"""Suite-wide settings: nothing reaches a network, and nothing is written into the user's cache folders."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.mktemp("promptclip-cache")
    os.environ["PROMPTCLIP_CACHE"] = str(cache)
    os.environ.setdefault("PROMPTCLIP_WEIGHTS", str(cache / "weights"))
