"""DPC, dual-prompt collaboration (CVPR 2025): a second stage over any tuned prompt learner.

Stage 1 is an ordinary run of the wrapped learner (CoOp, KgCoOp, MaPLe, PromptSRC, PromptKD, ...). Stage 2
freezes its tuned tensors P (prompts at every depth, couplings, projectors) and trains a parallel copy P'
that starts as an exact copy of every one of them. The unchanged inner learner runs with P' (or a mix of P
and P') substituted for its own tensors through `torch.func.functional_call`: no learner code is copied.

Weighting-decoupling, with omega_b for base classes and omega_n for new ones:

* `weighting: reparam` (the official code's formula, the default): the stored trainable tensor is theta
  (starting at P) and the learner runs with P' = P + (theta - P) / omega_b, which is the code's
  (theta - (1 - omega_b) P) / omega_b written so that P' is exactly P at the start. omega_b only rescales the
  step on P' (by 1 / omega_b^2 for SGD).
* `weighting: mixed` (the paper's figure): P' is stored and trained; training and base inference feed the
  mixed prompt P + omega_b (P' - P).
* `compat: released` runs the formula as the released code executes it: there theta is created as a
  Parameter over P's own storage, so every optimiser step moves P with theta, the formula gives P' = theta,
  the step on P' is lr / omega_b and weight decay pulls P' toward 0 (`released_tensor`).
* Base classes (the classes P' was tuned on) are evaluated with the tuned prompt above; any other class set
  ("new": novel classes, transfer targets) with P + omega_n (P' - P) on the tensors `new_mix` names and P on
  the others. With omega_n = 0 (every reported run) that is P itself, so new-class predictions are bitwise
  those of stage 1.

Which of the two an evaluation is, is set explicitly with `set_eval_subset("base" | "new")` (the runner does
so before every evaluation target); it is never inferred from class names or folders. It defaults to
"base", which is also what training uses.

A training forward draws the hard negatives (see `hard_negatives`) and encodes them with the anchors: the
hard negatives are ranked by the frozen stage-1 model, i.e. the inner learner with its own tensors P, whose
class features are encoded once per class set; a learner whose image side is frozen ranks with the image
features of its own forward, others with a frozen pass of their own. Then all B' images go through the
learner in one call when its image side is trained, so a layer with batch statistics (PromptKD's
BatchNorm) normalises them as one batch and updates its statistics once per step, as the official code does.
The loss is the symmetric contrastive loss over the image-class pairs; the wrapped learner's own loss terms
can be added with `backbone_loss_weight` (0 in the official code). The inner learner's epoch hooks are not
called: its tensors are frozen (PromptSRC's Gaussian aggregation, for one, belongs to stage 1).

`trainable_state()` holds what training changes (the stored tensors and any tuned BatchNorm statistics);
a saved prompt also holds P under `stage1.`, so it evaluates new classes without the stage-1 folder.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from promptclip.classnames import prompt_names
from promptclip.clip.model import CLIP
from promptclip.clip.transforms import FIELD_AUGMENTATION
from promptclip.config import ConfigError, RunConfig, build_run_config, from_dict, load_recipe, to_dict
from promptclip.data.loader import derive_seed, training_augmentation
from promptclip.io import atomic_write_with
from promptclip.methods.base import (
    CONFIG_FILE,
    PROMPT_DIR,
    WEIGHTS_FILE,
    Batch,
    EvalSubset,
    LearnerOutput,
    PluginContext,
    PromptModel,
    RunNeeds,
    StagePlan,
    check_backbone,
    read_prompt_config,
    scaled_cosine_logits,
)
from promptclip.plugins.base import PluginModel
from promptclip.plugins.hard_negatives import (
    PictureLibrary,
    PictureWorkers,
    RenderedPictures,
    select_negatives,
    symmetric_contrastive_loss,
)
from promptclip.registry import PLUGINS

STAGE1_PREFIX = "stage1."
_NEGATIVE_STREAM = 11  # derived-seed stream of the negative draws (the loader uses 1-4)
COMPAT_MODES = ("default", "released")  # the names DAPT uses too


@dataclass
class DPCConfig:
    omega_b: float = 0.2
    """Weight of the tuned prompt for base classes (0 < omega_b <= 1); in `reparam` weighting it only rescales
    the learning rate of P' (0.2 is the poster's best for CoOp; the CoOp configs use 0.5)."""
    omega_n: float = 0.0
    """Weight of the tuned prompt for new classes: P + omega_n (P' - P). 0 (the reported setting) keeps the
    stage-1 predictions exactly."""
    weighting: Literal["reparam", "mixed"] = "reparam"
    """reparam: the official code's formula (train theta, run P' = P + (theta - P) / omega_b); mixed: the
    paper's figure (train P', run P + omega_b (P' - P))."""
    compat: Literal["default", "released"] = "default"
    """default: the formula as written, P frozen. released: the released code as it runs, theta sharing P's
    storage, so P moves with theta and P' = theta (step lr / omega_b, weight decay toward 0); weighted tensors
    added by `also_tune` rank with their untuned values (the released PromptKD sampler). See docs/dpc.md."""
    top_k: int = 8
    """Hard-negative candidates per image: its top-K classes under the stage-1 model, minus its ground truth
    (at most K - 1)."""
    min_negatives: int = 2
    """Negatives per image after dropping classes already in the batch; the rest are random unused classes."""
    library: Literal["fewshot", "full"] = "fewshot"
    """Pictures of the negative classes: the run's own few-shot training images (no data beyond the shot
    budget), or the full training split of the training classes (the authors' picture library)."""
    backbone_loss_weight: float = 0.0
    """Weight of the wrapped learner's own loss terms, computed with P' (0: the contrastive loss alone)."""
    also_tune: list[str] = field(default_factory=list)
    """Patterns (fnmatch) of tensors frozen in stage 1 that DPC tunes too, e.g. ["teacher.text.*"] for the
    text branch the official PromptKD+DPC adds (the teacher's text prompts). Backbone weights never match."""
    reparametrize: list[str] = field(default_factory=lambda: ["*"])
    """Patterns of the tuned tensors the omega_b weighting applies to; the others train and run directly
    (the official PromptKD+DPC weights only the text context: ["teacher.text.ctx"])."""
    new_mix: list[str] = field(default_factory=lambda: ["*"])
    """Patterns of the tuned tensors the omega_n mix applies to on new classes; the others run with P there
    (the official PromptKD+DPC mixes the student's prompts only: ["vision.*"], keeping the projector and the
    teacher's text of stage 1)."""
    stage1_recipe: str = ""
    """Recipe of the stage-1 run (file, or name under configs/, e.g. coop/vit_b16_ep50_ctxv1): its method
    config, optimiser and batch size; dataset, seed and backbone are this run's, shots and classes the run
    spec's (a transductive stage 1 in base2new: all classes, the recipe's shots). Empty: this recipe without
    the DPC plug-in. Its method config must equal this recipe's."""
    stage1_opts: dict[str, Any] = field(default_factory=dict)
    """Overrides of the stage-1 config, nested as in a recipe or with dotted keys: {optim.epochs: 50}."""
    stage1_prompt: str = ""
    """A saved stage-1 prompt (or a run folder holding prompt/) to start from instead of a stage-1 run."""


def check_dpc_config(cfg: DPCConfig) -> None:
    if not 0.0 < cfg.omega_b <= 1.0:
        raise ConfigError(f"plugins.dpc.omega_b: {cfg.omega_b} is outside (0, 1]; the official values are 0.2 and 0.5")
    if not 0.0 <= cfg.omega_n <= 1.0:
        raise ConfigError(f"plugins.dpc.omega_n: {cfg.omega_n} is outside [0, 1]; 0 keeps new classes at stage 1")
    if cfg.top_k < 1:
        raise ConfigError(f"plugins.dpc.top_k: must be at least 1, got {cfg.top_k}")
    if cfg.min_negatives < 0:
        raise ConfigError(f"plugins.dpc.min_negatives: must be >= 0, got {cfg.min_negatives}")
    if cfg.compat not in COMPAT_MODES:
        raise ConfigError(
            f"plugins.dpc.compat: {cfg.compat!r} is not allowed; choose one of {', '.join(COMPAT_MODES)} (default: "
            "the weighting formula as written; released: the released code's shared theta and P)"
        )
    if cfg.compat == "released" and cfg.weighting != "reparam":
        raise ConfigError(
            f"plugins.dpc.compat: released reproduces the released code's reparam weighting, not weighting "
            f"{cfg.weighting!r}; set plugins.dpc.weighting to reparam or compat to default"
        )


def released_tensor(stored: torch.Tensor, omega_b: float) -> torch.Tensor:
    """What the released code feeds the encoders: (theta - (1 - omega_b) P) * (1 / omega_b) with P the same
    storage as theta (a Parameter built over P without a copy), so P is theta's value outside autograd. The
    value is theta up to rounding and the gradient reaching theta is 1 / omega_b times the one on P'."""
    return (stored - (1 - omega_b) * stored.detach()) * (1 / omega_b)


@dataclass
class DPCOutput(LearnerOutput):
    """A training forward's output: the anchors' logits and features, as the inner learner gives them, plus
    the image-class pairs of the contrastive loss (anchors first, then the hard negatives)."""

    pair_image_features: torch.Tensor
    """[B', D] image features of the anchors and their negatives."""
    pair_labels: torch.Tensor
    """[B'] the class of each pair."""


class _Dispatch(nn.Module):
    """Calls any method of the inner learner, so `functional_call` can substitute tensors for it."""

    def __init__(self, inner: PromptModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, method: str, *args: Any) -> Any:
        return getattr(self.inner, method)(*args)


class _BufferStore(nn.Module):
    """Holds tensors by escaped names: the tuned copies of the inner learner's trained buffers (BatchNorm
    statistics), the untuned values of `compat: released`'s ranking."""


def _escape(name: str) -> str:
    return name.replace(".", "__")


def _matching(names: Sequence[str], patterns: Sequence[str], key: str, inner: PromptModel) -> set[str]:
    """The names matching any pattern; a pattern that matches none of them is refused."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(
                f"plugins.dpc.{key}: {pattern!r} matches no tuned tensor of {inner.name}; they are "
                f"{', '.join(names)[:400]}"
            )
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


@PLUGINS.register("dpc")
class DPC(PluginModel):
    """Dual-prompt collaboration: a parallel prompt P' tuned over a frozen stage-1 learner with hard negatives.

    P (the stage-1 tensors) is frozen, P' is trained; weighting-decoupling combines them per class set."""

    name = "dpc"
    Config = DPCConfig

    @classmethod
    def needs(cls, cfg: DPCConfig, run: RunConfig) -> RunNeeds:
        """A stage-1 run of the learner this plug-in wraps (unless `stage1_prompt` names a saved one), and with
        `library: full` the training classes' full image set for the hard negatives' pictures."""
        return RunNeeds(
            stage1=stage1_plan(run, cls.name),
            full_training_classes=cfg.library == "full",
            identity=negatives_identity(run, cls.name),
        )

    def __init__(self, inner: PromptModel, cfg: DPCConfig, context: PluginContext | None = None) -> None:
        check_dpc_config(cfg)
        if getattr(inner, "image_conditioned_text", False):
            raise ValueError(
                f"dpc: {inner.name} builds per-image class features, which the image-class contrastive loss "
                "cannot pair; wrap a learner with image-independent class features (coop, kgcoop, maple, ...)"
            )
        super().__init__(inner, cfg, context)
        if context is not None:
            stage1 = context.stage1_dir or cfg.stage1_prompt
            if stage1:
                load_stage1_prompt(inner, Path(stage1))
        self.tuned_names = tuned_tensor_names(inner, cfg.also_tune)
        added = set(self.tuned_names) - set(tuned_tensor_names(inner))  # frozen in stage 1, tuned by also_tune
        self.buffer_names = sorted(inner.extra_state_buffers())
        self.weighted_names = {n for n in self.tuned_names if any(fnmatch.fnmatchcase(n, p) for p in cfg.reparametrize)}
        self.new_mix_names = _matching([*self.tuned_names, *self.buffer_names], cfg.new_mix, "new_mix", inner)
        for name in self.tuned_names:
            inner.get_parameter(name).requires_grad_(False)
        # P' starts as a real copy (own storage) of every tuned tensor at every depth.
        self.tuned = nn.ParameterDict(
            {_escape(n): nn.Parameter(inner.get_parameter(n).detach().clone()) for n in self.tuned_names}
        )
        self.tuned_buffers = _BufferStore()
        for name in self.buffer_names:
            self.tuned_buffers.register_buffer(_escape(name), inner.get_buffer(name).detach().clone())
        if len(self.tuned) != len(self.tuned_names) or len(dict(self.tuned_buffers.named_buffers())) != len(
            self.buffer_names
        ):
            raise ValueError("dpc: two tensor names of the wrapped learner collide once '.' is escaped")
        self.__dict__["_dispatch"] = _Dispatch(inner)  # not a submodule: the inner learner is registered once
        # The released PromptKD sampler ranks with the untuned values of the weighted tensors DPC adds.
        untuned = sorted(self.weighted_names & added) if cfg.compat == "released" else []
        self.untuned = _BufferStore()  # moves with the learner; not saved (rebuilt from the config)
        for name, value in untuned_values(inner, untuned).items():
            self.untuned.register_buffer(_escape(name), value, persistent=False)
        self._untuned_names = untuned
        # A frozen image side gives the stage-1 image features in the forward itself: no second pass to rank.
        self.rank_with_forward_features = not inner.has_visual_prompts and not cfg.also_tune
        self.eval_subset: EvalSubset = "base"
        self._frozen_substitutes: dict[str, tuple[tuple[int, ...], dict[str, torch.Tensor]]] = {}
        self._ranking_text: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._library: PictureLibrary | None = None
        self._picture_workers: PictureWorkers | None = None
        self._epoch = 0
        self._step = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_picture_workers"] = None  # processes are not copied; a copy starts its own
        return state

    # -- the tensors ---------------------------------------------------------------------------------------
    @property
    def _ranking_overrides(self) -> dict[str, torch.Tensor]:
        """Tensors the ranking model takes instead of P (`compat: released`: untuned ones)."""
        return {name: self.untuned.get_buffer(_escape(name)) for name in self._untuned_names}

    def stage1_tensors(self) -> dict[str, torch.Tensor]:
        """P: the frozen stage-1 tensors (parameters, then trained buffers) by their name in the inner learner."""
        tensors: dict[str, torch.Tensor] = {n: self.inner.get_parameter(n) for n in self.tuned_names}
        tensors.update({n: self.inner.get_buffer(n) for n in self.buffer_names})
        return tensors

    def tuned_tensors(self) -> dict[str, torch.Tensor]:
        """P', the parallel prompt (differentiable): P + (theta - P) / omega_b for weighted tensors in
        reparam weighting (the released code's aliased form under `compat: released`), else the stored
        tensor itself."""
        tensors: dict[str, torch.Tensor] = {}
        omega_b = self.cfg.omega_b
        for name in self.tuned_names:
            stored = self.tuned[_escape(name)]
            if self.cfg.weighting != "reparam" or name not in self.weighted_names:
                tensors[name] = stored
            elif self.cfg.compat == "released":
                tensors[name] = released_tensor(stored, omega_b)
            else:
                stage1 = self.inner.get_parameter(name)
                tensors[name] = stage1 + (stored - stage1) / omega_b
        tensors.update({n: self.tuned_buffers.get_buffer(_escape(n)) for n in self.buffer_names})
        return tensors

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """What the learner runs with in training and on base classes."""
        tensors = self.tuned_tensors()
        if self.cfg.weighting == "mixed":
            stage1 = self.stage1_tensors()
            for name in self.weighted_names:
                tensors[name] = torch.lerp(stage1[name], tensors[name], self.cfg.omega_b)
        return tensors

    def new_tensors(self) -> dict[str, torch.Tensor]:
        """What the learner runs with on any other class set: P + omega_n (P' - P) on the `new_mix` tensors,
        P on the others; integer buffers stay P. Under `compat: released` P' is the stored theta, as the
        released code mixes the stored tensor with a fresh copy of P."""
        stage1 = self.stage1_tensors()
        if self.cfg.omega_n == 0:
            return stage1
        tuned = self.tuned_tensors()
        if self.cfg.compat == "released":
            tuned.update({n: self.tuned[_escape(n)] for n in self.tuned_names})
        return {
            name: torch.lerp(p, tuned[name].to(p.dtype), self.cfg.omega_n)
            if p.is_floating_point() and name in self.new_mix_names
            else p
            for name, p in stage1.items()
        }

    def set_eval_subset(self, which: EvalSubset) -> None:
        """Evaluate as `base` (the classes P' was tuned on: P') or `new` (any other class set: the omega_n
        mix). Training always uses the base prompt."""
        if which not in ("base", "new"):
            raise ValueError(f"dpc: eval subset {which!r}; choose 'base' (tuned classes) or 'new' (other classes)")
        super().set_eval_subset(which)
        if which != self.eval_subset:
            self.eval_subset = which
            self.invalidate_cache()

    def _substitutes(self) -> dict[str, torch.Tensor]:
        subset: EvalSubset = "base" if self.training else self.eval_subset
        if subset == "new" and self.cfg.omega_n == 0:
            return {}  # the inner learner's own tensors: bitwise stage 1
        build = self.base_tensors if subset == "base" else self.new_tensors
        if torch.is_grad_enabled():
            return build()
        # Without autograd the tensors are reused while nothing changed: stable objects keep the inner
        # learner's caches (e.g. PromptKD's teacher text features) valid.
        tensors = (*self.tuned.values(), *self.tuned_buffers.buffers(), *self.stage1_tensors().values())
        versions = tuple(v for t in tensors for v in (t._version, t.data_ptr()))
        cached = self._frozen_substitutes.get(subset)
        if cached is None or cached[0] != versions:
            cached = (versions, {k: v.detach() for k, v in build().items()})
            self._frozen_substitutes[subset] = cached
        return cached[1]

    def _run(self, method: str, *args: Any) -> Any:
        """Call `method` of the inner learner with the active tensors substituted for its own."""
        return self._call_inner(self._substitutes(), method, *args)

    def _call_inner(self, tensors: Mapping[str, torch.Tensor], method: str, *args: Any) -> Any:
        if not tensors:
            return getattr(self.inner, method)(*args)
        substitutes = {f"inner.{name}": tensor for name, tensor in tensors.items()}
        return torch.func.functional_call(self.__dict__["_dispatch"], substitutes, (method, *args))

    # -- the contract ----------------------------------------------------------------------------------------
    def compute_text_features(self) -> torch.Tensor:
        return self._run("compute_text_features")

    def encode_classnames(self, names: Sequence[str]) -> torch.Tensor:
        return self._run("encode_classnames", list(names))

    def text_features(self) -> torch.Tensor:
        return self._run("text_features")

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("image_features", images)

    def forward(self, batch: Batch) -> LearnerOutput:
        """The inner learner's output; in a training step (training mode, autograd on) the pairs' output,
        which also holds the anchors' and their hard negatives' image features (`pair_output`)."""
        if self.training and torch.is_grad_enabled():
            return self.pair_output(batch)
        return self._run("forward", batch)

    def pair_output(self, batch: Batch) -> DPCOutput:
        """Draw the anchors' hard negatives and encode them: the anchors' output as the inner learner gives
        it, plus the image features and classes of all B' image-class pairs (anchors first)."""
        if "label" not in batch:
            raise ValueError("dpc: a training batch needs labels ('label'): the hard negatives are chosen by class")
        if self.rank_with_forward_features:
            return self._pairs_beside_the_forward(batch)
        return self._pairs_in_one_pass(batch)

    def _pairs_beside_the_forward(self, batch: Batch) -> DPCOutput:
        """A frozen image side: the forward's image features are the stage-1 ones the ranking needs, and the
        negatives' features do not depend on being encoded with the anchors."""
        images, labels = batch["image"], batch["label"]
        output = self._run("forward", batch)
        negatives = self.draw_negatives(self.ranking_scores(output.image_features), labels)
        features = output.image_features
        if len(negatives):
            encoded = self.image_features(negatives.images(images.device).to(images.dtype))
            features = torch.cat([features, encoded.to(features.dtype)])
        pair_labels = torch.cat([labels, negatives.labels.to(labels.device)])
        return DPCOutput(output.logits, output.image_features, output.text_features, features, pair_labels)

    def _pairs_in_one_pass(self, batch: Batch) -> DPCOutput:
        """An image side that trains: ranked by a frozen stage-1 pass, then all B' images through the learner
        in one pass: one batch for any batch statistics, one update of them per step."""
        images, labels = batch["image"], batch["label"]
        negatives = self.draw_negatives(self.stage1_scores(images), labels)
        pair_labels = torch.cat([labels, negatives.labels.to(labels.device)])
        pictures = negatives.images(images.device).to(images.dtype)
        joint = self._run("forward", {"image": torch.cat([images, pictures]), "label": pair_labels})
        anchors = labels.shape[0]
        logits, features = joint.logits[:anchors], joint.image_features[:anchors]
        return DPCOutput(logits, features, joint.text_features, joint.image_features, pair_labels)

    def loss(self, batch: Batch, output: LearnerOutput) -> dict[str, torch.Tensor]:
        """The contrastive loss over the pairs of a training forward's output; for any other output (a forward
        without autograd or in evaluation mode, which draws no negatives) the pairs are drawn now."""
        if not isinstance(output, DPCOutput):
            output = self.pair_output(batch)
        features, labels = output.pair_image_features, output.pair_labels
        terms = {"dpc": symmetric_contrastive_loss(features, output.text_features[labels], labels, self.logit_scale)}
        if self.cfg.backbone_loss_weight:
            inner_terms = self._run("loss", batch, output)
            terms.update({f"stage1_{k}": self.cfg.backbone_loss_weight * v for k, v in inner_terms.items()})
        return terms

    # -- the hard negatives ------------------------------------------------------------------------------------
    def draw_negatives(self, scores: torch.Tensor, labels: torch.Tensor) -> RenderedPictures:
        """The step's negatives from the stage-1 `scores` [B, C] of the anchors: classes chosen on the host,
        pictures rendered (in worker processes with `PluginContext.num_workers`), seeded from (run seed,
        epoch, step)."""
        library = self.picture_library()
        generator = torch.Generator().manual_seed(
            derive_seed(_NEGATIVE_STREAM, self.context.seed, self._epoch, self._step)
        )
        self._step += 1
        eligible = library.has_pictures()
        chosen = select_negatives(scores, labels, self.cfg.top_k, self.cfg.min_negatives, generator, eligible)
        requests = library.requests([c for row in chosen for c in row], generator)
        most = labels.shape[0] * max(self.cfg.top_k - 1, self.cfg.min_negatives)  # negatives per anchor: at most
        return library.render_all(requests, self.picture_workers(most))

    def ranking_scores(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, C] fp32 scores of stage-1 image features against the stage-1 class features (ranking only)."""
        with torch.no_grad():
            return scaled_cosine_logits(self.logit_scale, image_features.detach(), self.stage1_class_features())

    def stage1_scores(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C] scores of the frozen stage-1 model over the current classes (ranking only)."""
        with torch.no_grad():
            return self.ranking_scores(self._call_inner(self._ranking_overrides, "image_features", images))

    def stage1_class_features(self) -> torch.Tensor:
        """The stage-1 model's class features, encoded once per class set."""
        device = self.clip.token_embedding.weight.device
        tensors = [*self.stage1_tensors().values(), *self._ranking_overrides.values()]
        key = (tuple(self.classnames), device, *(t._version for t in tensors))
        if self._ranking_text is None or self._ranking_text[0] != key:
            with torch.no_grad():
                features = self._call_inner(self._ranking_overrides, "encode_classnames", self.classnames)
            self._ranking_text = (key, features.float())
        return self._ranking_text[1]

    def picture_library(self) -> PictureLibrary:
        """The pictures negatives are drawn from, built once from the run's training data."""
        if self._library is None:
            self._library = build_picture_library(self.context, self.cfg, self.classnames, self.clip)
        return self._library

    def picture_workers(self, capacity: int = 1) -> PictureWorkers | None:
        """The `PluginContext.num_workers` processes that render the negatives, with room for `capacity`
        pictures a step, started at the first draw (None: rendered in this process)."""
        wanted, current = self.context.num_workers, self._picture_workers
        if wanted <= 0:
            return None
        if current is None or current.workers != wanted or current.capacity < capacity:
            if current is not None:
                current.close()
            self._picture_workers = PictureWorkers(self.picture_library(), wanted, capacity)
        return self._picture_workers

    # -- epochs, classes, state ------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self._epoch = epoch
        self._step = 0

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Nothing: the inner learner is frozen, its epoch hooks belong to stage 1."""

    def extra_state_buffers(self) -> dict[str, torch.Tensor]:
        return {f"tuned_buffers.{_escape(n)}": self.tuned_buffers.get_buffer(_escape(n)) for n in self.buffer_names}

    def stage1_state(self) -> dict[str, torch.Tensor]:
        return {STAGE1_PREFIX + name: tensor.detach() for name, tensor in self.stage1_tensors().items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor], source: str = "state") -> None:
        """Load P' (and, from a saved prompt, P under `stage1.`); a training checkpoint holds P' only."""
        stage1 = {k[len(STAGE1_PREFIX) :]: v for k, v in state.items() if k.startswith(STAGE1_PREFIX)}
        if stage1:
            own = self.stage1_tensors()
            if set(stage1) != set(own):
                missing, unexpected = sorted(set(own) - set(stage1)), sorted(set(stage1) - set(own))
                raise ValueError(
                    f"{source}: stage-1 tensors do not match this learner (missing: {missing[:5]}, "
                    f"unexpected: {unexpected[:5]}); was it saved over another stage-1 method or configuration?"
                )
            with torch.no_grad():
                for name, tensor in own.items():
                    if tuple(stage1[name].shape) != tuple(tensor.shape):
                        raise ValueError(f"{source}: {STAGE1_PREFIX}{name} has shape {tuple(stage1[name].shape)}")
                    tensor.copy_(stage1[name].to(tensor.device, tensor.dtype))
            self.inner.invalidate_cache()
        rest = {k: v for k, v in state.items() if not k.startswith(STAGE1_PREFIX)}
        super().load_trainable_state(rest, source)

    def save_pretrained(self, directory: str | Path) -> Path:
        """The prompt folder of every learner, its weights file extended with P (`stage1.`)."""
        directory = super().save_pretrained(directory)
        state = {**self.trainable_state(), **self.stage1_state()}
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write_with(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
        return directory


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def tuned_tensor_names(inner: PromptModel, also_tune: Sequence[str] = ()) -> list[str]:
    """The inner learner's stage-1 trainable parameters, plus the frozen ones matching `also_tune` (never a
    CLIP backbone weight), in the inner learner's order."""
    backbone = {id(p) for module in inner.modules() if isinstance(module, CLIP) for p in module.parameters()}
    names = [n for n, p in inner.named_parameters() if p.requires_grad and id(p) not in backbone]
    for pattern in also_tune:
        matched = [
            n
            for n, p in inner.named_parameters()
            if fnmatch.fnmatchcase(n, pattern) and id(p) not in backbone and n not in names
        ]
        if not matched and not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(
                f"plugins.dpc.also_tune: {pattern!r} matches no prompt tensor of {inner.name}; its tensors are "
                f"{', '.join(n for n, p in inner.named_parameters() if id(p) not in backbone)[:400]}"
            )
        names.extend(matched)
    if not names:
        raise ValueError(f"dpc: {inner.name} has no tuned tensors to copy; wrap a prompt learner (coop, maple, ...)")
    order = {n: i for i, (n, _) in enumerate(inner.named_parameters())}
    return sorted(names, key=order.__getitem__)


def untuned_values(inner: PromptModel, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The initial (untuned) value of each named tensor: the learner that owns it (the innermost PromptModel
    on its path, e.g. PromptKD's teacher) built afresh with its own config. Only a value its config fixes
    (words of `ctx_init`) has one; a random initial value is refused."""
    values: dict[str, torch.Tensor] = {}
    for name in names:
        parts = name.split(".")
        split = max(i for i in range(len(parts)) if isinstance(inner.get_submodule(".".join(parts[:i])), PromptModel))
        owner: PromptModel = inner.get_submodule(".".join(parts[:split]))  # type: ignore[assignment]
        fresh = [_rebuilt(owner, seed).get_parameter(".".join(parts[split:])).detach() for seed in (0, 1)]
        if not torch.equal(fresh[0], fresh[1]):
            raise ConfigError(
                f"plugins.dpc.compat: released ranks with the untuned value of {name}, but {owner.name} starts it "
                "at random; give it initial words (ctx_init) or set compat to default"
            )
        values[name] = fresh[0]
    return values


def _rebuilt(learner: PromptModel, seed: int) -> PromptModel:
    """A new learner of `learner`'s class and config on its CLIP, built under `seed` without touching the
    global random state."""
    device = learner.clip.token_embedding.weight.device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return type(learner)(learner.clip, learner.classnames, learner.cfg, learner.template)


def stage1_prompt_folder(path: Path) -> Path:
    """A saved prompt folder, given either itself or a run folder holding `prompt/`."""
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / PROMPT_DIR / CONFIG_FILE).is_file():
        return path / PROMPT_DIR
    raise ConfigError(
        f"{path}: no stage-1 prompt here (expected {CONFIG_FILE} in it or in its prompt/ folder); run stage 1 "
        "first or set plugins.dpc.stage1_prompt to a saved prompt"
    )


def load_stage1_prompt(inner: PromptModel, path: Path) -> None:
    """Load a saved stage-1 prompt into `inner`, which must be the same method with the same config on the
    same backbone."""
    folder = stage1_prompt_folder(path)
    meta = read_prompt_config(folder)
    check_backbone(meta, inner.clip, folder)
    wanted = inner.describe()
    saved_method, saved_plugins = str(meta.get("method")), list(meta.get("plugins") or {})
    if saved_method != wanted["method"] or saved_plugins != list(wanted["plugins"]):
        saved_name = "+".join([saved_method, *saved_plugins])
        wanted_name = "+".join([wanted["method"], *wanted["plugins"]])
        raise ConfigError(f"{folder}: holds a {saved_name} prompt; DPC here wraps {wanted_name}")
    # Compare filled-in configs, so a field added with a default since stage 1 was saved is not a difference.
    saved_cfg = to_dict(from_dict(type(inner.cfg), meta.get("method_cfg") or {}, where="method_cfg"))
    differing = sorted(
        key for key in set(wanted["method_cfg"]) | set(saved_cfg) if saved_cfg.get(key) != wanted["method_cfg"].get(key)
    )
    if differing:
        raise ConfigError(
            f"{folder}: the stage-1 prompt was trained with other method_cfg values ({', '.join(differing)}); "
            "give stage 2 the same method_cfg as stage 1"
        )
    inner.load_trainable_state(load_file(str(folder / WEIGHTS_FILE)), source=str(folder))


def build_picture_library(
    context: PluginContext, cfg: DPCConfig, classnames: Sequence[str], clip: CLIP
) -> PictureLibrary:
    full = cfg.library == "full"
    splits = context.full_splits if full else context.splits
    if splits is None:
        where = (
            "PluginContext.full_splits (the training classes before the few-shot draw)"
            if full
            else "PluginContext.splits (the run's training data)"
        )
        raise RuntimeError(
            f"dpc: training needs a picture library for the hard negatives, built from {where}; build the "
            "learner through the runner or pass that context"
        )
    names = prompt_names(splits.classnames)
    if names != list(classnames):
        raise ValueError(
            f"dpc: the picture library's classes ({len(names)}, {splits.name}) are not the training classes "
            f"({len(classnames)}); build it from the same class subset"
        )
    source = "full train split" if cfg.library == "full" else "few-shot train"
    return PictureLibrary.from_splits(splits, clip.image_size, source=source, augmentation=context.augmentation)


def negatives_identity(run: RunConfig, name: str = "dpc") -> dict[str, Any]:
    """The negatives' pictures follow the run's augmentation; they were cropped with the field's defaults
    (8-100% of the area, flipped) whatever the run said before. Runs with other augmentation settings get a
    key of their own, so that a run recorded before is not taken for one of today; runs with the defaults,
    whose numbers did not change, keep their identities."""
    if training_augmentation(run.data) == FIELD_AUGMENTATION:
        return {}
    return {f"plugins.{name}.negatives_augmented_as": "data"}


def stage1_plan(cfg: RunConfig, name: str = "dpc") -> StagePlan | None:
    """The stage-1 run of `cfg` (a run config whose plug-ins include `name`): the run of the stack below this
    plug-in with the same method config, or None when `stage1_prompt` names a saved prompt to start from."""
    dpc: DPCConfig = cfg.plugins[name]
    if dpc.stage1_prompt:
        return None
    names = cfg.plugin_names
    before = names[: names.index(name)]
    method = "+".join([cfg.method_name, *before])
    current = to_dict(cfg)
    recipe: str | None = None
    if dpc.stage1_recipe:
        from promptclip.recipes import resolve_recipe

        path = resolve_recipe(dpc.stage1_recipe)
        data = load_recipe(path)
        if data.get("method", method) != method:
            raise ConfigError(
                f"plugins.{name}.stage1_recipe: {path} is a {data['method']} recipe; stage 1 of {cfg.method} is "
                f"{method}"
            )
        data["method"] = method
        for key in ("model", "seed", "device", "output_dir"):
            data[key] = current[key]
        section = dict(data.get("data") or {})
        # The run's data; shots and class subset come from the run spec (a transductive stage 1 in base2new
        # keeps its recipe's shots, as a plain run of it would).
        for key in ("dataset", "root", "options", "num_workers", "eval_batch_size"):
            section[key] = current["data"][key]
        data["data"] = section
        recipe, source = path.stem, f"plugins.{name}.stage1_recipe ({path})"
    else:
        data = {**current, "method": method, "plugins": {k: current["plugins"][k] for k in before}}
        source = f"plugins.{name} (stage 1)"
    merge_overrides(data, dpc.stage1_opts)
    cfg1 = build_run_config(data, source=source)
    stage1_cfg, stage2_cfg = to_dict(cfg1.method_cfg), to_dict(cfg.method_cfg)
    differing = sorted(k for k in stage2_cfg if stage1_cfg.get(k) != stage2_cfg.get(k))
    if differing:
        raise ConfigError(
            f"{source}: stage 1 would train with other method_cfg values than stage 2 loads "
            f"({', '.join(f'{k}: {stage1_cfg.get(k)!r} vs {stage2_cfg.get(k)!r}' for k in differing)}); "
            "make the two method_cfg sections equal"
        )
    return StagePlan(cfg1, recipe)


def merge_overrides(data: dict[str, Any], overrides: Mapping[str, Any], where: str = "plugins.dpc.stage1_opts") -> None:
    """Merge `overrides` (nested mappings and/or dotted keys) into recipe data, in place."""
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, Mapping):
            child = data.setdefault(head, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: {head!r} is a value, not a section")
            merge_overrides(child, value, f"{where}.{head}")
        else:
            data[head] = value
