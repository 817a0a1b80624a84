"""Nothing the library reads can run code: pickles only through `torch.load(weights_only=True)`, YAML only
through `yaml.safe_load`, no eval/exec, and TorchScript archives only from a weights path the user names.

A scan of the source enforces the rules on every file (a new unsafe call fails it); then each reader that
opens files on its own (checkpoints, prompt folders, original prompt files, weights, recipes) is handed a
payload that would create a marker file if it ran.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path
from typing import Any

import pytest
import torch

import promptclip
from promptclip.cli import main
from promptclip.clip.weights import WeightsError, load_clip
from promptclip.engine.checkpoint import CHECKSUM_MARK, CheckpointError, load_checkpoint, load_resume_checkpoint
from promptclip.recipes import resolve_recipe

PACKAGE = Path(promptclip.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
RECIPE = resolve_recipe("smoke/coop")
# The one place a TorchScript archive is opened: a weights file the user gives (see docs/robustness.md).
TORCHSCRIPT_READERS = {"clip/weights.py"}


# ---------------------------------------------------------------------------------------------------------
# Source scan
# ---------------------------------------------------------------------------------------------------------


def dotted(node: ast.AST) -> str:
    """`torch.jit.load` for the function part of a call ("" when it is not a plain dotted name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


UNSAFE_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.load_all",
    "eval",
    "exec",
    "compile",
    "__import__",
}


def unsafe_uses(source: str, relative: str) -> list[str]:
    """Every call in `source` that could run code from a file, as "file:line call(...) why"."""
    tree = ast.parse(source, filename=relative)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "marshal", "dill", "shelve"):
            names = [alias.name for alias in node.names if alias.name in ("load", "loads", "Unpickler", "open")]
            found += [f"{relative}:{node.lineno} from {node.module} import {name}" for name in names]
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        where = f"{relative}:{node.lineno} {name}(...)"
        if name in UNSAFE_CALLS:
            found.append(where)
        elif name in ("torch.load", "torch.serialization.load") and not keyword_is_true(node, "weights_only"):
            found.append(where + " without weights_only=True")
        elif name in ("np.load", "numpy.load") and keyword_is_true(node, "allow_pickle"):
            found.append(where + " with allow_pickle=True")
        elif name.endswith("jit.load") and relative not in TORCHSCRIPT_READERS:
            found.append(where + " outside the weights reader")
    return found


def test_the_scan_catches_each_unsafe_call() -> None:
    lines = [
        "import pickle, yaml, torch",
        "pickle.loads(b'')",
        "yaml.load('a')",
        "torch.load('f')",
        "torch.load('f', weights_only=False)",
        "eval('1')",
        "torch.jit.load('m.pt')",
        "from pickle import loads",
        "model.eval()",  # a method, not the builtin: fine
        "yaml.safe_load('a')",
        "torch.load('f', weights_only=True)",
    ]
    found = unsafe_uses("\n".join(lines) + "\n", "probe.py")
    assert sorted(int(entry.split(" ", 1)[0].split(":")[1]) for entry in found) == [2, 3, 4, 5, 6, 7, 8]
    assert unsafe_uses("torch.jit.load('m.pt')\n", "clip/weights.py") == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_source_file_can_run_code_from_a_file(path: Path) -> None:
    assert unsafe_uses(path.read_text(encoding="utf-8"), path.relative_to(PACKAGE).as_posix()) == []


# ---------------------------------------------------------------------------------------------------------
# Payloads that would run code
# ---------------------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this creates `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def evil_torch_file(path: Path, marker: Path, payload: dict[str, Any] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(payload or {}), "hook": RunsCode(marker)}, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    last = evil_torch_file(tmp_path / "checkpoints" / "last.pt", marker, {"format": 1, "epoch": 3})
    with pytest.raises(CheckpointError, match=rf"{last}: cannot be read"):
        load_checkpoint(last)
    # A valid checksum does not make it trusted: the checksum guards against damage, weights_only against code.
    import hashlib

    body = last.read_bytes()
    last.write_bytes(body + CHECKSUM_MARK + hashlib.sha256(body).hexdigest().encode() + b"\n")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_resume_checkpoint(last)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*looks like a TorchScript archive:UserWarning")
def test_a_torchscript_archive_as_a_checkpoint_or_prompt_is_not_compiled(
    tiny_clip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: opened.append(str(args[0])))
    archive = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), archive)
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(archive.getvalue())
    with pytest.raises(CheckpointError):
        load_checkpoint(last)
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "prompt.safetensors").write_bytes(archive.getvalue())
    (prompt / "prompt_config.json").write_text('{"method": "coop", "classnames": ["a"], "backbone": {}}')
    from promptclip.methods.base import PromptModel

    with pytest.raises(ValueError, match="not a readable prompt file"):
        PromptModel.from_pretrained(tiny_clip, prompt)
    assert opened == []


def test_a_prompt_folder_holding_a_pickle_is_refused(tiny_clip, tmp_path: Path) -> None:
    from promptclip.methods.base import PromptModel
    from promptclip.methods.coop import CoOp, CoOpConfig

    marker = tmp_path / "code_ran"
    clip = tiny_clip
    CoOp(clip, ["a", "b"], CoOpConfig(n_ctx=2)).save_pretrained(tmp_path / "prompt")
    evil_torch_file(tmp_path / "prompt" / "prompt.safetensors", marker, {"ctx": torch.zeros(2, 64)})
    with pytest.raises(ValueError, match="not a readable prompt file"):
        PromptModel.from_pretrained(clip, tmp_path / "prompt")
    assert not marker.exists()


def test_an_original_prompt_file_that_would_run_code_is_refused(tiny_clip, tmp_path: Path) -> None:
    from promptclip.methods.official import OfficialCheckpointError, load_official_prompt

    marker = tmp_path / "code_ran"
    path = evil_torch_file(tmp_path / "model.pth.tar-5", marker, {"state_dict": {"ctx": torch.zeros(4, 64)}})
    with pytest.raises(OfficialCheckpointError, match=str(path)):
        load_official_prompt(path, tiny_clip, ["a", "b"])
    assert not marker.exists()


def test_a_weights_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = evil_torch_file(tmp_path / "ViT-B-16.pt", marker, {"token_embedding.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightsError, match="refused: not a plain tensor file"):
        load_clip(path)
    assert not marker.exists()


def test_a_recipe_that_would_run_code_is_refused(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "code_ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"method: coop\nnote: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", "--recipe", str(recipe), "--output", str(tmp_path / "run")]) == 2
    assert f"{recipe}: not valid YAML" in capsys.readouterr().err
    assert not marker.exists()


def test_train_resume_and_eval_unpickle_nothing_but_plain_data(tiny_clip, tmp_path: Path, monkeypatch, capsys) -> None:
    """A whole train, resume and eval cycle with unrestricted unpickling and TorchScript made impossible."""
    import pickle

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unrestricted unpickling or TorchScript")

    class Refuse(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise AssertionError(f"unrestricted unpickling of {module}.{name}")

    from promptclip.clip.weights import save_clip

    weights = save_clip(tiny_clip, tmp_path / "tiny-vit.safetensors")
    monkeypatch.setattr(pickle, "Unpickler", Refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    argv = ["train", "--recipe", str(RECIPE), "--output", str(run_dir), "--quiet", "--no-progress"]
    opts = ["--opts", "optim.epochs", "2", "model.weights", str(weights)]
    assert main([*argv, *opts]) == 0
    (run_dir / "results.json").unlink()  # as if killed while writing it: the resume reads the checkpoint
    assert main([*argv, "--resume", *opts]) == 0
    assert "resumed from" in (run_dir / "log.txt").read_text()
    options = ["--set", "train_per_class=4", "--set", "test_per_class=3", "--set", "image_size=32"]
    assert main(["eval", "--prompt", str(run_dir / "prompt"), "--dataset", "synthetic_shapes", *options]) == 0
    assert "accuracy" in capsys.readouterr().out
