"""Recipes ship inside the package: found by name from any folder and from a wheel install, listed by
`promptclip list recipes`, with the user's own `./configs/` looked at first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import promptclip
from promptclip.cli import main
from promptclip.config import ConfigError, build_run_config, load_recipe
from promptclip.recipes import describe, list_recipes, recipe_name, resolve_recipe

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(promptclip.__file__).resolve().parent
SUBPROCESS_TIMEOUT = 600  # a loaded 2-core machine builds, creates the venv and installs in well under this


def test_a_name_resolves_to_the_shipped_recipe_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = resolve_recipe("coop/vit_b16_ep50")
    assert path == PACKAGE / "configs" / "coop" / "vit_b16_ep50.yaml"
    assert resolve_recipe("coop/vit_b16_ep50.yaml") == path
    assert recipe_name(path) == "vit_b16_ep50"
    assert load_recipe(path)["method"] == "coop"


def test_a_file_path_and_a_local_configs_folder_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "elsewhere" / "mine.yaml"
    own.parent.mkdir()
    own.write_text("method: coop\n")
    assert resolve_recipe(str(own)) == own
    local = tmp_path / "configs" / "coop" / "vit_b16_ep50.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("# My CoOp: fewer epochs\nmethod: coop\n")
    assert resolve_recipe("coop/vit_b16_ep50").resolve() == local.resolve()
    listed = {recipe.name: recipe for recipe in list_recipes()}
    assert listed["coop/vit_b16_ep50"].local and listed["coop/vit_b16_ep50"].description == "My CoOp"
    assert not listed["coop/vit_b16_ep100"].local


def test_an_unknown_name_lists_close_matches_and_the_list_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        resolve_recipe("coop/vit_b16_ep5")
    message = str(caught.value)
    assert "coop/vit_b16_ep50" in message and "promptclip list recipes" in message
    with pytest.raises(ConfigError, match="promptclip list recipes"):
        resolve_recipe("../recipes")  # a name never leaves the recipe folder


def test_every_shipped_recipe_has_a_method_and_a_description() -> None:
    recipes = [recipe for recipe in list_recipes() if not recipe.local]
    assert len(recipes) >= 50 and "smoke/coop" in {recipe.name for recipe in recipes}
    for recipe in recipes:
        assert recipe.path.is_file() and recipe.path.is_relative_to(PACKAGE / "configs")
        assert recipe.method not in ("(none)", "(not valid YAML)"), recipe.name
        assert recipe.description and len(recipe.description) <= 100, recipe.name


def test_smoke_recipes_build_a_run_config() -> None:
    for recipe in list_recipes():
        if recipe.name.startswith("smoke/"):
            build_run_config(load_recipe(recipe.path), source=recipe.name)


def test_describe_takes_the_first_clause_without_asides() -> None:
    text = "# CoOp+DPC (stage 2: the second), ViT-B/16: more words\n# and more.\nmethod: coop\n"
    assert describe(text) == "CoOp+DPC, ViT-B/16"
    assert describe("method: coop\n") == ""
    assert describe("# " + "word " * 40 + "\n", width=30).endswith("...")


def test_list_recipes_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    smoke = next(line for line in lines if line.startswith("smoke/coop "))
    assert smoke.split()[1] == "coop" and "Smoke test" in smoke


def _copy_project(destination: Path) -> Path:
    """The files a wheel is built from, copied so the build leaves nothing in the working tree."""
    project = destination / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return project


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_recipes_resolve_from_a_wheel_install(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH" and not key.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    project = _copy_project(tmp_path)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    _run([*build, "-w", str(wheels), str(project)], tmp_path, env)
    (wheel,) = wheels.glob("promptclip-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    if sys.prefix != sys.base_prefix:
        # Inside a virtual environment torch & co. live in its site-packages, which --system-site-packages
        # does not reach; add that folder by name (its .pth files, the editable install's included, are not read).
        site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
        Path(site.strip(), "outer_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index", "-q"]
    _run([*install, str(wheel)], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"  # no ./configs/ and no source tree in sight
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import promptclip; print(promptclip.__file__)"], elsewhere, env)
    assert Path(where.strip()).resolve().is_relative_to(venv.resolve()), f"the venv imports {where.strip()}"
    resolved = _run(
        [
            str(python),
            "-c",
            "from promptclip.recipes import resolve_recipe; print(resolve_recipe('coop/vit_b16_ep50'))",
        ],
        elsewhere,
        env,
    )
    assert Path(resolved.strip()).resolve().is_relative_to(venv.resolve())
    assert resolved.strip().endswith("vit_b16_ep50.yaml")
    listing = _run([str(bin_dir / "promptclip"), "list", "recipes"], elsewhere, env)
    assert any(line.startswith("coop/vit_b16_ep50 ") for line in listing.splitlines())
