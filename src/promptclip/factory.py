"""Building learners and run configurations: the one place above methods and plug-ins.

* `get_prompt_model(clip, method_cfg, classnames, plugins=...)`: a method's learner, wrapped in plug-ins;
* `from_pretrained(clip, folder)`: a saved prompt (with its plug-in stack) onto a loaded CLIP;
* `run_needs(cfg)`: what a run of `cfg` must supply (masks, a stage-1 run, ...), merged through the stack;
* `load_run_config(recipe, opts)` / `build_run_config(data)` and `resolve_recipe(name)`.

The run layer, the commands and users' scripts build through here; methods and plug-ins never import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from promptclip.clip.model import CLIP
from promptclip.config import RunConfig, build_run_config, load_run_config
from promptclip.methods.base import (
    PluginContext,
    PromptModel,
    RunNeeds,
    get_method,
    wrap_with_plugins,
)
from promptclip.methods.base import get_prompt_model as _method_learner
from promptclip.recipes import recipe_name, resolve_recipe
from promptclip.registry import PLUGINS

__all__ = [
    "build_run_config",
    "from_pretrained",
    "get_method",
    "get_plugin",
    "get_prompt_model",
    "learner_for_run",
    "load_run_config",
    "recipe_name",
    "resolve_recipe",
    "run_needs",
    "wrap_with_plugins",
]


def get_plugin(name: str) -> type[PromptModel]:
    return PLUGINS.get(name)  # type: ignore[no-any-return]


def get_prompt_model(
    clip: CLIP,
    method_cfg: Any,
    classnames: Sequence[str],
    template: str = "a photo of a {}.",
    method: str | None = None,
    plugins: Mapping[str, Any] | None = None,
    context: PluginContext | None = None,
) -> PromptModel:
    """A learner: `method_cfg` is a method's Config instance (or a mapping with a `method` key), wrapped in
    each of `plugins` (name -> config instance or mapping) in order, with `context` for the plug-ins."""
    learner = _method_learner(clip, method_cfg, classnames, template=template, method=method)
    return wrap_with_plugins(learner, plugins, context) if plugins else learner


def learner_for_run(
    clip: CLIP, cfg: RunConfig, classnames: Sequence[str], template: str, context: PluginContext | None = None
) -> PromptModel:
    """The learner of run config `cfg`: its method and plug-ins."""
    return get_prompt_model(
        clip,
        cfg.method_cfg,
        classnames,
        template=template,
        method=cfg.method_name,
        plugins=cfg.plugins,
        context=context,
    )


def from_pretrained(
    clip: CLIP, directory: str | Path, classnames: Sequence[str] | None = None, strict_backbone: bool = True
) -> PromptModel:
    """Load a saved prompt folder onto `clip` (refused for another backbone); see `PromptModel.from_pretrained`."""
    return PromptModel.from_pretrained(clip, directory, classnames=classnames, strict_backbone=strict_backbone)


def run_needs(cfg: RunConfig) -> RunNeeds:
    """What a run of `cfg` needs: the method's `needs`, merged with each plug-in's, innermost first."""
    needs = get_method(cfg.method_name).needs(cfg.method_cfg, cfg)
    for name in cfg.plugin_names:
        needs = needs.merge(get_plugin(name).needs(cfg.plugins[name], cfg))
    return needs
