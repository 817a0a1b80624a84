"""The command line starts without torch: building the parser (and so `promptclip --help`) imports nothing
heavy; a command imports what it needs when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from promptclip.cli import build_parser

HEAVY = ("torch", "safetensors", "matplotlib", "tqdm")

BUILD_AND_LIST_MODULES = f"""
import json, sys
from promptclip.cli import build_parser
build_parser()
print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))
"""


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, check=False)


def test_building_the_command_line_imports_no_torch() -> None:
    done = run_python("-c", BUILD_AND_LIST_MODULES)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_help_lists_every_command_without_importing_torch() -> None:
    done = run_python("-X", "importtime", "-m", "promptclip", "--help")
    assert done.returncode == 0, done.stderr
    for command in ("train", "run", "evaluate", "masks", "explain", "pretrain", "demo", "weights"):
        assert command in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "promptclip.clip.model" not in imported


def test_options_added_on_first_use_parse_and_show_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    # `pretrain` takes its defaults from PretrainConfig (a torch import): they appear once the command is used.
    args = build_parser().parse_args(["pretrain", "--steps", "7"])
    assert args.steps == 7 and args.func.__name__ == "run_pretrain"
    from promptclip.pretraining import PretrainConfig

    assert args.batch_size == PretrainConfig().batch_size
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["pretrain", "--help"])
    assert exited.value.code == 0
    assert "--twin-fraction" in capsys.readouterr().out
