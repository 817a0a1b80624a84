"""Errors of the weights loaders, and the short key listings their messages use."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "ActivationWarning",
    "MissingWeightsError",
    "TorchScriptRefusedError",
    "TorchScriptWarning",
    "WeightsError",
    "preview",
]


class WeightsError(ValueError):
    """A weights file that cannot be loaded (or loaded safely); the message says why and what to do."""


class MissingWeightsError(WeightsError):
    """No weights file found for an architecture name; the message says where to put one."""


class TorchScriptRefusedError(WeightsError):
    """A TorchScript archive that was not named by the user: opening it would run the code stored in it."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class TorchScriptWarning(UserWarning):
    """A TorchScript archive the user named is being opened, which runs the code stored in it."""


class ActivationWarning(UserWarning):
    """A state dict that cannot tell which MLP activation it was trained with, loaded under an assumed one."""


def preview(keys: Iterable[object], count: int = 5) -> str:
    """The first `count` keys, quoted, and how many there are in all when some are left out."""
    keys = [str(k) for k in keys]
    shown = ", ".join(repr(k) for k in keys[:count])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > count else shown
