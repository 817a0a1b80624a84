"""Prompt methods, one module each. Importing a module registers its learner in `METHODS`."""

from __future__ import annotations

import importlib

METHOD_MODULES = ("zeroshot", "coop", "cocoop", "kgcoop", "maple", "ivlp", "promptsrc", "promptkd")


def load_all() -> None:
    """Import every method module that exists, filling the METHODS registry."""
    for name in METHOD_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
