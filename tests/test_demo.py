"""The `promptclip demo` and `promptclip pretrain` commands, end to end on small settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from promptclip.cli import main
from promptclip.io import sha256_file

# The demo's path on the tiny random test CLIP (32 px, 2 layers): fast, and every part of the command runs.
SMOKE = ["--arch", "tiny-vit", "--weights", "random", "--epochs", "1", "--datasets", "synthetic_shapes", "--seeds", "1"]


def test_demo_prints_the_table_and_writes_it_with_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--methods", "zeroshot,coop", *SMOKE]) == 0
    printed = capsys.readouterr().out
    rows = re.findall(r"^\| (\w+) +\| synthetic_shapes +\| +([\d.]+) \| +([\d.]+) \| +([\d.]+) \|$", printed, re.M)
    assert [r[0] for r in rows] == ["zeroshot", "coop"]
    for _, base, new, hm in rows:
        b, n, h = float(base), float(new), float(hm)
        assert 0 <= b <= 100 and 0 <= n <= 100
        assert h == pytest.approx(2 * b * n / (b + n) if b + n else 0.0, abs=0.01)
    assert "| Average" not in printed  # one dataset: no average row
    assert (out / "demo.md").read_text(encoding="utf-8").count("| synthetic_shapes") == 2
    pytest.importorskip("matplotlib")
    assert (out / "base2new_shots16_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_on_another_clip_keeps_both_and_shows_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--methods", "zeroshot", *SMOKE]) == 0
    smoke_on_other_arch = [*SMOKE[:1], "tiny-rn", *SMOKE[2:]]
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--methods", "zeroshot", *smoke_on_other_arch]) == 0
    printed = capsys.readouterr().out
    assert "Backbone: tiny-rn (random)." in printed and "tiny-vit" not in printed  # this call's runs only
    assert main(["report", str(out), "--no-plots", "--format", "md"]) == 0
    report = capsys.readouterr().out
    # The first run took the recipe's folder and goes by the method's name; the other is labelled by its arch.
    assert "| zeroshot (backbone.arch=tiny-rn) | synthetic_shapes | tiny-rn (random)  |" in report
    assert "| zeroshot                         | synthetic_shapes | tiny-vit (random) |" in report


def test_demo_runs_go_to_their_own_folder() -> None:
    from promptclip.commands.demo import DEFAULT_OUT

    assert DEFAULT_OUT.parts[0] != "runs"  # `promptclip report runs/` must not mix demo runs in


def test_demo_names_the_methods_it_knows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--methods", "coop,nonsense"]) == 2
    assert "choose from zeroshot, coop" in capsys.readouterr().err


def test_pretrain_command_exports_weights_with_their_sha256(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from promptclip import load_clip

    args = ["pretrain", "--out", str(tmp_path), "--steps", "2", "--batch-size", "4", "--warmup-steps", "0"]
    assert main([*args, "--eval-every", "1000", "--stop-after", "1", "--no-progress"]) == 0
    assert "stopped at step 1/2" in capsys.readouterr().out
    assert main([*args, "--eval-every", "1000", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    weights = tmp_path / "tiny-synthetic.safetensors"
    assert f"sha256 {sha256_file(weights)}" in printed
    from promptclip.pretraining.probes import PROBE_TASKS

    assert len(re.findall(r"^\| synthetic_\w+ \| \d+ \|", printed, re.M)) == len(PROBE_TASKS)
    assert load_clip(weights).config.name == "tiny-synthetic"
