"""Hostile and bad inputs, one table (`tests/hostile_*.py`), one checker (`tests/hostile.py`): each case asserts
the exit code, a message naming the file or field and the fix, no traceback, no payload run, and every earlier
byte intact."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hostile import SUBPROCESS_TIMEOUT_S, Case, check_case

CASE_MODULES = ("hostile_config", "hostile_files", "hostile_data")
CASES: list[Case] = [case for name in CASE_MODULES for case in importlib.import_module(name).CASES]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # a payload that writes to the working folder would land here, and be seen


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input(case: Case, tmp_path: Path) -> None:
    check_case(case, tmp_path / "case")


def test_the_table_covers_every_class() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    kinds = Counter(case.kind for case in CASES)
    assert set(kinds) <= {"code", "silent", "overwrite", "signal", "traceback", "unclear", "diverge"}


# -- signals, to a real process ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_a_safe_point_releases_the_lock_and_says_how_to_resume(
    signum: int, code: int, tmp_path: Path
) -> None:
    from promptclip.recipes import resolve_recipe

    run = tmp_path / "run"
    argv = ["train", "--recipe", str(resolve_recipe("smoke/coop")), "--output", str(run), "--quiet"]
    argv += ["--opts", "optim.epochs", "100000"]  # never finishes before the signal
    env = {**os.environ, "PROMPTCLIP_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "promptclip.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not (run / "checkpoints" / "last.pt").is_file():  # a checkpointed epoch: something to resume
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.2)
        process.send_signal(signum)
        _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, err
    assert "Traceback" not in err
    assert "epochs" in err and str(run) in err and "lock is released" in err
    assert f"Resume with: promptclip train --recipe {resolve_recipe('smoke/coop')}" in err and "--resume" in err
    assert not (run / ".lock").exists()
    assert not (run / "results.json").exists()
