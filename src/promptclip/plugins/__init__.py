"""Plug-ins that wrap a learner and keep its contract (DAPT, DPC, DePT). Importing one registers it in PLUGINS."""

from __future__ import annotations

from promptclip.registry import PLUGIN_MODULES, PLUGINS

__all__ = ["PLUGIN_MODULES", "load_all"]


def load_all() -> None:
    """Import every plugin module, filling the PLUGINS registry."""
    PLUGINS.load()
