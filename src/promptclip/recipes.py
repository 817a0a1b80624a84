"""Recipes: YAML run configurations, found by file path or by name (`coop/vit_b16_ep50`).

A name is looked up in `./configs/` first (a user's own recipes beside their runs), then in the recipes
that ship with promptclip. This module sits below the command layer so plug-ins (DPC's stage-1 recipe) can
resolve recipe names without importing commands.
"""

from __future__ import annotations

from pathlib import Path

from promptclip.config import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def resolve_recipe(value: str) -> Path:
    """A recipe file: a path, or a name under configs/ such as `coop/vit_b16_ep50`."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = value[:-5] if value.endswith(".yaml") else value
    for base in (Path("configs"), REPO_CONFIGS):
        candidate = base / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"--recipe {value}: no such file, and no configs/{name}.yaml; give a recipe file or a name such as "
        "coop/vit_b16_ep50 (see the configs/ folder)"
    )


def recipe_name(recipe: Path | None) -> str:
    return recipe.stem if recipe is not None else "default"
