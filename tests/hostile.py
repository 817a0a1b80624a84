"""The table of hostile and bad inputs, and the one checker every case goes through (`tests/test_hostile.py`).

A case builds its files in a fresh folder and returns the command line to run. The checker runs it (in
process, or as `python -m promptclip.cli` in a subprocess where a case says so) and asserts: the exit code; that
the message names what it must (the file or field, and the fix); that no Python traceback is printed; that no
payload ran (no `MARKER` file appeared); and that every byte of every file the case made is still there,
unless the case names files the command may write.

Case modules (`tests/hostile_*.py`) each define `CASES: list[Case]`; the classes are those of the
robustness table in docs/robustness.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "PAYLOAD_RAN"
SUBPROCESS_TIMEOUT_S = 600  # a loaded 2-core machine can take minutes to import torch and train a smoke run


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    """The robustness class: code, silent, overwrite, signal, traceback, unclear, diverge."""
    setup: Callable[[Path], Sequence[str]]
    """Make the case's files under the folder; return the promptclip arguments."""
    exit_code: int
    says: tuple[str, ...] = ()
    """Substrings of stderr (or stdout) that must appear; "{tmp}" stands for the case's folder."""
    may_write: tuple[str, ...] = ()
    """Paths (relative to the folder) the command may change; every other file made by `setup` is kept."""
    subprocess: bool = False
    check: Callable[[Path, str], None] | None = None
    """Extra assertions on the folder and the output after the command."""
    env: dict[str, str] = field(default_factory=dict)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def run_case(case: Case, folder: Path, argv: Sequence[str]) -> tuple[int, str]:
    argv = [str(a) for a in argv]
    if case.subprocess:
        env = {**os.environ, **case.env}
        done = subprocess.run(
            [sys.executable, "-m", "promptclip.cli", *argv],
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
            env=env,
            cwd=folder,
        )
        return done.returncode, done.stdout + done.stderr
    from promptclip.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = {k: os.environ.get(k) for k in case.env}
    os.environ.update(case.env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse
                code = int(exit_.code or 0)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return code, out.getvalue() + err.getvalue()


def check_case(case: Case, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    argv = case.setup(folder)
    before = snapshot(folder)
    code, output = run_case(case, folder, argv)
    shown = output.replace(str(folder), "{tmp}")
    assert "Traceback (most recent call last)" not in output, shown[-3000:]
    assert code == case.exit_code, f"exit {code}, expected {case.exit_code}:\n{shown[-3000:]}"
    for text in case.says:
        assert text.replace("{tmp}", str(folder)) in output, f"{text!r} not in:\n{shown[-3000:]}"
    assert not list(folder.rglob(MARKER)) and not (Path.cwd() / MARKER).exists(), "a payload ran"
    after = snapshot(folder)
    for name, digest in before.items():
        if any(name == w or name.startswith(w.rstrip("/") + "/") for w in case.may_write):
            continue
        assert after.get(name) == digest, f"{name} was changed or removed"
    if case.check is not None:
        case.check(folder, output)
