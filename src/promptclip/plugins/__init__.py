"""Plug-ins that wrap a learner and keep its contract (DAPT, DPC). Importing one registers it in PLUGINS."""

from __future__ import annotations

import importlib

PLUGIN_MODULES = ("dapt", "dpc")


def load_all() -> None:
    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
