"""Shared helpers for the benchmarks: timing, a description of the machine, random pictures, and BENCHMARKS.md
sections.

Each benchmark owns one section of BENCHMARKS.md, delimited by HTML comments; re-running a benchmark replaces
only its own section, and the file is rewritten atomically.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from promptclip.io import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_FILE = REPO_ROOT / "BENCHMARKS.md"
INTRO = """# Benchmarks

Speed measurements of promptclip, each written by the script named in its section (run it again to refresh
that section only). Every section names the machine it was measured on: compare numbers only within one
machine.
"""


class NoisePhotos:
    """A dataset reader of random RGB pictures of `size` (width, height), the same one for a path every time."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def load_image(self, datum: Any) -> Image.Image:
        width, height = self.size
        rng = np.random.default_rng(zlib.crc32(datum.path.encode()))
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu_model()}, {cores} cores available, torch {torch.__version__}, "
        f"torch threads: {torch.get_num_threads()}, Python {platform.python_version()}{load}"
    )


def interleaved_medians(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds of each function, timed in turns (a, b, a, b, ...) so that a change in machine load
    during the run weighs on all of them alike. `clock`: wall time by default; `time.process_time` counts the
    process's CPU time, which other processes on a loaded machine do not inflate."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = clock()
            function()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"


def write_section(name: str, body: str, path: Path = BENCHMARKS_FILE) -> None:
    """Put `body` into BENCHMARKS.md as the section of benchmark `name`, replacing its previous content."""
    begin, end = _markers(name)
    block = f"{begin}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.is_file() else INTRO
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text)
