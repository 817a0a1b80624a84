"""`promptclip list {archs,datasets,methods,selectors}`."""

from __future__ import annotations

import argparse
import importlib

# Importing these modules fills the registries that `list` prints.
_REGISTRY_MODULES = {
    "datasets": ("promptclip.data.datasets",),
    "methods": ("promptclip.methods",),
    "selectors": ("promptclip.data.selection",),
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list architectures, datasets, methods or selectors")
    parser.add_argument("what", choices=["archs", "datasets", "methods", "selectors"])
    parser.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    if args.what == "archs":
        from promptclip.clip.weights import describe_archs

        print(describe_archs())
        return 0
    for module_name in _REGISTRY_MODULES[args.what]:
        module = importlib.import_module(module_name)
        if hasattr(module, "load_all"):
            module.load_all()
    from promptclip import registry

    table = {
        "datasets": registry.DATASETS,
        "methods": registry.METHODS,
        "selectors": registry.SELECTORS,
    }[args.what]
    for name, entry in table.items():
        summary = (getattr(entry, "__doc__", None) or "").strip().splitlines()
        print(f"{name:24s} {summary[0] if summary else ''}")
    return 0
