"""Prompt methods, one module each. Importing a module registers its learner in `METHODS`."""

from __future__ import annotations

from promptclip.registry import METHOD_MODULES, METHODS

__all__ = ["METHOD_MODULES", "load_all"]


def load_all() -> None:
    """Import every method module, filling the METHODS registry."""
    METHODS.load()
