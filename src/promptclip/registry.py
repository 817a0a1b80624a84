"""Typed name -> object registries (methods, plug-ins, datasets, selectors).

A registry is filled by decorators at import time of the module that defines the entry; `Registry.get`
names every known entry when a lookup fails, so a typo never ends in a bare KeyError.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name. `modules` names the modules that register entries: they are imported (by name, so
    the registry's users need no import of them) the first time the registry is read."""

    def __init__(self, kind: str, modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._modules = modules
        self._loaded = not modules

    def load(self) -> None:
        """Import every module that registers entries (once; a module that does not exist is passed over)."""
        if self._loaded:
            return
        self._loaded = True
        for module in self._modules:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:
                    raise

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        self.load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        self.load()
        return sorted(self._entries.items())

    def __len__(self) -> int:
        self.load()
        return len(self._entries)


METHOD_MODULES = ("zeroshot", "coop", "cocoop", "kgcoop", "maple", "ivlp", "promptsrc", "promptkd", "lp")
PLUGIN_MODULES = ("dapt", "dpc", "dept")

METHODS: Registry = Registry("method", tuple(f"promptclip.methods.{m}" for m in METHOD_MODULES))
PLUGINS: Registry = Registry("plug-in", tuple(f"promptclip.plugins.{m}" for m in PLUGIN_MODULES))
DATASETS: Registry = Registry("dataset")
SELECTORS: Registry = Registry("selector")
