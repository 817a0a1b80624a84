"""Files written through the atomic writers get the mode a new file gets under the user's umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from promptclip.io import atomic_write_text, atomic_write_with


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """`os.umask` for the test, with the process umask restored afterwards."""
    saved = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
def test_safetensors_through_atomic_write_follows_umask(
    tmp_path: Path, umask: Callable[[int], int], mask: int, expected: int
) -> None:
    umask(mask)
    path = tmp_path / "prompt.safetensors"
    # save_file recreates the file it is given, so the temporary file's own mode would be lost.
    atomic_write_with(path, lambda tmp: safetensors.torch.save_file({"ctx": torch.zeros(2, 3)}, str(tmp)))
    assert _mode(path) == expected
    assert torch.equal(safetensors.torch.load_file(str(path))["ctx"], torch.zeros(2, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["prompt.safetensors"]  # no temporary left behind


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
def test_text_files_follow_umask(tmp_path: Path, umask: Callable[[int], int], mask: int, expected: int) -> None:
    umask(mask)
    path = tmp_path / "results.json"
    atomic_write_text(path, "{}\n")
    assert _mode(path) == expected
