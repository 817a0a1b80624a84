"""Errors a user can fix, and how the command line words them.

Every subsystem raises its own error type (a bad config key, a missing dataset file, a weights file that cannot
be read, a run folder that may not be used, a diverging run, a full disk); `user_error_message` turns any of
them into the one line the command line prints, and returns None for anything else (a bug, which keeps its
traceback). It looks the types up among the modules already imported, so importing this module costs nothing.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from promptclip.io import DISK_FULL_ERRNOS, DiskFullError


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


# (module, class name, hint added to the message)
_USER_ERRORS = (
    ("promptclip.config", "ConfigError", ""),
    ("promptclip.data.datasets.core", "DatasetError", ""),
    ("promptclip.engine.checkpoint", "CheckpointError", ""),
    ("promptclip.protocols.spec", "ProtocolError", ""),
    ("promptclip.runs.errors", "RunError", ""),
    ("promptclip.engine.train", "NonFiniteLossError", ""),
    ("promptclip.engine.train", "DivergedError", ""),
    ("promptclip.clip.errors", "TorchScriptRefusedError", ""),
    ("promptclip.clip.errors", "WeightsError", " (on the command line: --opts model.weights FILE, or --weights FILE)"),
    ("promptclip.clip.tokenizer", "TextTooLongError", ""),
    ("promptclip.methods.base", "PromptFileError", ""),
    ("promptclip.runs.results", "ResultFileError", ""),
)


def user_error_message(err: BaseException) -> str | None:
    """The message to print for an error the user can fix, or None."""
    if isinstance(err, CLIError):
        return str(err)
    for module_name, class_name, hint in _USER_ERRORS:
        module = sys.modules.get(module_name)
        error_type = getattr(module, class_name, None) if module is not None else None
        if isinstance(error_type, type) and isinstance(err, error_type):
            return f"{err}{hint}"
    if isinstance(err, OSError):
        return _os_error_message(err)
    if isinstance(err, KeyError) and err.args and str(err.args[0]).startswith("unknown "):
        return str(err.args[0])  # registry lookups name every known entry
    return None


def _os_error_message(err: OSError) -> str | None:
    """A full disk or a folder the user may not write to, named with its file."""
    where = f"{err.filename}: " if err.filename else ""
    if err.errno in DISK_FULL_ERRNOS:  # atomic writers raise DiskFullError; appends, a bare OSError
        return str(err if isinstance(err, DiskFullError) else DiskFullError(Path(err.filename or "(a file)"), err))
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and err.filename:  # a file stands where a folder must go
        return (
            f"{where}cannot be made a folder: a file stands in its place or in its path; choose another output "
            "path (--output, --out), or move that file aside"
        )
    if err.errno == errno.EISDIR and (err.filename2 or err.filename):  # os.replace(temporary, target)
        return (
            f"{err.filename2 or err.filename}: is a folder, and a file is to be written there; name a file instead "
            "(--output, --out)"
        )
    if err.errno == errno.EROFS:
        return (
            f"{where}cannot be written ({err.strerror}); choose a folder you can write to, on a writable disk "
            "(--runs-dir, --output, --out)"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{where}cannot be written ({err.strerror}); choose a folder you can write to (--runs-dir, --output, "
            "--out) or change its permissions"
        )
    return None
