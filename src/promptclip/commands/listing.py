"""`promptclip list {archs,datasets,methods,plugins,recipes,selectors}`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import typing

# Importing these modules fills the registries that `list` prints.
_REGISTRY_MODULES = {
    "datasets": ("promptclip.data.datasets",),
    "methods": ("promptclip.methods",),
    "selectors": ("promptclip.data.selection",),
    "plugins": ("promptclip.plugins",),
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list architectures, datasets, methods, plug-ins, recipes or selectors")
    parser.add_argument("what", choices=["archs", "datasets", "methods", "plugins", "recipes", "selectors"])
    parser.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    if args.what == "archs":
        from promptclip.clip.arch_names import describe_archs

        print(describe_archs())
        return 0
    if args.what == "recipes":
        print_recipes()
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
        "plugins": registry.PLUGINS,
    }[args.what]
    for name, entry in table.items():
        summary = (getattr(entry, "__doc__", None) or "").strip().splitlines()
        print(f"{name:24s} {summary[0] if summary else ''}")
        config_cls = getattr(entry, "Config", None)
        if (
            args.what in ("methods", "plugins")
            and isinstance(config_cls, type)
            and dataclasses.is_dataclass(config_cls)
        ):
            for line in describe_config(config_cls):
                print(f"{'':26s}{line}")
    return 0


def print_recipes() -> None:
    """Name, method and summary of every recipe; `--recipe NAME` takes the name."""
    from promptclip.recipes import list_recipes

    recipes = list_recipes()
    width = max((len(recipe.name) for recipe in recipes), default=0)
    for recipe in recipes:
        where = "  [./configs]" if recipe.local else ""
        print(f"{recipe.name:{width}s}  {recipe.method:16s} {recipe.description}{where}")


def describe_config(config_cls: type) -> list[str]:
    """One line per field: name, type and default, so a user can write `--opts method_cfg.<name> <value>`."""
    hints = typing.get_type_hints(config_cls)
    lines = []
    for field in dataclasses.fields(config_cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        type_name = str(hints[field.name]).replace("typing.", "")
        if isinstance(hints[field.name], type):
            type_name = hints[field.name].__name__
        lines.append(f"{field.name}: {type_name} = {default}")
    return lines
