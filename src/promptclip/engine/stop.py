"""Stopping on Ctrl-C (SIGINT) and on a batch scheduler's SIGTERM at a safe point.

While training or evaluation runs (`safe_points()`), a signal only records the request: the loop stops at the
next step boundary (`check()`), every `finally` runs (the run folder's lock is released) and `Stopped` tells the
command line which epoch was reached. Outside those loops a signal stops at once, also through `Stopped`. A
second signal while a stop is pending stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Stopped(Exception):
    """A run stopped on a signal; `epochs_done` epochs are checkpointed (None: not in training)."""

    def __init__(self, signum: int, epochs_done: int | None = None, epochs: int | None = None) -> None:
        self.signum = signum
        self.epochs_done = epochs_done
        self.epochs = epochs
        self.run_dir: Path | None = None
        super().__init__(f"stopped by {SIGNAL_NAMES.get(signal.Signals(signum), str(signum))}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    armed = 0
    requested: int | None = None


_STATE = _State()


def _handle(signum: int, frame: FrameType | None) -> None:
    if _STATE.armed and _STATE.requested is None:
        _STATE.requested = signum  # honoured at the next safe point
        return
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `Stopped` for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNAL_NAMES}
    _STATE.requested = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _STATE.requested = None


@contextlib.contextmanager
def safe_points() -> Iterator[None]:
    """Within: a signal waits for the next `check()`."""
    _STATE.armed += 1
    try:
        yield
    finally:
        _STATE.armed -= 1


def check(epochs_done: int | None = None, epochs: int | None = None) -> None:
    """Raise `Stopped` when a signal asked for a stop (call at step and epoch boundaries)."""
    if _STATE.requested is not None:
        signum, _STATE.requested = _STATE.requested, None
        raise Stopped(signum, epochs_done, epochs)
