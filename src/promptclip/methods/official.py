"""Prompts trained with the field's original code: CoOp, CoCoOp and KgCoOp `prompt_learner/model.pth.tar-N`.

Those files are what the original trainers save: `{"state_dict": {...}, "epoch": N, "optimizer": ...,
"scheduler": ..., "val_result": ...}`, where the state dict holds

* CoOp: `ctx` [M, W] (or [C, M, W] with class-specific context);
* CoCoOp: `ctx` [M, W] and `meta_net.linear1.weight/bias`, `meta_net.linear2.weight/bias`;
* KgCoOp: `ctx` plus unused `bias_vectors` and `meta_net.linear1.*` (it trains `ctx` only);
* and, for all, `token_prefix` / `token_suffix`: embeddings of the training class names, rebuilt here for the
  class names given (as the original code does).

Tensors are often fp16; they are converted to fp32. Files are read with `torch.load(weights_only=True)`: no code
from the file is run. The original trainers' warm-up scheduler pickles its successor scheduler object (and with
it the optimizer) into the `scheduler` entry, which the weights-only reader refuses; those few optimizer and
scheduler classes are read into an inert stand-in that only holds their state, and then dropped. Any other
object in a file is refused.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from promptclip.clip.model import CLIP
from promptclip.methods.base import PromptModel
from promptclip.methods.cocoop import CoCoOp, CoCoOpConfig
from promptclip.methods.coop import CoOp, CoOpConfig
from promptclip.methods.kgcoop import KgCoOp, KgCoOpConfig

OfficialMethod = Literal["coop", "cocoop", "kgcoop"]

# Class-name-dependent buffers the original prompt learners save; they are rebuilt for the given class names.
CLASS_BUFFERS = ("token_prefix", "token_suffix", "token_midfix")
# Tensors of the original KgCoOp learner that it never trains.
KGCOOP_UNUSED = ("bias_vectors", "meta_net.linear1.weight", "meta_net.linear1.bias")
COCOOP_KEYS = ("meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias")
# Where the original trainers' optimizer and scheduler objects come from (see the module docstring).
_TRAINING_OBJECT_MODULES = ("torch.optim.", "dassl.optim.")
_CHECKPOINT_NAME = re.compile(r"model\.pth\.tar-(\d+)$")


class OfficialCheckpointError(ValueError):
    """A prompt file that cannot be used; the message names the file and the fix."""


def _plain_dict(*default_factory: Any) -> dict[Any, Any]:
    """Stands in for `collections.defaultdict` (an optimizer's per-parameter state), which the weights-only
    reader cannot fill: the same items in a plain dict."""
    return {}


# Plain-data globals of those pickles, and what they are read as.
_HARMLESS_GLOBALS: dict[str, Any] = {"builtins.dict": dict, "collections.defaultdict": _plain_dict}


class InertTrainingState:
    """Stand-in for a pickled optimizer or scheduler object: keeps the state it is given and runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> InertTrainingState:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass
class OfficialPrompt:
    """The usable content of an original prompt file."""

    path: Path
    method: OfficialMethod
    state: dict[str, torch.Tensor]
    """Our tensor names, fp32, class-name buffers and unused tensors removed."""
    epoch: int | None

    @property
    def n_ctx(self) -> int:
        return int(self.state["ctx"].shape[-2])

    @property
    def class_specific(self) -> bool:
        return self.state["ctx"].dim() == 3


def find_checkpoint_file(
    path: str | Path, epoch: int | None = None, subfolders: Sequence[str] = ("prompt_learner",)
) -> Path:
    """The prompt file for `path`: the file itself, or in a run folder (or the first of its `subfolders` that
    exists: the name the trainer registered its model under, e.g. `prompt_learner/`) the
    `model.pth.tar-<epoch>` file, the last epoch by default, else `model-best.pth.tar`."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such prompt file or run folder")
    folder = next((path / name for name in subfolders if (path / name).is_dir()), path)
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))}
    if epoch is not None:
        if epoch not in found:
            raise FileNotFoundError(f"{folder}: no model.pth.tar-{epoch}; epochs present: {sorted(found) or 'none'}")
        return found[epoch]
    if found:
        return found[max(found)]
    best = folder / "model-best.pth.tar"
    if best.is_file():
        return best
    raise FileNotFoundError(f"{folder}: no model.pth.tar-N or model-best.pth.tar prompt file")


def read_weights_only(path: Path) -> Any:
    """`torch.load(weights_only=True)` that tolerates the original trainers' optimizer/scheduler objects (read
    into `InertTrainingState`) and refuses everything else that is not plain data."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a zip checkpoint (legacy format): let torch.load report it below
        unsafe = []
        legacy_error: Exception | None = err
    else:
        legacy_error = None
    refused = [name for name in unsafe if not _tolerated(name)]
    if refused:
        raise OfficialCheckpointError(_refusal(path, refused))
    allowed: list[Any] = [
        (InertTrainingState, name) if name.startswith(_TRAINING_OBJECT_MODULES) else (_HARMLESS_GLOBALS[name], name)
        for name in unsafe
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        if "global" in detail.lower():
            raise OfficialCheckpointError(_refusal(path, [detail])) from None
        raise OfficialCheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    except (RuntimeError, KeyError, EOFError, ValueError) as err:
        detail = _first_line(legacy_error or err)
        raise OfficialCheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None


def _tolerated(name: str) -> bool:
    return name.startswith(_TRAINING_OBJECT_MODULES) or name in _HARMLESS_GLOBALS


def _refusal(path: Path, what: Sequence[str]) -> str:
    return (
        f"{path}: refused by torch.load(weights_only=True): the file pickles objects other than tensors and the "
        f"original trainers' optimizer/scheduler state ({', '.join(what)}). It is not loaded, since unpickling "
        "it could run code. If you trust the file, re-save only its tensors, e.g. "
        "torch.save({'state_dict': torch.load(p, weights_only=False)['state_dict']}, 'clean.pth.tar')"
    )


def _unpickler_detail(err: BaseException) -> str:
    """The weights-only reader's own reason, without the generic advice torch wraps around it."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split()) or type(err).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@dataclass
class OfficialState:
    """The state dict of a file saved by the original trainers, as saved (official key names, `module.`
    prefixes removed, dtypes kept)."""

    file: Path
    tensors: dict[str, torch.Tensor]
    epoch: int | None


def read_official_state(
    path: str | Path, epoch: int | None = None, subfolders: Sequence[str] = ("prompt_learner",)
) -> OfficialState:
    """Read the state dict of an original trainer's file (or of its run folder, see `find_checkpoint_file`):
    Dassl's `{"state_dict": ..., "epoch": ..., "optimizer": ..., "scheduler": ...}`, or a plain dict of
    tensors, read without running any code (`read_weights_only`)."""
    file = find_checkpoint_file(path, epoch, subfolders)
    content = read_weights_only(file)
    raw = content.get("state_dict", content) if isinstance(content, Mapping) else None
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise OfficialCheckpointError(
            f"{file}: expected a prompt checkpoint (a dict with 'state_dict' of tensors, as the original trainers "
            "save) or a plain dict of tensors"
        )
    tensors = {_strip_parallel_prefix(str(k)): v for k, v in raw.items()}
    file_epoch = content.get("epoch") if "state_dict" in content else None
    return OfficialState(file, tensors, int(file_epoch) if isinstance(file_epoch, int) else None)


def read_official_prompt(
    path: str | Path, method: OfficialMethod | None = None, epoch: int | None = None
) -> OfficialPrompt:
    """Read an original prompt file (or run folder): its method, tensors (fp32, our names) and epoch."""
    official = read_official_state(path, epoch)
    file, state = official.file, official.tensors
    found_method = infer_official_method(state, file)
    method = _check_method(method, found_method, file)
    state = {k: v.detach().float() for k, v in state.items() if k not in CLASS_BUFFERS}
    if found_method == "kgcoop":
        state = {k: v for k, v in state.items() if k not in KGCOOP_UNUSED}
    expected = {"ctx", *COCOOP_KEYS} if method == "cocoop" else {"ctx"}
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise OfficialCheckpointError(
            f"{file}: unexpected tensors {unexpected[:5]} for a {method} prompt; this reader knows CoOp, CoCoOp "
            "and KgCoOp prompt files (for other methods, train and save with promptclip)"
        )
    return OfficialPrompt(file, method, state, official.epoch)


def _strip_parallel_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def infer_official_method(state: Mapping[str, torch.Tensor], path: Path) -> OfficialMethod:
    if "ctx" not in state:
        raise OfficialCheckpointError(
            f"{path}: no 'ctx' tensor (keys: {sorted(state)[:6]}); not a CoOp, CoCoOp or KgCoOp prompt file"
        )
    if "meta_net.linear2.weight" in state:
        return "cocoop"
    if "bias_vectors" in state or "meta_net.linear1.weight" in state:
        return "kgcoop"
    return "coop"


def _check_method(requested: str | None, found: OfficialMethod, path: Path) -> OfficialMethod:
    if requested is None:
        return found
    if requested not in ("coop", "cocoop", "kgcoop"):
        raise OfficialCheckpointError(f"method {requested!r}: choose coop, cocoop or kgcoop (or leave it unset)")
    # A KgCoOp prompt is a CoOp prompt at test time; a CoCoOp prompt without its meta-net is not.
    compatible = requested == found or {requested, found} == {"coop", "kgcoop"}
    if not compatible:
        raise OfficialCheckpointError(
            f"{path}: holds a {found} prompt, not a {requested} one"
            + (" (its meta-net would be ignored)" if found == "cocoop" else "")
            + "; leave method unset to infer it"
        )
    return requested  # type: ignore[return-value]


def load_official_prompt(
    path: str | Path,
    clip: CLIP,
    classnames: Sequence[str],
    method: OfficialMethod | None = None,
    template: str = "a photo of a {}.",
    class_token_position: Literal["end", "middle", "front"] = "end",
    epoch: int | None = None,
) -> PromptModel:
    """A learner holding the prompt of an original CoOp / CoCoOp / KgCoOp file, ready to evaluate.

    `path` is a `model.pth.tar-N` file or a run folder (the last epoch's file, or `epoch`'s). The method, the
    context length and class-specific context are read from the tensors. `classnames` are the classes to
    classify (any, except for class-specific context: then exactly the training classes, in order).
    `class_token_position` is not stored in the files: pass the one the prompt was trained with."""
    prompt = read_official_prompt(path, method, epoch)
    _check_widths(prompt, clip, len(classnames))
    learner: PromptModel
    if prompt.method == "cocoop":
        hidden = int(prompt.state["meta_net.linear1.weight"].shape[0])
        cocoop_cfg = CoCoOpConfig(
            n_ctx=prompt.n_ctx, ctx_init="", class_token_position=class_token_position, meta_hidden=hidden
        )
        learner = CoCoOp(clip, classnames, cocoop_cfg, template=template)
    else:
        fields: dict[str, Any] = {
            "n_ctx": prompt.n_ctx,
            "ctx_init": "",
            "class_token_position": class_token_position,
            "csc": prompt.class_specific,
        }
        if prompt.method == "kgcoop":
            learner = KgCoOp(clip, classnames, KgCoOpConfig(**fields), template=template)
        else:
            learner = CoOp(clip, classnames, CoOpConfig(**fields), template=template)
    learner.load_trainable_state(prompt.state, source=str(prompt.path))
    return learner


def _check_widths(prompt: OfficialPrompt, clip: CLIP, num_classes: int) -> None:
    ctx = prompt.state["ctx"]
    text_width = clip.config.text.width
    if ctx.dim() not in (2, 3):
        raise OfficialCheckpointError(f"{prompt.path}: ctx has shape {tuple(ctx.shape)}; expected [M, W] or [C, M, W]")
    if ctx.shape[-1] != text_width:
        raise OfficialCheckpointError(
            f"{prompt.path}: ctx is {ctx.shape[-1]} wide but the loaded CLIP ({clip.config.name}) has text width "
            f"{text_width}; load the backbone the prompt was trained on (ViT-B/16 for the published prompts)"
        )
    if ctx.dim() == 3:
        if prompt.method == "cocoop":
            raise OfficialCheckpointError(
                f"{prompt.path}: CoCoOp prompts have one shared context, got {tuple(ctx.shape)}"
            )
        if ctx.shape[0] != num_classes:
            raise OfficialCheckpointError(
                f"{prompt.path}: class-specific context for {ctx.shape[0]} classes, but {num_classes} class names "
                "were given; pass exactly the training classes, in training order (class-specific context cannot "
                "classify other classes)"
            )
    if prompt.method == "cocoop":
        first, second = prompt.state["meta_net.linear1.weight"], prompt.state["meta_net.linear2.weight"]
        if first.shape[1] != clip.config.embed_dim or second.shape[0] != text_width:
            raise OfficialCheckpointError(
                f"{prompt.path}: meta-net maps {first.shape[1]} -> {second.shape[0]}, the loaded CLIP "
                f"({clip.config.name}) needs {clip.config.embed_dim} -> {text_width}; load the backbone the prompt "
                "was trained on"
            )
