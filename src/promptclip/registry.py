"""Typed name -> object registries (methods, plug-ins, datasets, selectors).

A registry is filled by decorators at import time of the module that defines the entry; `Registry.get`
names every known entry when a lookup fails, so a typo never ends in a bare KeyError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)


METHODS: Registry = Registry("method")
PLUGINS: Registry = Registry("plug-in")
DATASETS: Registry = Registry("dataset")
SELECTORS: Registry = Registry("selector")
