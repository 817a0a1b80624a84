"""benchmarks/gpu.py in its CI size (`--device cpu --tiny`): every line of the GPU benchmark runs, and the
report holds every row it promises."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def gpu_benchmark():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu

        yield gpu
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def tiny_report(gpu_benchmark) -> str:
    with torch.random.fork_rng():
        return gpu_benchmark.main(["--device", "cpu", "--tiny", "--no-write"])


def table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def positive(cell: str) -> bool:
    value = float(cell.replace(",", ""))
    return math.isfinite(value) and value > 0


def test_every_training_row_is_measured(gpu_benchmark, tiny_report):
    rows = table_rows(tiny_report, "| case | batch | path |")
    seen = {(r[0], r[2], r[3], r[4]) for r in rows}
    cases, precisions = list(gpu_benchmark.OFFICIAL_BATCH), gpu_benchmark.PRECISIONS
    expected = {(c, "promptclip", p, "no") for c in cases for p in precisions}
    expected |= {(c, "naive", "fp16", "no") for c in cases}
    expected |= {(cases[0], "promptclip", p, "yes") for p in precisions}  # --tiny compiles the first case
    assert seen == expected
    for row in rows:
        assert positive(row[5]) and positive(row[6]), row  # steps/s and images/s
        assert row[7] == "n/a" and row[8] == "n/a"  # peak memory and MFU are measured on a GPU only
        assert int(row[1]) <= 2  # --tiny caps the official batch sizes


def test_every_evaluation_row_and_the_loader_are_measured(gpu_benchmark, tiny_report):
    rows = table_rows(tiny_report, "| case | classes | path |")
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (c, n, p) for c in gpu_benchmark.OFFICIAL_BATCH for n in ("5", "10") for p in ("promptclip", "naive")
    }
    assert all(positive(r[4]) for r in rows)
    assert all(re.fullmatch(r"\*\*[\d.]+x\*\* for promptclip", r[5]) for r in rows if r[2] == "naive")
    loader = table_rows(tiny_report, "| training item |")
    assert len(loader) == 4 and all(positive(r[1]) for r in loader)
    assert all(int(cell) >= 1 for r in loader for cell in r[2:])


def test_the_peak_table_names_the_device(gpu_benchmark, monkeypatch):
    assert gpu_benchmark.peak_bf16_tflops(torch.device("cpu")) is None
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device, name=name: name)
        assert gpu_benchmark.peak_bf16_tflops(torch.device("cuda")) == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device: "Some Other GPU")
    assert gpu_benchmark.peak_bf16_tflops(torch.device("cuda")) is None


def test_without_cuda_the_command_says_how_to_run_the_ci_form(gpu_benchmark, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cpu --tiny"):
        gpu_benchmark.main(["--no-write"])
