"""The learner contract shared by every prompt method and plug-in.

A learner wraps the frozen CLIP and a set of class names. The engine only ever calls this contract:

* `text_features()` -> [C, D] normalised class features (cached while the learner is in eval mode);
* `encode_classnames(names)` -> the learned prompts applied to any other names;
* `image_features(images)` -> [B, D] normalised, with the learner's visual prompts if it has any;
* `forward(batch)` -> `LearnerOutput(logits, image_features, text_features)`;
* `loss(batch, output)` -> named, already weighted loss terms (the engine sums them);
* `set_classnames(names)`; `trainable_state()` / `load_trainable_state()`; `on_epoch_end(epoch, epochs)`;
* `learning_rate_scales()`: tensors that train at a multiple of the recipe's learning rate (default none);
* `set_template(template)`, `set_eval_subset("base" | "new")`, `training_state()` / `load_training_state()`;
* `needs(cfg, run)` (a class method): what a run must supply beyond the data (`RunNeeds`: masks, a stage-1
  run, transductive data, the training classes' full image set, the validation draw), read once by the run
  layer;
* `fits_on_features` / `fit_on_features(train, val, log)`: a learner fitted in one call on frozen image
  features (the linear probe) instead of by the engine's training loop.

Checkpoints hold only the trainable tensors (safetensors) plus a JSON config that names the backbone and the
sha256 of its weights, so a prompt saved for one CLIP refuses to load onto another.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from promptclip.classnames import prompt_names
from promptclip.clip.model import CLIP, ArchConfig
from promptclip.clip.transforms import Augmentation
from promptclip.config import from_dict, to_dict
from promptclip.io import atomic_write_json, atomic_write_with
from promptclip.registry import METHODS, PLUGINS

Batch = Mapping[str, Any]

CONFIG_FILE = "prompt_config.json"
WEIGHTS_FILE = "prompt.safetensors"
PROMPT_DIR = "prompt"  # a run folder's saved prompt (`save_pretrained`)


EvalSubset = Literal["base", "new"]


class PromptFileError(ValueError):
    """A saved prompt that cannot be loaded (damaged files, or made for another backbone); the message names
    the folder or file and what to do."""


@dataclass(frozen=True)
class StagePlan:
    """A run that must finish before this one starts (DPC's stage 1): its whole configuration, and the recipe
    name its folder takes (None: this run's). The run layer trains it as an ordinary run, or reuses it when a
    finished run of the same identity exists, and hands its folder to the learner as `PluginContext.stage1_dir`."""

    config: Any
    """The stage's `RunConfig`: dataset, seed and backbone are this run's; shots and class subset come from
    the run spec (a transductive stage in base2new trains on all classes with its own recipe's shots)."""
    recipe: str | None = None


@dataclass(frozen=True)
class RunNeeds:
    """What a learner (with its plug-ins) needs from a run beyond its training images and labels."""

    masks: Any = None
    """A `promptclip.data.masks.MaskConfig`: foreground masks of the training images, read and checked before
    training (synthetic data bring exact masks); None: no masks."""
    stage1: StagePlan | None = None
    transductive: bool = False
    """Trains on the unlabelled training images of every class, later evaluated ones included (PromptKD): the
    base-to-novel protocol gives it all classes, and its results are marked."""
    full_training_classes: bool = False
    """Reads every training image of the training classes, not only the few-shot draw (DPC's `library: full`),
    as `PluginContext.full_splits`."""
    validation: bool = False
    """Chooses hyper-parameters on the validation split's draw (`min(K, 4)` images per class; the linear
    probe's C): the run checks its images with the training images, and stops before any work when it is
    empty."""
    identity: dict[str, Any] = field(default_factory=dict)
    """Keys the runs' identity takes beyond the config: what a learner's numbers depend on that its config
    does not say (e.g. a behaviour that changed for some configs since earlier runs were recorded)."""

    def merge(self, outer: RunNeeds) -> RunNeeds:
        """The needs of a stack: this (inner) learner's, then those of a plug-in wrapped around it."""
        if self.stage1 is not None and outer.stage1 is not None:
            raise ValueError("two plug-ins of one stack each need a stage-1 run; stack at most one of them")
        return RunNeeds(
            masks=outer.masks if outer.masks is not None else self.masks,
            stage1=outer.stage1 or self.stage1,
            transductive=self.transductive or outer.transductive,
            full_training_classes=self.full_training_classes or outer.full_training_classes,
            validation=self.validation or outer.validation,
            identity={**self.identity, **outer.identity},
        )


@dataclass
class PluginContext:
    """What a run supplies to plug-ins beyond the inner learner, as declared by their `needs()`."""

    splits: Any = None
    """The training run's DatasetSplits (after few-shot sampling and the class subset)."""
    seed: int = 1
    run_dir: Path | None = None
    stage1_dir: Path | None = None
    """The finished stage-1 run folder (`RunNeeds.stage1`)."""
    full_splits: Any = None
    """The training classes before the few-shot draw (`RunNeeds.full_training_classes`)."""
    num_workers: int = 0
    """The run's data-loading worker processes (`data.num_workers`): a plug-in that prepares images of its
    own per step (DPC's negatives) may use as many; 0: in the main process."""
    augmentation: Augmentation = field(default_factory=Augmentation)
    """The run's training augmentation (`data.augment`, `crop_scale`, `flip`): images a plug-in prepares
    itself (DPC's negatives) are augmented as the training images are."""


@dataclass(frozen=True)
class LabelledFeatures:
    """Frozen image features of a set of images (encoded without augmentation) and their labels."""

    features: torch.Tensor
    """[N, D], as `image_features` returns them (normalised)."""
    labels: torch.Tensor
    """[N] class indices into the learner's class names."""


@dataclass
class LearnerOutput:
    logits: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor


class PromptModel(nn.Module):
    """Base class of every learner. Subclasses set `name` and `Config` and implement
    `compute_text_features`, and usually `image_features` and `encode_classnames`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    # True when `image_features` depends on trainable tensors (visual prompts): evaluation may not cache it.
    has_visual_prompts: ClassVar[bool] = False
    # True when the class features depend on the image (CoCoOp): `forward` then returns per-image text features
    # [B, C, D], and `text_features()` is only the image-independent part of the prompts. Evaluation must go
    # through `forward` (`learner(batch).logits`), which is right for every method.
    image_conditioned_text: ClassVar[bool] = False
    # True when the learner trains on the unlabelled images of every class (PromptKD; see `RunNeeds`).
    transductive: bool = False
    # True when the learner is fitted in one call on the frozen features of its training images (and of the
    # validation draw when its `needs()` asks for it) by `fit_on_features`, instead of by the engine's training
    # loop (the linear probe).
    fits_on_features: ClassVar[bool] = False

    def __init__(self, clip: CLIP, classnames: Sequence[str], cfg: Any, template: str = "a photo of a {}.") -> None:
        super().__init__()
        clip.requires_grad_(False)
        clip.eval()
        self.clip = clip
        self.cfg = cfg
        self.template = template
        self.classnames: list[str] = prompt_names(classnames)
        self._text_cache: torch.Tensor | None = None

    # -- the contract ------------------------------------------------------------------------------------
    def compute_text_features(self) -> torch.Tensor:
        """[C, D] normalised features of `self.classnames` through the learned prompts."""
        return self.encode_classnames(self.classnames)

    def encode_classnames(self, names: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self) -> torch.Tensor:
        """Class features; computed once and reused while in eval mode (the prompts cannot change)."""
        if self.training or torch.is_grad_enabled():
            return self.compute_text_features()
        if self._text_cache is None:
            self._text_cache = self.compute_text_features()
        return self._text_cache

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().float()

    def forward(self, batch: Batch) -> LearnerOutput:
        image = self.image_features(batch["image"])
        text = self.text_features()
        return LearnerOutput(scaled_cosine_logits(self.logit_scale, image, text), image, text)

    @property
    def cacheable_image_features(self) -> bool:
        """True when evaluation may reuse image features computed earlier for the same image and backbone:
        `image_features` reads no trainable tensor, and `forward` is the base one, i.e.
        `classify_image_features(image_features(images))`. Learners with visual prompts, image-conditioned
        class features or a `forward` of their own (plug-ins) are never served from a cache."""
        return (
            not self.has_visual_prompts
            and not self.image_conditioned_text
            and type(self).forward is PromptModel.forward
        )

    def classify_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of normalised image features against the class features: `forward` after its image
        pass."""
        return scaled_cosine_logits(self.logit_scale, image_features, self.text_features())

    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(output.logits, batch["label"])}

    def set_classnames(self, names: Sequence[str]) -> None:
        """Switch the class set (base -> new evaluation). Only class-dependent, non-persistent buffers are
        rebuilt; learned tensors are untouched."""
        self.classnames = prompt_names(names)
        self.invalidate_cache()

    @classmethod
    def needs(cls, cfg: Any, run: Any) -> RunNeeds:
        """What a run must supply to this learner with config `cfg` (its own config; `run` is the whole
        `RunConfig`). Nothing beyond the images and labels by default."""
        return RunNeeds()

    def fit_on_features(
        self, train: LabelledFeatures, val: LabelledFeatures | None, log: Callable[[str], None]
    ) -> dict[str, Any]:
        """Fit the learner on frozen features (`fits_on_features` learners only); returns what the run records
        about the fit (results.json `train`)."""
        raise NotImplementedError(f"{self.name} is trained by the engine's loop, not fitted on features")

    encodes_sentences: ClassVar[bool] = False
    """True when `encode_sentences` encodes whole hand-written sentences through the learned text prompts."""

    def encode_sentences(self, sentences: Sequence[str]) -> torch.Tensor:
        """[N, D] normalised features of whole sentences through the learned text prompts (deep text prompts
        only: learners whose prompts wrap a class name cannot)."""
        raise NotImplementedError(f"{self.name} has no sentence encoder (its prompts wrap class names)")

    def set_template(self, template: str) -> None:
        """Use another hand-written template (a transfer target's) for the parts of the prompt that are not
        learned."""
        self.template = template
        self.invalidate_cache()

    def set_eval_subset(self, which: EvalSubset) -> None:
        """Whether the classes evaluated next are the ones the learner was trained on ("base") or any other
        set ("new"). Learners that weigh their prompts by it (DPC) override this; the others ignore it."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """State a resumed run needs that is not part of the prompt (e.g. PromptSRC's running aggregate)."""
        return {}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what `training_state` returned."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by the engine before the first step of each epoch (0-based `epoch`), also after a resume."""

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called by the engine after the last step of each epoch (0-based `epoch`)."""

    def invalidate_cache(self) -> None:
        self._text_cache = None

    def train(self, mode: bool = True) -> PromptModel:
        super().train(mode)
        self.clip.eval()  # the frozen backbone never switches to training behaviour (BatchNorm)
        self.invalidate_cache()
        return self

    # -- trainable state -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def learning_rate_scales(self) -> dict[str, float]:
        """Trainable tensors (named as in `trainable_parameters`) that train at a multiple of the recipe's
        learning rate (DePT's head: 6.5x); the others train at the recipe's rate."""
        return {}

    def extra_state_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers that training changes and a checkpoint must keep (e.g. BatchNorm statistics)."""
        return {}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {name: p.detach() for name, p in self.trainable_parameters().items()}
        state.update({name: b.detach() for name, b in self.extra_state_buffers().items()})
        return state

    def load_trainable_state(self, state: Mapping[str, torch.Tensor], source: str = "state") -> None:
        own = self.trainable_state()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{source}: prompt tensors do not match this {self.name} learner "
                f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}); was it saved by another method "
                "or configuration?"
            )
        for key, tensor in own.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, this learner expects "
                    f"{tuple(tensor.shape)} (another backbone, class count or prompt length?)"
                )
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key].to(tensor.device, tensor.dtype))
        self.invalidate_cache()

    def num_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters().values())
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def parameter_summary(self) -> str:
        trainable, total = self.num_parameters()
        return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"

    def print_trainable_parameters(self) -> str:
        line = self.parameter_summary()
        print(line)
        return line

    # -- saving and loading -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The method (with any plug-ins) and configs needed to rebuild this learner."""
        return {"method": self.name, "method_cfg": to_dict(self.cfg), "plugins": {}}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}
        atomic_write_with(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
        atomic_write_json(
            directory / CONFIG_FILE,
            {
                **self.describe(),
                "template": self.template,
                "classnames": self.classnames,
                "backbone": {
                    "arch": self.clip.config.name,
                    "config": self.clip.config.to_dict(),
                    "weights_sha256": self.clip.weights_sha256,
                },
            },
        )
        return directory

    @classmethod
    def from_pretrained(
        cls,
        clip: CLIP,
        directory: str | Path,
        classnames: Sequence[str] | None = None,
        strict_backbone: bool = True,
    ) -> PromptModel:
        """Load a saved prompt onto `clip`. A prompt saved for another backbone is refused."""
        directory = Path(directory)
        meta = read_prompt_config(directory)
        check_backbone(meta, clip, directory, strict=strict_backbone)
        method_cls = get_method(meta["method"])
        if cls is not PromptModel and not issubclass(method_cls, cls):
            raise PromptFileError(f"{directory}: holds a {meta['method']} prompt, not a {cls.name} one")
        cfg: Any = from_dict(method_cls.Config, meta.get("method_cfg") or {}, where="method_cfg")
        # Built for the class names it was saved with, then switched: class-specific tensors can refuse.
        learner = method_cls(clip, meta["classnames"], cfg, template=meta.get("template", "a photo of a {}."))
        if meta.get("plugins"):
            learner = wrap_with_plugins(learner, meta["plugins"])
        learner.load_trainable_state(read_prompt_weights(directory), source=str(directory))
        if classnames is not None and list(classnames) != meta["classnames"]:
            try:
                learner.set_classnames(classnames)
            except ValueError as err:  # e.g. class-specific context: say which prompt refused
                raise PromptFileError(f"{directory}: {err}") from None
        return learner


def scaled_cosine_logits(scale: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """`scale * image @ text.T` in fp32 even under autocast: near 100 * cos, bf16 logits would be coarse.
    `text` is [C, D], or [B, C, D] per-image class features (CoCoOp), each image then scored against its own."""
    with torch.autocast(device_type=image.device.type, enabled=False):
        if text.dim() == 3:
            return scale.float() * torch.einsum("bd,bcd->bc", image.float(), text.float())
        return scale.float() * image.float() @ text.float().t()


def read_prompt_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{directory}: not a saved prompt (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
            "save one with learner.save_pretrained(dir) or a training run's prompt/ folder)"
        )
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PromptFileError(f"{config_path}: corrupt prompt config ({err}); re-save the prompt") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str):
        raise PromptFileError(
            f"{config_path}: corrupt prompt config (not a mapping with a 'method' name); re-save the prompt"
        )
    names = meta.get("classnames")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise PromptFileError(
            f"{config_path}: corrupt prompt config ('classnames' must be a list of names); re-save the prompt"
        )
    if not isinstance(meta.get("backbone", {}), dict):
        raise PromptFileError(f"{config_path}: corrupt prompt config ('backbone' is not a mapping); re-save the prompt")
    return meta


def read_prompt_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a damaged or foreign file
        raise PromptFileError(
            f"{path}: not a readable prompt file ({err}); save the prompt again, or run its training run again"
        ) from None


def check_backbone(meta: Mapping[str, Any], clip: CLIP, directory: Path, strict: bool = True) -> None:
    saved = meta.get("backbone", {})
    if saved.get("config") and not _same_architecture(saved["config"], clip):
        saved_arch = saved.get("arch")
        raise PromptFileError(
            f"{directory}: prompt was trained on backbone {saved_arch!r}, "
            f"not on the loaded {clip.config.name!r}; load the matching CLIP"
        )
    saved_sha = saved.get("weights_sha256")
    if strict and saved_sha and clip.weights_sha256 and saved_sha != clip.weights_sha256:
        raise PromptFileError(
            f"{directory}: prompt was trained on CLIP weights with sha256 {saved_sha[:12]}..., the loaded "
            f"weights have {clip.weights_sha256[:12]}...; load the same weights file "
            "(or pass strict_backbone=False to evaluate it anyway)"
        )


def _same_architecture(saved: Mapping[str, Any], clip: CLIP) -> bool:
    """Compare as configs, not as JSON (tuples come back as lists); the name alone does not matter."""
    try:
        saved_cfg = ArchConfig.from_dict(saved)
    except (KeyError, TypeError, ValueError):
        return False
    return dataclasses.replace(saved_cfg, name=clip.config.name) == clip.config


def get_method(name: str) -> type[PromptModel]:
    return METHODS.get(name)  # type: ignore[no-any-return]


def wrap_with_plugins(
    learner: PromptModel, plugins: Mapping[str, Any], context: PluginContext | None = None
) -> PromptModel:
    """Wrap `learner` in each plug-in of `plugins` (name -> config instance or plain mapping), in order."""
    for name, cfg in plugins.items():
        plugin_cls = PLUGINS.get(name)
        if isinstance(cfg, Mapping):
            cfg = from_dict(plugin_cls.Config, cfg, where=f"plugins.{name}")
        learner = plugin_cls(learner, cfg, context)
    return learner


def get_prompt_model(
    clip: CLIP,
    method_cfg: Any,
    classnames: Sequence[str],
    template: str = "a photo of a {}.",
    method: str | None = None,
) -> PromptModel:
    """Build a learner: `method_cfg` is a method's Config instance (its class knows the method), or a
    mapping with a `method` key and that method's fields."""
    if isinstance(method_cfg, Mapping):
        data = dict(method_cfg)
        method = method or data.pop("method", None)
        if method is None:
            raise ValueError("method_cfg mapping needs a 'method' key (e.g. {'method': 'coop', 'n_ctx': 4})")
        method_cls = get_method(method)
        method_cfg = from_dict(method_cls.Config, data, where="method_cfg")
    else:
        method_cls = _method_for_config(method_cfg) if method is None else get_method(method)
    return method_cls(clip, classnames, method_cfg, template=template)


def _method_for_config(cfg: Any) -> type[PromptModel]:
    for _, method_cls in METHODS.items():
        if type(cfg) is method_cls.Config:
            return method_cls
    raise ValueError(f"{type(cfg).__name__} is not the config of any registered method")
