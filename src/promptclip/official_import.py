"""Prompts trained with the field's original code, turned into promptclip learners and prompt folders.

`import_official(method, source)` builds the learner; `promptclip import --method M PATH --out DIR` writes it
as a prompt folder (`save_pretrained`), which `promptclip eval --prompt DIR` and `from_pretrained` load.

Every original trainer saves Dassl's `<model name>/model.pth.tar-<epoch>` (or `model-best.pth.tar`): a dict
with `state_dict`, `epoch`, `optimizer` and `scheduler`, read here without running any code
(`methods.official.read_weights_only`). What each state dict holds, and what is taken from it (the rest is the
frozen CLIP and the embeddings of the training class names, rebuilt for the given class names):

* coop, cocoop, kgcoop: CoOp, CoCoOp, KgCoOp (`prompt_learner/`): `ctx` and CoCoOp's `meta_net.*` (see
  `methods.official`);
* maple: MaPLe (`MultiModalPromptLearner/`, the whole model): `prompt_learner.ctx`, `.proj`,
  `.compound_prompts_text.<i>`, `.compound_prompt_projections.<i>` (`methods.maple.convert_official_state`);
* maple+dapt: DAPT, whose trainer is MaPLe's with two more views and losses: MaPLe's tensors;
* ivlp, deep_lang, promptsrc: IVLP, PromptSRC (`VLPromptLearner/`): `prompt_learner.ctx`, `image_encoder.VPT`,
  `{text,image}_encoder.transformer.resblocks.<j>.VPT_shallow` (`methods.ivlp.convert_official_state`);
* vpt: VPT (`prompt_learner/`, the whole model): the image encoder's prompts alone;
* promptkd: PromptKD's student (`VLPromptLearner/`): its vision prompts and `VPT_image_trans.conv1.{0,1,3}`,
  BatchNorm statistics included (`methods.promptkd.convert_official_state`), with its PromptSRC teacher;
* coop+dpc: DPC's StackSPLE_CoOp (`prompt_learner/`): the tuned `ctx`; and the stage-1 CoOp file's `ctx`;
* promptkd+dpc: DPC's StackSPLE_PromptKD (`VLPromptLearner/`): the student's tensors, the teacher's text
  context `prompt_learner.ctx` and its deep text prompts `text_encoder.transformer.resblocks.<j>.VPT_shallow`
  (the text branch DPC adds); and the stage-1 PromptKD student's tensors, with the teacher.

The prompt layout (context lengths, depths, class-specific context) is read from the tensor shapes. What the
files do not hold is given: the class names, the backbone, and `ctx_init`, the words of the text prompt after
the learned tokens (MaPLe's 2 tokens of "a photo of a" leave "of a" in every prompt); the file's own class
prompts (`prompt_learner.token_suffix`) are checked against it when it has them.

DPC: the released code builds its tuned tensor theta as a Parameter over the stage-1 tensor's storage, and
loading a checkpoint copies theta into that storage, so base classes are evaluated with the stored tensors
themselves (its (theta - (1 - omega_b) P) / omega_b is theta when P is theta). The import keeps exactly that:
the stored tensors become P' directly (`reparametrize: []`), the stage-1 tensors P, and new classes use P
(omega_n = 0, every reported run).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptclip.clip.errors import preview
from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import get_tokenizer
from promptclip.methods import ivlp, maple, promptkd
from promptclip.methods.base import CONFIG_FILE, PromptModel, wrap_with_plugins
from promptclip.methods.ivlp import IVLP, DeepLanguageConfig, DeepLanguagePrompting, IVLPConfig, VPTConfig, VPTDeep
from promptclip.methods.maple import MaPLe, MaPLeConfig
from promptclip.methods.official import (
    OfficialCheckpointError,
    OfficialState,
    load_official_prompt,
    read_official_prompt,
    read_official_state,
)
from promptclip.methods.promptkd import PromptKD, PromptKDConfig, load_teacher_clip
from promptclip.methods.promptsrc import PromptSRC, PromptSRCConfig

__all__ = ["IMPORTABLE_METHODS", "ImportSource", "import_official", "official_layout"]

# The model names the original trainers register, i.e. the sub-folder of a run folder that holds the files.
TRAINER_FOLDERS = ("prompt_learner", "MultiModalPromptLearner", "VLPromptLearner", "VLPromptLearner_large")
# The text prompt of MaPLe, IVLP, PromptSRC and PromptKD's teachers in their published configs (CTX_INIT).
OFFICIAL_CTX_INIT = "a photo of a"
# The original prompt learners use CTX_INIT only for this many learned tokens or fewer (else a random start).
CTX_INIT_MAX_TOKENS = 4
VPT_TEXT_TEMPLATE = "a photo of a {}."  # the fixed text side of the original VPT trainer
TEACHER_FOLDER = "teacher"  # where an imported PromptKD teacher goes, inside the output folder

_DEEP_KEY = re.compile(r"^(text|vision)\.deep\.(\d+)$")
_TEACHER_TEXT = re.compile(r"^(?:prompt_learner\.)?text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")


@dataclass
class ImportSource:
    """What an import reads besides the method: the file, the backbone and what the file does not hold."""

    path: Path
    """The original trainer's file, or its run folder (the last epoch's file, or `epoch`'s)."""
    clip: CLIP
    classnames: list[str]
    template: str = "a photo of a {}."
    epoch: int | None = None
    ctx_init: str = OFFICIAL_CTX_INIT
    """The trainer's CTX_INIT: the text prompt around the learned tokens (not in the files)."""
    class_token_position: str = "end"
    """CoOp's CLASS_TOKEN_POSITION (not in the files)."""
    stage1: Path | None = None
    """DPC: the stage-1 file (or run folder) of the tuned backbone."""
    teacher: Path | None = None
    """PromptKD: the teacher's original file (PromptSRC's), or a promptclip prompt folder of it."""
    teacher_arch: str = "ViT-L-14"
    teacher_weights: str | None = None
    out: Path | None = None
    """The output folder: an imported teacher goes to its `teacher/`."""
    notes: list[str] = field(default_factory=list)
    """What the import did besides the main file (filled in)."""


# --------------------------------------------------------------------------------------------------------
# Reading and placing tensors
# --------------------------------------------------------------------------------------------------------


def official_layout(tensors: Mapping[str, torch.Tensor]) -> str:
    """Which original prompt learner saved `tensors`: coop (CoOp, CoCoOp, KgCoOp), maple (MaPLe, DAPT), ivlp
    (IVLP, VPT, PromptSRC), promptkd (its student), promptkd+dpc (DPC over PromptKD), or unknown."""
    keys = set(tensors)
    if any(k.startswith("VPT_image_trans.") for k in keys):
        return "promptkd+dpc" if "prompt_learner.ctx" in keys else "promptkd"
    if "prompt_learner.proj.weight" in keys or any(k.startswith("prompt_learner.compound_prompts_text.") for k in keys):
        return "maple"
    if "prompt_learner.ctx" in keys or "image_encoder.VPT" in keys or any(k.endswith(".VPT_shallow") for k in keys):
        return "ivlp"
    return "coop" if "ctx" in keys else "unknown"


_LAYOUT_NAMES = {
    "coop": "a CoOp / CoCoOp / KgCoOp prompt (`ctx`)",
    "maple": "a MaPLe or DAPT checkpoint (`prompt_learner.compound_prompts_text.*`)",
    "ivlp": "an IVLP, VPT or PromptSRC checkpoint (`*.VPT*`, `prompt_learner.ctx`)",
    "promptkd": "a PromptKD student (`VPT_image_trans.*`)",
    "promptkd+dpc": "a DPC-over-PromptKD checkpoint (`VPT_image_trans.*` and `prompt_learner.ctx`)",
}
_LAYOUT_METHODS = {
    "coop": "coop, cocoop or kgcoop",
    "maple": "maple or maple+dapt",
    "ivlp": "ivlp, vpt, deep_lang or promptsrc",
    "promptkd": "promptkd",
    "promptkd+dpc": "promptkd+dpc",
}


def read_layout(path: Path, epoch: int | None, layout: str, method: str, what: str = "") -> OfficialState:
    """The file of `path` for `method`, refused when another trainer saved it."""
    state = read_official_state(path, epoch, TRAINER_FOLDERS)
    found = official_layout(state.tensors)
    if found != layout:
        held = _LAYOUT_NAMES.get(found, f"no prompt tensors this reader knows (keys: {preview(sorted(state.tensors))})")
        fix = f"; import it with --method {_LAYOUT_METHODS[found]}" if found in _LAYOUT_METHODS else ""
        raise OfficialCheckpointError(
            f"{state.file}: holds {held}, not {_LAYOUT_NAMES[layout]}{what} as --method {method} needs{fix}"
        )
    return state


def convert(
    converter: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]], state: OfficialState, method: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(our tensors, our name -> the file's key) of `converter` applied to the file's state dict."""
    try:
        converted = converter(state.tensors)
    except ValueError as err:
        raise OfficialCheckpointError(f"{state.file}: {err}; is it a {method} checkpoint?") from None
    return converted, source_keys(converter, state.tensors)


def source_keys(
    converter: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]], tensors: Mapping[str, torch.Tensor]
) -> dict[str, str]:
    """Which key of `tensors` each tensor `converter` returns comes from, found by converting numbered stand-ins
    (so the key maps live in one place: the method files)."""
    keys = list(tensors)
    numbered = {key: torch.tensor([float(index)]) for index, key in enumerate(keys)}
    return {name: keys[int(value.flatten()[0])] for name, value in converter(numbered).items()}


def place(
    learner: PromptModel, tensors: Mapping[str, torch.Tensor], keys: Mapping[str, str], file: Path, method: str
) -> None:
    """Copy `tensors` (our names) into the learner's parameters and buffers; a shape the learner does not
    expect is refused, naming the file's key and the fix."""
    with torch.no_grad():
        for name, value in tensors.items():
            target = _tensor(learner, name)
            if target is None:
                raise OfficialCheckpointError(
                    f"{file}: {keys.get(name, name)} has no place in a {method} learner ({name}); import it with "
                    "the --method of the trainer that saved it"
                )
            if tuple(value.shape) != tuple(target.shape):
                raise OfficialCheckpointError(
                    f"{file}: {keys.get(name, name)} has shape {tuple(value.shape)}, the {method} learner on "
                    f"{learner.clip.config.name} expects {tuple(target.shape)} ({name}); load the backbone the "
                    "prompt was trained on (--arch, --weights), or check --method"
                )
            target.copy_(value.to(target.device, target.dtype))
    learner.invalidate_cache()


def _tensor(learner: PromptModel, name: str) -> torch.Tensor | None:
    try:
        return learner.get_parameter(name)
    except AttributeError:
        pass
    try:
        return learner.get_buffer(name)
    except AttributeError:
        return None


def require_all(learner: PromptModel, given: Sequence[str], file: Path, method: str) -> None:
    """Every trained tensor of `learner` must come from the file."""
    missing = sorted(set(learner.trainable_state()) - set(given))
    if missing:
        raise OfficialCheckpointError(
            f"{file}: no tensor for {', '.join(missing[:5])} of the {method} learner its other tensors describe; "
            f"the file is incomplete or was saved by another trainer (check --method, or save it again)"
        )


def prompt_shape(
    converted: Mapping[str, torch.Tensor], tower: str, file: Path, keys: Mapping[str, str]
) -> tuple[int, int]:
    """(tokens per layer, depth) of one tower's prompts; (0, 0) for an unprompted tower."""
    ctx = converted.get(f"{tower}.ctx")
    layers = sorted(int(m.group(2)) for name in converted if (m := _DEEP_KEY.match(name)) and m.group(1) == tower)
    if ctx is None:
        if layers:
            raise OfficialCheckpointError(
                f"{file}: deep {tower} prompts ({keys[f'{tower}.deep.{layers[0]}']}, ...) without the layer-0 "
                f"{tower} prompt; the file is incomplete"
            )
        return 0, 0
    if layers != list(range(1, len(layers) + 1)):
        gap = min(set(range(1, max(layers) + 1)) - set(layers))
        raise OfficialCheckpointError(
            f"{file}: the {tower} prompts of layers {layers} lack layer {gap}; the file is incomplete"
        )
    return int(ctx.shape[0]), 1 + len(layers)


def ctx_init_for(n_ctx: int, ctx_init: str) -> str:
    """The original prompt learners' rule: CTX_INIT names the prompt for at most 4 learned tokens, else the
    prompt is `X X ... X <class>.` (our empty `ctx_init`)."""
    return ctx_init if ctx_init and n_ctx <= CTX_INIT_MAX_TOKENS else ""


def check_fixed_words(state: OfficialState, clip: CLIP, n_ctx: int, ctx_init: str, key: str) -> None:
    """The words of `ctx_init` after the learned tokens stay in every prompt; the file's class prompts (`key`,
    [C, L - 1 - n_ctx, W]) start with them. Refuse a `ctx_init` they contradict (compared in fp16, the
    original trainers' precision)."""
    words = get_tokenizer().encode(ctx_init)[n_ctx:] if ctx_init else []
    suffix = state.tensors.get(key)
    width = clip.token_embedding.weight.shape[1]
    if not words or suffix is None or suffix.dim() != 3 or suffix.shape[-1] != width or suffix.shape[1] < len(words):
        return
    expected = clip.token_embedding.weight[torch.tensor(words, device=clip.token_embedding.weight.device)]
    found = suffix[0, : len(words)].to(expected.device)
    if not torch.equal(found.half(), expected.detach().half()):
        fixed = get_tokenizer().decode(words)
        raise OfficialCheckpointError(
            f"{state.file}: the prompts in {key} do not go on with {fixed.strip()!r} after the {n_ctx} learned "
            f"tokens, as --ctx-init {ctx_init!r} says; pass the CTX_INIT the prompt was trained with (--ctx-init), "
            "or load the backbone it was trained on (--arch, --weights)"
        )


# --------------------------------------------------------------------------------------------------------
# One importer per original trainer
# --------------------------------------------------------------------------------------------------------


def import_coop_family(method: str) -> Callable[[ImportSource], PromptModel]:
    def build(source: ImportSource) -> PromptModel:
        read_layout(source.path, source.epoch, "coop", method)
        return load_official_prompt(
            source.path,
            source.clip,
            source.classnames,
            method=method,  # type: ignore[arg-type]
            template=source.template,
            class_token_position=source.class_token_position,  # type: ignore[arg-type]
            epoch=source.epoch,
        )

    return build


def import_maple(source: ImportSource) -> PromptModel:
    method = "maple"
    state = read_layout(source.path, source.epoch, "maple", method)
    converted, keys = convert(maple.convert_official_state, state, method)
    n_ctx, depth = prompt_shape(converted, "text", state.file, keys)
    ctx_init = ctx_init_for(n_ctx, source.ctx_init)
    check_fixed_words(state, source.clip, n_ctx, ctx_init, "prompt_learner.token_suffix")
    cfg = MaPLeConfig(n_ctx=n_ctx, ctx_init=ctx_init, depth=depth)
    learner = MaPLe(source.clip, source.classnames, cfg, template=source.template)
    place(learner, converted, keys, state.file, method)
    require_all(learner, list(converted), state.file, method)
    return learner


def import_maple_dapt(source: ImportSource) -> PromptModel:
    """DAPT's trainer is MaPLe's with two more views and losses: its file holds MaPLe's prompts."""
    from promptclip.plugins.dapt import DAPTConfig

    return wrap_with_plugins(import_maple(source), {"dapt": DAPTConfig()})


def import_deep(method: str) -> Callable[[ImportSource], PromptModel]:
    """IVLP, VPT, deep language prompting and PromptSRC: independent deep prompts in one or both towers."""

    def build(source: ImportSource) -> PromptModel:
        state = read_layout(source.path, source.epoch, "ivlp", method)
        converted, keys = convert(ivlp.convert_official_state, state, method)
        learner = deep_learner(method, converted, keys, state, source)
        place(learner, converted, keys, state.file, method)
        require_all(learner, list(converted), state.file, method)
        return learner

    return build


def deep_learner(
    method: str,
    converted: Mapping[str, torch.Tensor],
    keys: Mapping[str, str],
    state: OfficialState,
    source: ImportSource,
) -> PromptModel:
    """The learner of `method` with the towers, lengths and depths of the file's prompts."""
    n_text, depth_text = prompt_shape(converted, "text", state.file, keys)
    n_vision, depth_vision = prompt_shape(converted, "vision", state.file, keys)
    towers = {"ivlp": (True, True), "promptsrc": (True, True), "vpt": (False, True), "deep_lang": (True, False)}
    wants_text, wants_vision = towers[method]
    if (n_text > 0, n_vision > 0) != (wants_text, wants_vision):
        held = " and ".join(t for t, n in (("text", n_text), ("vision", n_vision)) if n) or "no"
        fitting = {(True, True): "ivlp or promptsrc", (False, True): "vpt", (True, False): "deep_lang"}
        fix = fitting.get((n_text > 0, n_vision > 0), "another --method")
        raise OfficialCheckpointError(
            f"{state.file}: holds {held} prompts (prompt_learner.ctx: text, image_encoder.VPT: vision), which "
            f"--method {method} does not take; import it with --method {fix}"
        )
    ctx_init = ctx_init_for(n_text, source.ctx_init)
    if n_text:
        check_fixed_words(state, source.clip, n_text, ctx_init, "prompt_learner.token_suffix")
    clip, names, template = source.clip, source.classnames, source.template
    if method == "vpt":
        return VPTDeep(clip, names, VPTConfig(n_ctx=n_vision, depth=depth_vision, text_template=VPT_TEXT_TEMPLATE))
    if method == "deep_lang":
        return DeepLanguagePrompting(
            clip, names, DeepLanguageConfig(n_ctx=n_text, depth=depth_text, ctx_init=ctx_init), template=template
        )
    layout: dict[str, Any] = {
        "n_ctx_text": n_text,
        "n_ctx_vision": n_vision,
        "depth_text": depth_text,
        "depth_vision": depth_vision,
        "ctx_init": ctx_init,
    }
    if method == "promptsrc":
        return PromptSRC(clip, names, PromptSRCConfig(**layout), template=template)
    return IVLP(clip, names, IVLPConfig(**layout), template=template)


def import_promptkd(source: ImportSource) -> PromptModel:
    """PromptKD's student, with its teacher (a PromptSRC file imported beside it, or a prompt folder)."""
    method = "promptkd"
    state = read_layout(source.path, source.epoch, "promptkd", method)
    converted, keys = convert(promptkd.convert_official_state, state, method)
    learner = promptkd_learner(converted, keys, state, source)
    place(learner, converted, keys, state.file, method)
    require_all(learner, list(converted), state.file, method)
    return learner


def promptkd_learner(
    converted: Mapping[str, torch.Tensor], keys: Mapping[str, str], state: OfficialState, source: ImportSource
) -> PromptKD:
    n_ctx, depth = prompt_shape(converted, "vision", state.file, keys)
    cfg = PromptKDConfig(
        n_ctx_vision=n_ctx,
        depth_vision=depth,
        teacher_arch=source.teacher_arch,
        teacher_weights=source.teacher_weights,
        teacher_prompt=str(teacher_folder(source)),
    )
    return PromptKD(source.clip, source.classnames, cfg, template=source.template)


def teacher_folder(source: ImportSource) -> Path:
    """The teacher's prompt folder: `--teacher` itself when it is one, else its original PromptSRC file imported
    into `<out>/teacher` on the teacher's backbone."""
    if source.teacher is None:
        raise OfficialCheckpointError(
            f"{source.path}: a PromptKD student needs its teacher; pass --teacher with the teacher's file (the "
            "PromptSRC checkpoint PromptKD publishes, e.g. teacher_model/<dataset>/VLPromptLearner/model-best.pth.tar) "
            "or an imported teacher folder"
        )
    teacher = source.teacher.expanduser()
    if (teacher / CONFIG_FILE).is_file():
        return teacher.resolve()
    if source.out is None:
        raise OfficialCheckpointError(f"{teacher}: importing a teacher file needs an output folder (--out)")
    teacher_clip = load_teacher_clip(
        source.teacher_arch, source.teacher_weights, source.clip.token_embedding.weight.device
    )
    teacher_source = ImportSource(
        path=teacher,
        clip=teacher_clip,
        classnames=source.classnames,
        template=source.template,
        ctx_init=source.ctx_init,
    )
    folder = (source.out / TEACHER_FOLDER).resolve()
    import_official("promptsrc", teacher_source).save_pretrained(folder)
    source.notes.append(f"teacher: {teacher} -> {folder} (promptsrc on {teacher_clip.config.name})")
    return folder


# -- DPC -----------------------------------------------------------------------------------------------------------


def dpc_config(also_tune: Sequence[str] = ()) -> Any:
    """The stored tensors are P' itself (see the module docstring); new classes use P."""
    from promptclip.plugins.dpc import DPCConfig

    return DPCConfig(omega_n=0.0, weighting="reparam", reparametrize=[], also_tune=list(also_tune))


def with_dpc(
    inner: PromptModel,
    stage1: Mapping[str, torch.Tensor],
    keys: Mapping[str, str],
    file: Path,
    also_tune: Sequence[str] = (),
) -> PromptModel:
    """DPC over `inner`, whose tensors hold the tuned values (copied as P'), then given the stage-1 ones (P)."""
    from promptclip.plugins.dpc import DPC

    learner = DPC(inner, dpc_config(also_tune))
    place(inner, stage1, keys, file, f"stage-1 {inner.name}")
    tuned = [*learner.stage1_tensors()]
    missing = sorted(set(tuned) - set(stage1))
    if missing:
        raise OfficialCheckpointError(
            f"{file}: no stage-1 tensor for {', '.join(missing[:5])}; is it the stage-1 file?"
        )
    learner.invalidate_cache()
    return learner


def require_stage1(source: ImportSource, method: str) -> Path:
    if source.stage1 is None:
        raise OfficialCheckpointError(
            f"{source.path}: a {method} prompt is read with its stage-1 prompt (DPC keeps the stage-1 tensors "
            "apart for new classes); pass --stage1 with the stage-1 file or run folder (the trainer's "
            "SPLE.BACK_CKPT_PATH)"
        )
    return source.stage1


def import_coop_dpc(source: ImportSource) -> PromptModel:
    method = "coop+dpc"
    stage1_path = require_stage1(source, method)
    tuned = import_coop_family("coop")(source)  # theta of StackSPLE_CoOp is a CoOp context
    stage1 = read_official_prompt(stage1_path, method="coop")
    return with_dpc(tuned, {"ctx": stage1.state["ctx"]}, {"ctx": "ctx"}, stage1.path)


def import_promptkd_dpc(source: ImportSource) -> PromptModel:
    """StackSPLE_PromptKD's file: the student's tensors (used as they are), the teacher's text context
    (`prompt_learner.ctx`, theta) and its deep text prompts (`text_encoder...VPT_shallow`)."""
    method = "promptkd+dpc"
    stage1_path = require_stage1(source, method)
    state = read_layout(source.path, source.epoch, "promptkd+dpc", method)
    student, keys = convert(promptkd.convert_official_state, state, method)
    teacher_text, teacher_keys = teacher_text_prompts(state)
    stage1 = read_layout(stage1_path, None, "promptkd", method, " (its stage-1 PromptKD student)")
    stage1_student, stage1_keys = convert(promptkd.convert_official_state, stage1, method)
    inner = promptkd_learner(stage1_student, stage1_keys, stage1, source)
    teacher_p = {n: p.detach().clone() for n, p in inner.named_parameters() if n.startswith("teacher.text.")}
    differing = sorted(set(teacher_p) ^ set(teacher_text))
    if differing:
        raise OfficialCheckpointError(
            f"{state.file}: its teacher text prompts ({len(teacher_text)} tensors) are not the teacher's "
            f"({len(teacher_p)}: {', '.join(differing[:4])} differ); pass the teacher the student was distilled "
            "from (--teacher)"
        )
    place(inner, student, keys, state.file, method)
    place(inner, teacher_text, teacher_keys, state.file, method)
    require_all(inner, list(student), state.file, method)
    return with_dpc(inner, {**stage1_student, **teacher_p}, stage1_keys, stage1.file, also_tune=["teacher.text.*"])


def teacher_text_prompts(state: OfficialState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The teacher's text prompts DPC tunes over PromptKD: `prompt_learner.ctx` and the deep prompts of the
    teacher's text encoder (saved under `text_encoder.` and, the same module, `prompt_learner.text_encoder.`)."""
    tensors = {"teacher.text.ctx": state.tensors["prompt_learner.ctx"]}
    keys = {"teacher.text.ctx": "prompt_learner.ctx"}
    for key, tensor in state.tensors.items():
        if match := _TEACHER_TEXT.match(key):
            name = f"teacher.text.deep.{int(match.group(1))}"
            if name not in keys or not key.startswith("prompt_learner."):
                tensors[name], keys[name] = tensor, key
    return {name: tensor.detach().float().clone() for name, tensor in tensors.items()}, keys


IMPORTERS: dict[str, Callable[[ImportSource], PromptModel]] = {
    "coop": import_coop_family("coop"),
    "cocoop": import_coop_family("cocoop"),
    "kgcoop": import_coop_family("kgcoop"),
    "maple": import_maple,
    "maple+dapt": import_maple_dapt,
    "ivlp": import_deep("ivlp"),
    "vpt": import_deep("vpt"),
    "deep_lang": import_deep("deep_lang"),
    "promptsrc": import_deep("promptsrc"),
    "promptkd": import_promptkd,
    "coop+dpc": import_coop_dpc,
    "promptkd+dpc": import_promptkd_dpc,
}
IMPORTABLE_METHODS = tuple(IMPORTERS)


def import_official(method: str, source: ImportSource) -> PromptModel:
    """The learner of `method` holding the prompt of an original trainer's file (see the module docstring)."""
    if method not in IMPORTERS:
        raise OfficialCheckpointError(
            f"--method {method!r}: the original trainers' files this reads are those of {', '.join(IMPORTABLE_METHODS)}"
        )
    try:
        return IMPORTERS[method](source)
    except OfficialCheckpointError:
        raise
    except ValueError as err:  # a layout the backbone cannot hold (a depth beyond its layers, ...)
        raise OfficialCheckpointError(f"{source.path}: {err}; load the backbone the prompt was trained on") from None
