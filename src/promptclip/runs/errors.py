"""Errors of the run layer; every message names the run folder (or file) and the fix."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot proceed as configured; the message names the run folder and the fix."""


class RunBusyError(RunError):
    """The run folder is locked by another running process (another sweep over the same runs folder)."""


class RunFolderError(RunError):
    """A run folder holds something a new run must not touch (a user's files, a run of another configuration,
    an interrupted run without --resume); nothing in it was changed."""
