"""Hostile and bad inputs of the files the commands read and write (see `tests/hostile.py`): backbone paths named
by run and prompt folders, class names too long for CLIP, non-UTF-8 CSVs, damaged run configs, a full disk, a
read-only runs folder, and prompt folders that are not prompts.

Where a case must show that no code ran, `torch.jit.load` is wrapped so that, while the case runs (its env sets
`TRIPWIRE_ENV`), reaching it creates the `MARKER` file the checker looks for. A read-only folder is a real read-only
bind mount where this process may mount (root on Linux); elsewhere `os.mkdir`, `os.open`, `os.rename` and
`os.replace` refuse writes below it with EROFS while the case runs. A full disk under safetensors is a real 64 KiB
tmpfs for `convert-weights` where mounts are allowed; for the prompt a training run saves, the prompt writer raises
what safetensors raises on ENOSPC. Each wrapper is installed once, and does nothing but call the original unless
its variable is set; the file-system wrappers are installed only where no mount is possible.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from hostile import MARKER, Case
from PIL import Image
from torch import nn

from promptclip.recipes import resolve_recipe

SMOKE = str(resolve_recipe("smoke/coop"))
SYNTHETIC = ["--set", "train_per_class=4", "--set", "val_per_class=2", "--set", "test_per_class=3"]
SYNTHETIC += ["--set", "image_size=32"]

TRIPWIRE_ENV = "PROMPTCLIP_TEST_TORCHSCRIPT_TRIPWIRE"
"""Set: reaching `torch.jit.load` creates `MARKER` in the working folder (then loads as usual)."""
FULL_DISK_ENV = "PROMPTCLIP_TEST_FULL_DISK"
"""Set: a prompt's safetensors write fails as safetensors fails on a full disk (fallback for tmpfs)."""
READ_ONLY_ENV = "PROMPTCLIP_TEST_READ_ONLY"
"""Set: folders holding a `READ_ONLY_SENTINEL` refuse writes with EROFS (fallback for a read-only mount)."""
READ_ONLY_SENTINEL = ".read-only-for-tests"
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"
"""What safetensors raises (as its own `SafetensorError`) when the disk fills while it writes."""


# ---------------------------------------------------------------------------------------------------------
# Instruments: inert unless their environment variable is set (the checker sets a case's env only while it runs)
# ---------------------------------------------------------------------------------------------------------


def install_instruments() -> None:
    """Wrap `torch.jit.load` (tripwire) and the prompt writer (full disk), once per process; each wrapper does
    nothing but call the original unless its variable is set."""
    if getattr(torch.jit.load, "_tripwire", False):
        return
    import promptclip.methods.base as prompt_files

    jit_load = torch.jit.load

    def tripwire(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get(TRIPWIRE_ENV):
            Path(MARKER).touch()  # the checker fails a case that leaves this file
        return jit_load(*args, **kwargs)

    tripwire._tripwire = True  # type: ignore[attr-defined]
    torch.jit.load = tripwire

    save_file = prompt_files.save_file

    def full_disk(tensors: Any, filename: str, metadata: Any = None) -> None:
        if not os.environ.get(FULL_DISK_ENV):
            return save_file(tensors, filename, metadata=metadata)  # type: ignore[no-any-return]
        from safetensors import SafetensorError

        Path(filename).write_bytes(b"\0" * 64)  # what a full disk leaves: part of the file
        raise SafetensorError(SAFETENSORS_ENOSPC)

    prompt_files.save_file = full_disk  # type: ignore[assignment]


def _read_only(path: Any) -> bool:
    if not os.environ.get(READ_ONLY_ENV) or isinstance(path, int):
        return False
    target = Path(os.fsdecode(path)).absolute()
    return any((folder / READ_ONLY_SENTINEL).exists() for folder in (target, *target.parents))


def _refuse(path: Any) -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))


def _install_read_only_calls() -> None:
    if getattr(os.mkdir, "_read_only", False):
        return
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    os_open, os_mkdir, os_rename, os_replace, os_unlink = os.open, os.mkdir, os.rename, os.replace, os.unlink

    def guarded_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        exists_already = flags & os.O_EXCL and os.path.lexists(path)  # the kernel says EEXIST first
        if flags & writes and _read_only(path) and not exists_already:
            raise _refuse(path)
        return os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if _read_only(path):
            raise _refuse(path)
        os_mkdir(path, *args, **kwargs)

    def guarded_move(move: Callable[..., None]) -> Callable[..., None]:
        def guarded(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
            if _read_only(source) or _read_only(target):
                raise _refuse(target)
            move(source, target, *args, **kwargs)

        return guarded

    def guarded_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if _read_only(path):
            raise _refuse(path)
        os_unlink(path, *args, **kwargs)

    os.open = guarded_open  # type: ignore[assignment]
    os.mkdir = guarded_mkdir
    os.rename, os.replace = guarded_move(os_rename), guarded_move(os_replace)
    os.unlink = guarded_unlink
    guarded_mkdir._read_only = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------
# Mounts (root on Linux): a real read-only folder and a real full disk
# ---------------------------------------------------------------------------------------------------------

_MOUNTED: list[Path] = []


def _unmount_all() -> None:
    while _MOUNTED:
        subprocess.run(["umount", "-l", str(_MOUNTED.pop())], capture_output=True, check=False)


atexit.register(_unmount_all)


def _mount(*args: str) -> bool:
    if os.environ.get("PROMPTCLIP_TEST_NO_MOUNT") or shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


def _writes_fail(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


def make_read_only(folder: Path) -> None:
    """`folder` and everything below it read-only: a read-only bind mount, else the EROFS fallback."""
    if _mount("--bind", str(folder), str(folder)):
        _MOUNTED.append(folder)
        if _mount("-o", "remount,bind,ro", str(folder), str(folder)) and _writes_fail(folder):
            return
        _MOUNTED.remove(folder)
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
    _install_read_only_calls()
    (folder / READ_ONLY_SENTINEL).write_text("writes below this folder fail with EROFS while the case runs\n")


def _can_mount_tmpfs() -> bool:
    with tempfile.TemporaryDirectory() as folder:
        if not _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", folder):
            return False
        subprocess.run(["umount", folder], capture_output=True, check=False)
        return True


CAN_MOUNT = _can_mount_tmpfs()


def small_disk(folder: Path) -> None:
    """A 64 KiB tmpfs at `folder` (only used where `CAN_MOUNT`)."""
    folder.mkdir(parents=True, exist_ok=True)
    assert _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)), "tmpfs mount failed"
    _MOUNTED.append(folder)


# ---------------------------------------------------------------------------------------------------------
# Files: a TorchScript archive of tiny CLIP weights, a run trained on it, images, CSVs
# ---------------------------------------------------------------------------------------------------------


class _TensorHolder(nn.Module):
    """A scriptable module that only holds tensors, standing in for OpenAI's scripted CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_archive(path: Path) -> Path:
    """A TorchScript archive holding tiny-vit CLIP weights (fixed seed) in OpenAI's key layout."""
    from promptclip.clip.weights import load_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = load_clip("tiny-vit", weights="random").state_dict()
    root = _TensorHolder()
    for key, tensor in state.items():
        *parents, leaf = key.split(".")
        module: nn.Module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _TensorHolder())
            module = getattr(module, name)
        if tensor.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, tensor.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(root), str(path))
    return path


_TRAINED: dict[str, Path] = {}


def trained_on_archive(tmp: Path) -> Path:
    """`tmp/archive.pt` and `tmp/run`, a finished smoke run trained on it (named on the command line, so it
    loads); the run is trained once per process and copied, its config.yaml naming this folder's archive."""
    install_instruments()
    if "run" not in _TRAINED:
        from promptclip.cli import main

        folder = Path(tempfile.mkdtemp(prefix="hostile-files-"))
        atexit.register(shutil.rmtree, folder, True)
        write_archive(folder / "archive.pt")
        argv = ["train", "--recipe", SMOKE, "--output", str(folder / "run"), "--quiet", "--no-progress"]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main([*argv, "--opts", "model.weights", str(folder / "archive.pt")]) == 0
        _TRAINED["run"] = folder
    shutil.copy(_TRAINED["run"] / "archive.pt", tmp / "archive.pt")
    shutil.copytree(_TRAINED["run"] / "run", tmp / "run")
    edit_run_config(tmp / "run", lambda config: config["model"].update(weights=str(tmp / "archive.pt")))
    return tmp / "run"


def edit_run_config(run: Path, change: Callable[[dict[str, Any]], None]) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    change(config)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def image(tmp: Path) -> Path:
    Image.new("RGB", (40, 32), (200, 30, 30)).save(tmp / "photo.png")
    return tmp / "photo.png"


def tiny_weights(tmp: Path) -> Path:
    """tiny-vit CLIP weights as safetensors (no code in the file)."""
    from promptclip.clip.weights import load_clip, save_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return save_clip(load_clip("tiny-vit", weights="random"), tmp / "tiny.safetensors")


# ---------------------------------------------------------------------------------------------------------
# 1. No code runs from a shared run or prompt folder
# ---------------------------------------------------------------------------------------------------------

REFUSED = ("TorchScript archive", "convert-weights", "--weights FILE")


def command_on_shared_run(command: str, with_weights_flag: bool = False) -> Callable[[Path], list[str]]:
    """`command` on a shared run folder whose config.yaml names a TorchScript archive (model.weights); with
    `with_weights_flag`, the user names the same archive with --weights."""

    def setup(tmp: Path) -> list[str]:
        run = trained_on_archive(tmp)
        prompt = ["--prompt", str(run / "prompt")]
        argv = {
            "eval": ["eval", *prompt, "--dataset", "synthetic_shapes", *SYNTHETIC, "--no-progress"],
            "predict": ["predict", str(image(tmp)), *prompt],
            "explain": ["explain", str(image(tmp)), *prompt, "--out", str(tmp / "heat.png")],
            "masks": ["masks", "gradcam", "--dataset", "synthetic_shapes", *SYNTHETIC, "--out", str(tmp / "masks")],
        }[command]
        if command == "masks":
            argv += [*prompt, "--no-progress"]
        return [*argv, "--weights", str(tmp / "archive.pt")] if with_weights_flag else argv

    return setup


def arch_path_in_run_config(tmp: Path) -> list[str]:
    run = trained_on_archive(tmp)
    edit_run_config(run, lambda config: config["model"].update(arch=str(tmp / "archive.pt"), weights=None))
    return ["predict", str(image(tmp)), "--prompt", str(run / "prompt")]


def archive_in_prompt_config(tmp: Path) -> list[str]:
    """A prompt folder shared on its own (no run config beside it) whose prompt_config.json names the archive."""
    run = trained_on_archive(tmp)
    shutil.move(run / "prompt", tmp / "shared_prompt")
    shutil.rmtree(run)
    config_path = tmp / "shared_prompt" / "prompt_config.json"
    config = json.loads(config_path.read_text())
    config["backbone"]["arch"] = str(tmp / "archive.pt")
    config_path.write_text(json.dumps(config))
    return ["predict", str(image(tmp)), "--prompt", str(tmp / "shared_prompt")]


def archive_in_recipe(tmp: Path) -> list[str]:
    install_instruments()
    write_archive(tmp / "archive.pt")
    recipe = yaml.safe_load(Path(SMOKE).read_text())
    recipe["model"]["weights"] = str(tmp / "archive.pt")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return ["train", "--recipe", str(tmp / "recipe.yaml"), "--output", str(tmp / "run"), "--quiet"]


def archive_on_command_line(tmp: Path) -> list[str]:
    install_instruments()
    write_archive(tmp / "archive.pt")
    return [
        "predict",
        str(image(tmp)),
        "--classes",
        "cat,dog",
        "--arch",
        "tiny-vit",
        "--weights",
        str(tmp / "archive.pt"),
    ]


def arch_name_in_run_config_found_in_weights_folder(tmp: Path) -> list[str]:
    """A shared run whose config.yaml names the backbone by name (model.arch, no weights file): the name finds
    the archive the user put in `$PROMPTCLIP_WEIGHTS`, which may be opened. The variable is "weights", relative
    to the working folder (the checker's, a fresh one per case): the case's env is fixed before its folder
    exists, and the setup cannot set it for the run."""
    run = trained_on_archive(tmp)
    edit_run_config(run, lambda config: config["model"].update(arch="tiny-vit", weights=None))
    (Path.cwd() / "weights").mkdir()
    shutil.copy(tmp / "archive.pt", Path.cwd() / "weights" / "tiny-vit.pt")  # the same bytes: the same sha256
    return ["predict", str(image(tmp)), "--prompt", str(run / "prompt")]


def opts_model_weights_archive(tmp: Path) -> list[str]:
    install_instruments()
    write_archive(tmp / "archive.pt")
    argv = ["train", "--recipe", SMOKE, "--output", str(tmp / "run"), "--quiet", "--no-progress"]
    return [*argv, "--opts", "model.weights", str(tmp / "archive.pt")]


def convert_then_use(tmp: Path) -> list[str]:
    install_instruments()
    write_archive(tmp / "archive.pt")
    return ["convert-weights", str(tmp / "archive.pt"), str(tmp / "plain.safetensors")]


def _converted_loads_without_code(tmp: Path, output: str) -> None:
    from promptclip.clip.weights import load_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        archive = torch.jit.load(str(tmp / "archive.pt"))
    converted = load_clip(tmp / "plain.safetensors")  # a safetensors file: no TorchScript allowed, none needed
    expected = dict(archive.state_dict())
    for key, tensor in converted.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    assert "promptclip: warning:" in output


def _not_in(output: str, text: str) -> None:
    assert text not in output, output


def _warned(tmp: Path, output: str) -> None:
    assert "promptclip: warning:" in output and "TorchScript archive" in output, output
    assert "convert-weights" in output


TRIPWIRE = {TRIPWIRE_ENV: "1"}
CASES: list[Case] = [
    *(
        Case(
            f"code-torchscript-named-by-run-config-{command}",
            "code",
            command_on_shared_run(command),
            2,
            ("{tmp}/run/config.yaml (model.weights)", "{tmp}/archive.pt", *REFUSED),
            env=TRIPWIRE,
        )
        for command in ("eval", "predict", "explain", "masks")
    ),
    Case(
        "code-torchscript-as-arch-of-run-config",
        "code",
        arch_path_in_run_config,
        2,
        ("{tmp}/run/config.yaml (model.arch)", "{tmp}/archive.pt", *REFUSED),
        env=TRIPWIRE,
    ),
    Case(
        "code-torchscript-named-by-prompt-config",
        "code",
        archive_in_prompt_config,
        2,
        ("{tmp}/shared_prompt/prompt_config.json (backbone.arch)", "{tmp}/archive.pt", *REFUSED),
        env=TRIPWIRE,
    ),
    Case(
        "code-torchscript-named-by-recipe",
        "code",
        archive_in_recipe,
        2,
        ("{tmp}/archive.pt", "recipe", *REFUSED),
        may_write=("run",),
        env=TRIPWIRE,
    ),
    Case(
        "code-torchscript-named-on-command-line-loads-with-warning",
        "code",
        archive_on_command_line,
        0,
        ("cat", "dog"),
        check=_warned,
    ),
    Case(
        "code-torchscript-found-in-weights-folder-by-run-config-name-loads-with-warning",
        "code",
        arch_name_in_run_config_found_in_weights_folder,
        0,
        ("{tmp}/photo.png", "%"),
        check=_warned,
        env={"PROMPTCLIP_WEIGHTS": "weights"},
    ),
    Case(
        "code-torchscript-by-opts-model-weights-trains-with-warning",
        "code",
        opts_model_weights_archive,
        0,
        ("results:",),
        may_write=("run",),
        check=_warned,
    ),
    Case(
        "code-shared-run-with-weights-flag-loads-with-warning",
        "code",
        command_on_shared_run("eval", with_weights_flag=True),
        0,
        ("accuracy",),
        check=_warned,
    ),
    Case(
        "code-convert-weights-writes-plain-tensors",
        "code",
        convert_then_use,
        0,
        ("plain.safetensors", "--weights"),
        check=_converted_loads_without_code,
    ),
]


# ---------------------------------------------------------------------------------------------------------
# 2. No traceback for a user's mistake
# ---------------------------------------------------------------------------------------------------------

LONG_NAME = " ".join(["supercalifragilistic"] * 30)  # 150 tokens: more than CLIP's 77 in any prompt


def long_class_name_on_command_line(tmp: Path) -> list[str]:
    weights = tiny_weights(tmp)
    return [
        "predict",
        str(image(tmp)),
        "--classes",
        f"cat,{LONG_NAME}",
        "--arch",
        "tiny-vit",
        "--weights",
        str(weights),
    ]


def own_images(tmp: Path, rows: list[tuple[str, str]], encoding: str = "utf-8") -> Path:
    """`tmp/data` holding images and `labels.csv` (path,label,classname), one image per row."""
    (tmp / "data" / "imgs").mkdir(parents=True)
    lines = ["path,label,classname"]
    for index, (label, name) in enumerate(rows):
        Image.new("RGB", (32, 32), (20 * index, 0, 0)).save(tmp / "data" / "imgs" / f"{index}.png")
        lines.append(f"imgs/{index}.png,{label},{name}")
    (tmp / "data" / "labels.csv").write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return tmp / "data"


def train_on_csv(*extra: str) -> Callable[[Path, Path], list[str]]:
    def argv(tmp: Path, root: Path) -> list[str]:
        base = ["train", "--recipe", SMOKE, "--output", str(tmp / "run"), "--quiet", "--no-progress"]
        return [*base, "--dataset", "csv", "--root", str(root), "--opts", "data.options", "{csv: labels.csv}", *extra]

    return argv


def long_class_name_in_csv(tmp: Path) -> list[str]:
    root = own_images(tmp, [("0", "cat"), ("1", LONG_NAME)] * 6)
    return train_on_csv()(tmp, root)


def latin1_csv_checked(tmp: Path) -> list[str]:
    root = own_images(tmp, [("0", "café"), ("1", "thé")] * 3, encoding="latin-1")
    return ["data", "check", "--dataset", "csv", "--root", str(root), "--csv", "labels.csv"]


def latin1_csv_trained(tmp: Path) -> list[str]:
    root = own_images(tmp, [("0", "café"), ("1", "thé")] * 6, encoding="latin-1")
    return train_on_csv()(tmp, root)


def latin1_class_name_file(tmp: Path) -> list[str]:
    root = own_images(tmp, [("0", "cat"), ("1", "dog")] * 3)
    (tmp / "names.json").write_bytes('{"0": "café", "1": "thé"}'.encode("latin-1"))
    return [
        "data",
        "info",
        "--dataset",
        "csv",
        "--root",
        str(root),
        "--csv",
        "labels.csv",
        "--classnames",
        str(tmp / "names.json"),
    ]


def eval_with_run_config(text: str | bytes) -> Callable[[Path], list[str]]:
    """`eval --prompt` on a run folder whose config.yaml holds `text` (a YAML tag, broken YAML, ...)."""

    def setup(tmp: Path) -> list[str]:
        run = trained_on_archive(tmp)
        config = run / "config.yaml"
        config.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return ["eval", "--prompt", str(run / "prompt"), "--dataset", "synthetic_shapes", *SYNTHETIC, "--no-progress"]

    return setup


RUN_CONFIG_FIX = ("{tmp}/run/config.yaml", "--arch and --weights")
YAML_PAYLOAD = f"model: !!python/object/apply:os.system ['touch {MARKER}']\n"

CASES += [
    Case(
        "traceback-class-name-over-77-tokens-in-classes-flag",
        "traceback",
        long_class_name_on_command_line,
        2,
        ("class name 'supercalifragilistic", "too long", "shorter name", "--classes"),
    ),
    Case(
        "traceback-class-name-over-77-tokens-in-csv",
        "traceback",
        long_class_name_in_csv,
        2,
        ("class name 'supercalifragilistic", "too long", "class-name file", "data.options.classnames"),
        may_write=("run",),
        check=lambda tmp, output: _not_in(output, "method_cfg"),  # not the fix of a method's bad value
    ),
    Case(
        "traceback-latin1-csv-data-check",
        "traceback",
        latin1_csv_checked,
        1,  # data check reports every problem and exits 1
        ("{tmp}/data/labels.csv", "not UTF-8", "line 2", "iconv -f latin1 -t utf-8"),
    ),
    Case(
        "traceback-latin1-csv-train",
        "traceback",
        latin1_csv_trained,
        2,
        ("{tmp}/data/labels.csv", "not UTF-8", "iconv -f latin1 -t utf-8"),
        may_write=("run",),
    ),
    Case(
        "traceback-latin1-class-name-file",
        "traceback",
        latin1_class_name_file,
        2,
        ("{tmp}/names.json", "not UTF-8", "iconv -f latin1 -t utf-8"),
    ),
    Case(
        "code-yaml-tag-in-run-config",
        "code",
        eval_with_run_config(YAML_PAYLOAD),
        2,
        ("not valid YAML", "python/object/apply", *RUN_CONFIG_FIX),
        env=TRIPWIRE,
    ),
    Case(
        "traceback-broken-yaml-in-run-config",
        "traceback",
        eval_with_run_config("model: [tiny-vit\n"),
        2,
        ("not valid YAML", *RUN_CONFIG_FIX),
    ),
    Case(
        "traceback-run-config-not-a-mapping",
        "traceback",
        eval_with_run_config("- coop\n- maple\n"),
        2,
        ("a mapping with a `model` section", *RUN_CONFIG_FIX),
    ),
    Case(
        "traceback-run-config-not-utf8",
        "traceback",
        eval_with_run_config(b"model:\n  arch: caf\xe9\n"),
        2,
        ("not UTF-8", *RUN_CONFIG_FIX),
    ),
    Case(
        "traceback-run-config-weights-not-a-path",
        "traceback",
        eval_with_run_config("model:\n  arch: tiny-vit\n  weights: [1, 2]\n"),
        2,
        ("model.weights must be a name or path", *RUN_CONFIG_FIX),
    ),
]


# -- a full disk ------------------------------------------------------------------------------------------------


def prompt_save_on_full_disk(tmp: Path) -> list[str]:
    install_instruments()
    return ["train", "--recipe", SMOKE, "--output", str(tmp / "run"), "--quiet", "--no-progress"]


def _prompt_not_left_half_written(tmp: Path, output: str) -> None:
    prompt = tmp / "run" / "prompt"
    assert not (prompt / "prompt.safetensors").exists(), "a half-written prompt was kept"
    assert not [p.name for p in prompt.glob(".*.tmp")], "a temporary file was left"
    assert not (tmp / "run" / "results.json").exists()


def convert_onto_full_disk(tmp: Path) -> list[str]:
    install_instruments()
    write_archive(tmp / "archive.pt")
    small_disk(tmp / "small")
    return ["convert-weights", str(tmp / "archive.pt"), str(tmp / "small" / "plain.safetensors")]


CASES += [
    Case(
        "traceback-disk-full-while-safetensors-saves-the-prompt",
        "traceback",
        prompt_save_on_full_disk,
        2,
        ("the disk is full", "{tmp}/run/prompt/prompt.safetensors", "Free some space", "--resume"),
        may_write=("run",),
        check=_prompt_not_left_half_written,
        env={FULL_DISK_ENV: "1"},
    ),
]
if CAN_MOUNT:  # a real full disk: safetensors' own error, from the kernel's ENOSPC
    CASES.append(
        Case(
            "traceback-disk-full-while-safetensors-writes-converted-weights",
            "traceback",
            convert_onto_full_disk,
            2,
            ("the disk is full", "{tmp}/small/plain.safetensors", "Free some space"),
            may_write=("small",),
        )
    )


# -- a read-only runs folder -------------------------------------------------------------------------------------

READ_ONLY = {READ_ONLY_ENV: "1"}
CHOOSE_WRITABLE = "choose a folder you can write to"


def new_run_in_read_only_folder(tmp: Path) -> list[str]:
    install_instruments()
    (tmp / "runs").mkdir()
    make_read_only(tmp / "runs")
    return ["run", "few_shot", "--recipe", SMOKE, "--shots", "2", "--seeds", "1", "--runs-dir", str(tmp / "runs")]


def resume_with_stale_lock_in_read_only_folder(tmp: Path) -> list[str]:
    import socket
    import time

    from promptclip.cli import main

    install_instruments()
    argv = ["train", "--recipe", SMOKE, "--output", str(tmp / "run"), "--quiet", "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    (tmp / "run" / "results.json").unlink()  # as if killed during the evaluation
    stale = {"pid": 2**22 + 1, "host": socket.gethostname(), "started": time.time() - 60, "token": "gone"}
    (tmp / "run" / ".lock").write_text(json.dumps(stale) + "\n")  # its process is gone: a stale lock
    make_read_only(tmp / "run")
    return [*argv, "--resume"]


def report_into_read_only_folder(tmp: Path) -> list[str]:
    trained_on_archive(tmp)
    (tmp / "runs").mkdir()
    shutil.move(tmp / "run", tmp / "runs" / "run")
    make_read_only(tmp / "runs")
    return ["report", str(tmp / "runs"), "--no-plots"]


CASES += [
    Case(
        "traceback-read-only-runs-folder-new-run",
        "traceback",
        new_run_in_read_only_folder,
        2,
        ("{tmp}/runs", "cannot be written", CHOOSE_WRITABLE, "--runs-dir"),
        env=READ_ONLY,
    ),
    Case(
        "traceback-read-only-run-folder-resume-with-stale-lock",
        "traceback",
        resume_with_stale_lock_in_read_only_folder,
        2,
        ("{tmp}/run", "cannot be written", CHOOSE_WRITABLE),
        env=READ_ONLY,
    ),
    Case(
        "traceback-read-only-runs-folder-report",
        "traceback",
        report_into_read_only_folder,
        2,
        ("{tmp}/runs/report", "cannot be written", CHOOSE_WRITABLE, "--out"),
        env=READ_ONLY,
    ),
]


# ---------------------------------------------------------------------------------------------------------
# 3. Bad arguments of eval, predict, masks, explain, data check
# ---------------------------------------------------------------------------------------------------------


def prompt_flag_on_run_folder(command: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        run = trained_on_archive(tmp)
        return {
            "eval": ["eval", "--prompt", str(run), "--dataset", "synthetic_shapes", *SYNTHETIC],
            "predict": ["predict", str(image(tmp)), "--prompt", str(run)],
            "explain": ["explain", str(image(tmp)), "--prompt", str(run)],
            "masks": [
                "masks",
                "gradcam",
                "--dataset",
                "synthetic_shapes",
                "--out",
                str(tmp / "m"),
                "--prompt",
                str(run),
            ],
        }[command]

    return setup


def prompt_with_config(text: str) -> Callable[[Path], list[str]]:
    """predict with a prompt folder (shared alone) whose prompt_config.json holds `text`."""

    def setup(tmp: Path) -> list[str]:
        run = trained_on_archive(tmp)
        (run / "prompt" / "prompt_config.json").write_text(text)
        (run / "config.yaml").unlink()  # the prompt folder alone: its own config names the backbone
        return ["predict", str(image(tmp)), "--prompt", str(run / "prompt"), "--weights", str(tmp / "archive.pt")]

    return setup


def masks_for_another_backbone(tmp: Path) -> list[str]:
    run = trained_on_archive(tmp)
    from promptclip.clip.weights import load_clip, save_clip

    with torch.random.fork_rng(devices=[]):
        other = save_clip(load_clip("tiny-rn", weights="random"), tmp / "rn.safetensors")
    argv = ["masks", "gradcam", "--dataset", "synthetic_shapes", *SYNTHETIC, "--out", str(tmp / "m")]
    return [*argv, "--prompt", str(run / "prompt"), "--arch", "tiny-rn", "--weights", str(other), "--no-progress"]


def zero_shot_on_random_weights(tmp: Path) -> list[str]:
    return ["predict", str(image(tmp)), "--classes", "cat,dog", "--arch", "tiny-vit", "--weights", "random"]


CASES += [
    *(
        Case(
            f"traceback-{command}-prompt-flag-given-a-run-folder",
            "traceback",
            prompt_flag_on_run_folder(command),
            2,
            ("--prompt {tmp}/run: a run folder", "--prompt {tmp}/run/prompt"),
        )
        for command in ("eval", "predict", "explain", "masks")
    ),
    Case(
        "traceback-prompt-flag-given-an-empty-folder",
        "traceback",
        lambda tmp: [
            "predict",
            str(image(tmp)),
            "--prompt",
            str((tmp / "empty").mkdir() or tmp / "empty"),
        ],
        2,
        ("--prompt {tmp}/empty: not a saved prompt", "prompt_config.json", "a run's prompt/ folder"),
    ),
    Case(
        "traceback-prompt-config-not-json",
        "traceback",
        prompt_with_config('{"method": "coop", "classn'),
        2,
        ("{tmp}/run/prompt/prompt_config.json", "corrupt prompt config", "re-save the prompt"),
    ),
    Case(
        "traceback-prompt-config-not-a-mapping",
        "traceback",
        prompt_with_config("[1, 2]"),
        2,
        ("{tmp}/run/prompt/prompt_config.json", "corrupt prompt config", "re-save the prompt"),
    ),
    Case(
        "traceback-masks-prompt-for-another-backbone",
        "traceback",
        masks_for_another_backbone,
        2,
        ("{tmp}/run/prompt", "backbone 'tiny-vit'", "load the matching CLIP"),
    ),
    Case(
        "unclear-zero-shot-predict-on-random-weights-is-not-a-prompt-error",
        "unclear",
        zero_shot_on_random_weights,
        0,
        ("cat", "dog"),
    ),
]


def zero_shot(*flags: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        weights = tiny_weights(tmp)
        return [
            "predict",
            str(image(tmp)),
            "--classes",
            "cat,dog",
            "--arch",
            "tiny-vit",
            "--weights",
            str(weights),
            *flags,
        ]

    return setup


def eval_shared_run(*flags: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        run = trained_on_archive(tmp)
        argv = ["eval", "--prompt", str(run / "prompt"), "--dataset", "synthetic_shapes", *SYNTHETIC, "--no-progress"]
        return [*argv, "--weights", str(tmp / "archive.pt"), *(flag.replace("{tmp}", str(tmp)) for flag in flags)]

    return setup


def output_below_a_file(tmp: Path) -> list[str]:
    (tmp / "notes.txt").write_text("mine\n")
    return ["masks", "show", "--dataset", "synthetic_shapes", *SYNTHETIC, "--out", str(tmp / "notes.txt" / "sheet.png")]


def csv_option_names_an_image(tmp: Path) -> list[str]:
    root = own_images(tmp, [("0", "cat"), ("1", "dog")] * 3)
    return ["data", "check", "--dataset", "csv", "--root", str(root), "--csv", str(root / "imgs" / "0.png")]


CASES += [
    Case(
        "traceback-device-not-a-device-name",
        "traceback",
        zero_shot("--device", "banana"),
        2,
        ("device 'banana'", "auto, cpu, cuda or cuda:N", "--device"),
    ),
    Case(
        "silent-template-without-the-class-name",  # every class would get the same text, and the same score
        "silent",
        zero_shot("--template", "a photo of a thing."),
        2,
        ("--template 'a photo of a thing.'", "exactly once", "{}"),
    ),
    Case(
        "traceback-template-with-a-named-field",
        "traceback",
        zero_shot("--template", "a photo of a {name}."),
        2,
        ("--template 'a photo of a {name}.'", "exactly once", "{}"),
    ),
    Case(
        "traceback-eval-batch-size-zero",
        "traceback",
        eval_shared_run("--batch-size", "0"),
        2,
        ("--batch-size 0", "at least 1"),
    ),
    Case(
        "traceback-dataset-option-not-a-number-eval",
        "traceback",
        eval_shared_run("--set", "image_size=big"),
        2,
        ("image_size='big'", "not an integer", "--set image_size=64"),
    ),
    Case(
        "traceback-dataset-option-not-a-number-data-check",
        "traceback",
        lambda tmp: ["data", "check", "--dataset", "synthetic_shapes", "--set", "test_per_class=many"],
        1,  # data check reports every problem and exits 1
        ("test_per_class='many'", "not an integer", "--set test_per_class=64"),
    ),
    Case(
        "traceback-eval-output-is-a-folder",
        "traceback",
        eval_shared_run("--output", "{tmp}/run"),
        2,
        ("{tmp}/run: is a folder", "name a file"),
    ),
    Case(
        "traceback-masks-show-out-below-a-file",
        "traceback",
        output_below_a_file,
        2,
        ("{tmp}/notes.txt", "a file stands in its place or in its path", "--out"),
    ),
    Case(
        "unclear-csv-option-names-an-image",
        "unclear",
        csv_option_names_an_image,
        1,
        ("{tmp}/data/imgs/0.png (option csv) is a binary file, not CSV text",),
    ),
]
