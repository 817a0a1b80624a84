"""Recipes: YAML run configurations, found by file path or by name (`coop/vit_b16_ep50`).

A name is looked up in `./configs/` first (a user's own recipes beside their runs), then in the recipes
that ship inside the package (`promptclip/configs/`, read through `importlib.resources`, so a wheel install
finds them too). This module sits below the command layer so plug-ins (DPC's stage-1 recipe) can resolve
recipe names without importing commands.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from promptclip.config import ConfigError

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

LOCAL_CONFIGS = Path("configs")  # relative: the current folder's own recipes
PACKAGE_CONFIGS = "configs"  # folder of recipes inside the promptclip package
RECIPE_SUFFIX = ".yaml"
DESCRIPTION_WIDTH = 100

# Recipes of a package imported from a zip file are copied out once and deleted at exit.
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


@dataclass(frozen=True)
class RecipeInfo:
    """A recipe by name: where it is, the method it names and its one-line description."""

    name: str
    path: Path
    method: str
    description: str
    local: bool  # from ./configs/ rather than shipped with promptclip


def packaged_recipes_dir() -> Traversable:
    """The folder of the recipes that ship with promptclip."""
    return resources.files("promptclip") / PACKAGE_CONFIGS


def _as_path(resource: Traversable) -> Path:
    if isinstance(resource, Path):
        return resource
    return _extracted.enter_context(resources.as_file(resource))


def _packaged_recipe(name: str) -> Path | None:
    resource = packaged_recipes_dir()
    for part in f"{name}{RECIPE_SUFFIX}".split("/"):
        if part in ("", ".", ".."):
            return None  # a name never climbs out of the recipe folder
        resource = resource / part
    return _as_path(resource) if resource.is_file() else None


def resolve_recipe(value: str) -> Path:
    """A recipe file: a path, or a name such as `coop/vit_b16_ep50` (./configs/ first, then promptclip's)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = value[: -len(RECIPE_SUFFIX)] if value.endswith(RECIPE_SUFFIX) else value
    local = LOCAL_CONFIGS / f"{name}{RECIPE_SUFFIX}"
    if local.is_file():
        return local
    packaged = _packaged_recipe(name.replace("\\", "/"))
    if packaged is not None:
        return packaged
    close = difflib.get_close_matches(name, recipe_names(), n=5, cutoff=0.5)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise ConfigError(
        f"--recipe {value}: no such file, and no recipe named {name!r} in ./configs/ or among promptclip's "
        f"recipes{hint}; give a recipe file or a name that `promptclip list recipes` shows (e.g. coop/vit_b16_ep50)"
    )


def recipe_name(recipe: Path | None) -> str:
    return recipe.stem if recipe is not None else "default"


def _walk(folder: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    """(name, file) of every recipe below `folder`, names with `/` between folders."""
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir():
            found += _walk(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(RECIPE_SUFFIX):
            found.append((f"{prefix}{entry.name[: -len(RECIPE_SUFFIX)]}", entry))
    return found


def _recipe_files() -> dict[str, tuple[Traversable, bool]]:
    """name -> (file, local); a recipe in ./configs/ hides the shipped one of the same name."""
    files = {name: (entry, False) for name, entry in _walk(packaged_recipes_dir())}
    if LOCAL_CONFIGS.is_dir():
        files.update({name: (entry, True) for name, entry in _walk(LOCAL_CONFIGS)})
    return files


def recipe_names() -> list[str]:
    """Every recipe name, sorted: the shipped ones and those in ./configs/."""
    return sorted(_recipe_files())


def list_recipes() -> list[RecipeInfo]:
    """Every recipe by name, sorted, with its method and the first clause of its leading comment."""
    recipes = []
    for name, (entry, local) in sorted(_recipe_files().items()):
        text = entry.read_text(encoding="utf-8")
        recipes.append(RecipeInfo(name, _as_path(entry), _method_of(text), describe(text), local))
    return recipes


def _method_of(text: str) -> str:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return "(not valid YAML)"
    method = data.get("method") if isinstance(data, dict) else None
    return str(method) if method else "(none)"


def describe(text: str, width: int = DESCRIPTION_WIDTH) -> str:
    """One line from a recipe's leading comment: its first clause (up to `:`, `;` or the end of the first
    sentence), parenthesised asides left out, cut to `width` characters."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    comment = " ".join(line for line in lines if line)
    summary, depth = [], 0
    for index, char in enumerate(comment):
        following = comment[index + 1 : index + 2]
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(0, depth - 1)
        elif depth == 0 and (char in ":;" or char == ".") and following in ("", " "):
            break
        elif depth == 0:
            summary.append(char)
    line = " ".join("".join(summary).split())
    line = line.replace(" ,", ",")  # where an aside sat before a comma
    return line if len(line) <= width else line[: width - 3].rstrip() + "..."
