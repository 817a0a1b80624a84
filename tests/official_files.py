"""Files as the original trainers write them: Dassl's `model.pth.tar-N` around the state dict of each trainer's
model, with that trainer's key names, shapes and dtypes, built from a promptclip learner's tensors.

Key layouts, read from the trainers' code: MaPLe and DAPT register the whole CustomCLIP
(`prompt_learner.{ctx, proj, compound_prompts_text.i, compound_prompt_projections.i}`, `image_encoder.*`,
`text_encoder.*`, `logit_scale`; `proj` and `ctx` in fp16); IVLP, PromptSRC and the PromptKD student keep the
prompts in the encoders (`image_encoder.VPT`, `{image,text}_encoder.transformer.resblocks.j.VPT_shallow`) and the
layer-0 text context in `prompt_learner.ctx`; PromptSRC also holds a frozen `prompt_learner.ZS_image_encoder`;
the PromptKD student holds `VPT_image_trans.conv1.{0,1,3}` and no text encoder; DPC's StackSPLE_CoOp registers
its prompt learner (`ctx`, theta) and StackSPLE_PromptKD the student with the teacher's text encoder inside its
prompt learner (`prompt_learner.ctx`, `[prompt_learner.]text_encoder.transformer.resblocks.j.VPT_shallow`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from promptclip.clip.model import CLIP
from promptclip.methods.ivlp import TowerPrompts, context_prompt_parts
from promptclip.methods.maple import MaPLe
from promptclip.methods.promptkd import PromptKD


class ConstantWarmup(LRScheduler):
    """Mirrors the original trainers' warm-up scheduler, whose state dict holds its successor object."""

    def __init__(self, optimizer: torch.optim.Optimizer, successor: LRScheduler, cons_lr: float) -> None:
        self.successor = successor
        self.warmup_epoch = 1
        self.cons_lr = cons_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.cons_lr for _ in self.base_lrs]


def write_dassl_file(path: Path, state_dict: dict[str, torch.Tensor], epoch: int = 10, objects: bool = False) -> Path:
    """A `model.pth.tar-N` as the original trainers write it; with `objects`, the scheduler entry pickles the
    successor scheduler and the optimizer, as theirs does."""
    params = [torch.nn.Parameter(t.clone().float()) for t in state_dict.values() if t.is_floating_point()][:4]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    warmup = ConstantWarmup(optimizer, CosineAnnealingLR(optimizer, float(epoch)), 1e-5)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    warmup.step()
    scheduler: dict[str, Any] = {"last_epoch": epoch}
    if objects:
        scheduler = warmup.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "state_dict": state_dict,
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler,
        "val_result": None,
    }
    torch.save(content, path)
    return path


# -- the frozen parts and the class-name buffers -------------------------------------------------------------------
def frozen_image_encoder(clip: CLIP, prefix: str = "image_encoder.") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.half() for k, v in clip.visual.state_dict().items()}


def frozen_text_encoder(clip: CLIP, prefix: str = "text_encoder.") -> dict[str, torch.Tensor]:
    parts = {
        **{f"transformer.{k}": v for k, v in clip.transformer.state_dict().items()},
        "positional_embedding": clip.positional_embedding,
        "ln_final.weight": clip.ln_final.weight,
        "ln_final.bias": clip.ln_final.bias,
        "text_projection": clip.text_projection,
    }
    return {f"{prefix}{k}": v.detach().half() for k, v in parts.items()}


def class_buffers(clip: CLIP, classnames: list[str], n_ctx: int, ctx_init: str) -> dict[str, torch.Tensor]:
    """`prompt_learner.token_prefix` / `token_suffix`: the embeddings of the training prompts around the context,
    stored in fp16 as the trainers keep CLIP."""
    parts = context_prompt_parts(clip, classnames, n_ctx, ctx_init)
    return {"prompt_learner.token_prefix": parts.prefix.half(), "prompt_learner.token_suffix": parts.suffix.half()}


def randomised(learner: torch.nn.Module, seed: int = 1) -> None:
    """Every trainable tensor moved away from its start (and BatchNorm statistics set), so a misplaced one
    shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in learner.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
        for name, buffer in learner.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(40)


# -- the prompt tensors, under the original names ------------------------------------------------------------------
def maple_prompts(learner: MaPLe) -> dict[str, torch.Tensor]:
    assert learner.text is not None
    state = {
        "prompt_learner.ctx": learner.text.ctx.detach().half(),
        "prompt_learner.proj.weight": learner.couplings[0].weight.detach().half(),
        "prompt_learner.proj.bias": learner.couplings[0].bias.detach().half(),
    }
    for layer in range(1, learner.text.depth):
        state[f"prompt_learner.compound_prompts_text.{layer - 1}"] = learner.text.deep[str(layer)].detach().clone()
        for part in ("weight", "bias"):
            value = getattr(learner.couplings[layer], part).detach().clone()
            state[f"prompt_learner.compound_prompt_projections.{layer - 1}.{part}"] = value
    return state


def tower_prompts(tower: TowerPrompts | None, encoder: str, first: str) -> dict[str, torch.Tensor]:
    """One tower's prompts as IVLP keeps them: layer 0 under `first`, layer j in resblock j's `VPT_shallow`."""
    if tower is None:
        return {}
    state = {first: tower.ctx.detach().half()}
    for layer in range(1, tower.depth):
        state[f"{encoder}.transformer.resblocks.{layer}.VPT_shallow"] = tower.deep[str(layer)].detach().clone()
    return state


def projector_state(learner: PromptKD) -> dict[str, torch.Tensor]:
    """`VPT_image_trans.conv1` = Sequential(Conv2d, BatchNorm2d, ReLU, Conv2d), in fp16 (convert_weights)."""
    projector, state = learner.projector, {}
    for index, module in (("0", projector.conv1), ("1", projector.bn), ("3", projector.conv2)):
        for name, value in module.state_dict().items():
            key = f"VPT_image_trans.conv1.{index}.{name}"
            state[key] = value.detach().clone() if name == "num_batches_tracked" else value.detach().half()
    return state


# -- whole state dicts ---------------------------------------------------------------------------------------------
def maple_file(learner: MaPLe, train_classes: list[str], path: Path, ctx_init: str = "a photo of a") -> Path:
    """What MaPLe (and DAPT) save: the whole CustomCLIP."""
    clip = learner.clip
    state = {
        **maple_prompts(learner),
        **class_buffers(clip, train_classes, learner.layout.n_ctx_text, ctx_init),
        **frozen_image_encoder(clip),
        **frozen_text_encoder(clip),
        "logit_scale": clip.logit_scale.detach().half(),
    }
    return write_dassl_file(path, state, objects=True)


def ivlp_state(learner: Any, train_classes: list[str], ctx_init: str = "a photo of a") -> dict[str, torch.Tensor]:
    """What the IVLP, VPT and PromptSRC trainers save (VPT: no text prompts, no prompt learner)."""
    clip = learner.clip
    text = learner.text
    state = {
        **frozen_image_encoder(clip),
        **frozen_text_encoder(clip),
        "logit_scale": clip.logit_scale.detach().half(),
        **tower_prompts(learner.vision, "image_encoder", "image_encoder.VPT"),
    }
    if text is not None:
        state.update(tower_prompts(text, "text_encoder", "prompt_learner.ctx"))
        state.update(class_buffers(clip, train_classes, text.n_ctx, ctx_init))
    return state


def promptkd_student_state(learner: PromptKD) -> dict[str, torch.Tensor]:
    """What PromptKD saves: the student CustomCLIP (image encoder, projector, logit scale; no text side)."""
    return {
        **frozen_image_encoder(learner.clip),
        **tower_prompts(learner.vision, "image_encoder", "image_encoder.VPT"),
        **projector_state(learner),
        "logit_scale": learner.clip.logit_scale.detach().half(),
    }
