"""How a class name is written in a prompt: one rule for the datasets, the learners, the plug-ins and the commands.

Kept free of any other promptclip import so that every layer (data, methods, plug-ins, commands) can use it.
"""

from __future__ import annotations

from collections.abc import Iterable


def prompt_name(name: str) -> str:
    """The name that goes into a prompt: the field replaces underscores with spaces ("great_pyrenees" ->
    "great pyrenees"). Applying it to a name already written for prompts changes nothing."""
    return name.replace("_", " ")


def prompt_names(names: Iterable[str]) -> list[str]:
    """`prompt_name` of every name, in order."""
    return [prompt_name(name) for name in names]
