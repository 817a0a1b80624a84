"""The GPU paths, checked through their CPU proxies: no training step waits for the device, bf16 autocast
keeps every method's logits in fp32 and close to fp32's, the fp16 loss scaler skips a step whose gradients
overflowed, host-to-device copies do not wait, and the towers compile.

What waits for a GPU is the host reading a tensor's value (`.item()`, `.tolist()`, `int(t)`, `if t:`, ...):
on CPU nothing waits, but the same calls are made, so `HostReads` counts them."""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import test_methods_common as common
import torch
import torch.utils._pytree as pytree
from test_methods_common import CASES, IDS, Case, make_batch
from torch.utils._python_dispatch import TorchDispatchMode

from promptclip.clip import tokenizer
from promptclip.clip.model import CLIP
from promptclip.config import OptimConfig
from promptclip.engine import train as train_module
from promptclip.engine.distributed import DataParallel
from promptclip.engine.evaluate import compute_dtype, copies_without_waiting, move_batch, store_frozen_towers
from promptclip.engine.train import Trainer, grad_scaler
from promptclip.methods.base import PromptModel

# The common checker's fixtures: the learner of a case on its shared tiny CLIP.
clip_of = common.clip_of
build = common.build

# Calls that read a tensor's value on the host: on a GPU each waits for every kernel queued before it.
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class HostTensor(torch.Tensor):
    """A tensor that stays on the host in a GPU run: a loader's batch and tokenised text until `.to(device)`,
    and whatever is computed from such tensors alone. Reading it waits for nothing."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        stays = all(isinstance(t, HostTensor) for t in inputs) and not moves_to_device(func, args, kwargs)
        return pytree.tree_map_only(
            torch.Tensor, lambda t: t.as_subclass(HostTensor if stays else torch.Tensor), result
        )


def moves_to_device(func: Any, args: Any, kwargs: Any) -> bool:
    """`tensor.to(device, ...)`: from here on the tensor lives on the training device."""
    if func is not torch.Tensor.to:
        return False
    return "device" in kwargs or any(isinstance(a, torch.device | str) for a in args[1:])


def on_host(value: Any) -> Any:
    """A loader's batch (or token ids) as the host holds them before they are moved."""
    if isinstance(value, dict):
        return {key: on_host(item) for key, item in value.items()}
    return value.as_subclass(HostTensor) if isinstance(value, torch.Tensor) else value


class HostReads:
    """Counts host reads of values of tensors that live on the training device, each with the line of
    promptclip that made it, per window (`open_window`, e.g. at each training step). Batches and token ids
    are `HostTensor`s until moved, as in a GPU run, so reading them is not counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.windows: list[list[str]] = [[]]
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), name))
        tokenize = tokenizer.tokenize
        for module in [m for name, m in sys.modules.items() if name.startswith("promptclip.")]:
            if getattr(module, "tokenize", None) is tokenize:
                monkeypatch.setattr(module, "tokenize", lambda *a, **k: on_host(tokenize(*a, **k)))

    def _counted(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(tensor, HostTensor):
                self.windows[-1].append(f"{name} at {caller()}")
            return original(tensor, *args, **kwargs)

        return read

    def open_window(self, *_: object) -> None:
        self.windows.append([])


def caller() -> str:
    """The innermost promptclip frame outside this file (where a read was made)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "promptclip" in frame.filename and not frame.filename.endswith("test_gpu_paths.py"):
            return f"{Path(frame.filename).name}:{frame.lineno} ({frame.line})"
    return "outside promptclip"


def optim(epochs: int = 2) -> OptimConfig:
    return OptimConfig(lr=0.01, epochs=epochs, warmup_epochs=0)


# ---------------------------------------------------------------------------------------------------------
# No step waits for the device
# ---------------------------------------------------------------------------------------------------------

# Zero-shot learners have nothing to train. DPC reads its ranking of hard negatives back once per step by
# design (`hard_negatives.select_negatives`: the negatives' pictures are chosen on the host).
STEP_CASES = [case for case in CASES if case.method != "zeroshot" and "dpc" not in case.method]
BATCHES_PER_EPOCH = 4


@pytest.mark.parametrize("case", STEP_CASES, ids=[c.name for c in STEP_CASES])
def test_training_steps_read_nothing_back_between_logging_points(
    build, case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    learner = build(case)
    batches = [on_host(make_batch(learner.clip, seed=i)) for i in range(BATCHES_PER_EPOCH)]
    trainer = Trainer(learner, batches, optim(epochs=2), progress=False, log_every=100)
    reads = HostReads(monkeypatch)
    learner.register_forward_pre_hook(reads.open_window)  # one window per step: forward, loss, backward, step
    trainer.fit()
    steps = reads.windows[1:]
    assert len(steps) == 2 * BATCHES_PER_EPOCH
    # The first step builds what is cached (class prompts); the last step of an epoch holds the epoch's reads.
    checked = [i for i in range(1, len(steps)) if (i + 1) % BATCHES_PER_EPOCH]
    waiting = {f"step {i}": steps[i] for i in checked if steps[i]}
    assert not waiting, f"training steps read values back from the device: {waiting}"
    assert steps[BATCHES_PER_EPOCH - 1], "the epoch's losses must be read at its end (is HostReads counting?)"


def test_losses_are_read_at_each_logging_point(tiny_clip, monkeypatch: pytest.MonkeyPatch) -> None:
    from promptclip.methods.coop import CoOp, CoOpConfig

    learner = CoOp(tiny_clip, ["cat", "dog", "tree", "car"], CoOpConfig(n_ctx=2))
    batches = [on_host(make_batch(tiny_clip, seed=i)) for i in range(6)]
    trainer = Trainer(learner, batches, optim(epochs=1), progress=False, log_every=2)
    reads = HostReads(monkeypatch)
    learner.register_forward_pre_hook(reads.open_window)
    trainer.fit()
    steps = reads.windows[1:]
    tolist_reads = [sum("tolist" in read for read in step) for step in steps]
    assert tolist_reads[1:5] == [1, 0, 1, 0]  # after batches 2 and 4: one read of every term at once
    assert trainer.epoch == 1 and trainer.global_step == 6


def test_a_later_failure_is_reported_as_the_non_finite_loss_before_it(tiny_clip) -> None:
    from promptclip.engine.train import NonFiniteLossError
    from promptclip.methods.coop import CoOp, CoOpConfig

    learner = CoOp(tiny_clip, ["cat", "dog", "tree", "car"], CoOpConfig(n_ctx=2))
    batches = [on_host(make_batch(tiny_clip, seed=i)) for i in range(4)]
    batches[1]["image"] = torch.full_like(batches[1]["image"], float("nan"))
    forward = learner.forward
    calls = iter(range(4))

    def fail_on_third_batch(batch: dict[str, Any]) -> Any:
        if next(calls) == 2:  # e.g. an index computed from NaN features
            raise RuntimeError("a consequence of the NaN")
        return forward(batch)

    learner.forward = fail_on_third_batch  # type: ignore[method-assign]
    trainer = Trainer(learner, batches, optim(epochs=1), progress=False, log_every=100)
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit()
    assert (caught.value.epoch, caught.value.batch_index, caught.value.step) == (0, 1, 1)
    assert caught.value.paths == batches[1]["path"]


class FakeTwoRanks(DataParallel):
    """Rank 0 of two, without processes: the other rank's contribution to each all-reduce is `other(t)`."""

    def __init__(self, other: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
        self.other = other

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cpu")

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.add_(self.other(tensor))


def params_with_grads(*grads: torch.Tensor | None) -> list[torch.nn.Parameter]:
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.zeros(2))
        param.grad = grad
        params.append(param)
    return params


def test_averaging_gradients_reads_nothing_when_every_parameter_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    params = params_with_grads(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 6.0]))
    group = FakeTwoRanks(lambda t: t.clone())  # the other rank has the same gradients
    reads = HostReads(monkeypatch)
    group.average_gradients(params)
    assert reads.windows == [[]]
    assert params[0].grad.tolist() == [1.0, 2.0] and params[1].grad.tolist() == [4.0, 6.0]


def test_a_parameter_without_gradient_here_takes_the_other_ranks_average(monkeypatch: pytest.MonkeyPatch) -> None:
    # Layout of the reduced vector: 3 flags, then 2 values per parameter. The other rank has gradients for
    # parameters 0 and 1 (2 and 8 everywhere), none for parameter 2; this rank has one for parameter 0 only.
    other = torch.tensor([1.0, 1.0, 0.0, 2.0, 2.0, 8.0, 8.0, 0.0, 0.0], dtype=torch.float64)
    params = params_with_grads(torch.tensor([4.0, 4.0]), None, None)
    reads = HostReads(monkeypatch)
    FakeTwoRanks(lambda t: other).average_gradients(params)
    assert len(reads.windows[0]) == 1, reads.windows  # the flags of the two missing gradients, read at once
    assert params[0].grad.tolist() == [3.0, 3.0]  # (4 + 2) / 2
    assert params[1].grad.tolist() == [4.0, 4.0]  # (0 + 8) / 2: a gradient on some rank counts zeros elsewhere
    assert params[2].grad is None  # no gradient on any rank: none, as in a one-process step


# ---------------------------------------------------------------------------------------------------------
# bf16 autocast (CPU proxy of the CUDA autocast path)
# ---------------------------------------------------------------------------------------------------------

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. Under autocast every matmul rounds both operands and
# its output to bf16 (accumulating in fp32): a tiny tower has 10 matmuls (2 blocks of 4, the embedding and the
# projection), so about 30 roundings along any path. The rounding errors are independent, of mean 0 and
# standard deviation u / sqrt(3) each, so a tower's relative error has a standard deviation of sqrt(30 / 3) u
# and the pair of towers behind a cosine sqrt(2 x 30 / 3) u. A logit is scale x cos(image, text), with
# |d cos| <= |d image| + |d text| for unit vectors: 4 standard deviations bound every logit of the suite.
BF16_UNIT = 2.0**-8
ROUNDINGS_PER_TOWER = 30
LOGIT_TOLERANCE = 4 * math.sqrt(2 * ROUNDINGS_PER_TOWER / 3) * BF16_UNIT  # times the logit scale


def autocast_bf16() -> torch.autocast:
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def eval_logits(learner: PromptModel, batch: dict[str, Any], bf16: bool) -> torch.Tensor:
    learner.eval()
    with torch.no_grad(), autocast_bf16() if bf16 else torch.autocast("cpu", enabled=False):
        return learner(batch).logits


def test_autocast_runs_the_towers_in_bf16_on_cpu(tiny_clip) -> None:
    images = make_batch(tiny_clip)["image"]
    with torch.no_grad(), autocast_bf16():
        assert tiny_clip.encode_image(images).dtype == torch.bfloat16  # so the checks below compare bf16 with fp32


def logits_bound(learner: PromptModel) -> float:
    return LOGIT_TOLERANCE * float(learner.logit_scale)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_autocast_evaluation_gives_fp32_logits_close_to_fp32s(build, case: Case) -> None:
    learner = build(case)
    batch = make_batch(learner.clip)
    reference = eval_logits(learner, batch, bf16=False)
    mixed = eval_logits(learner, batch, bf16=True)
    assert mixed.dtype == torch.float32, f"{case.name}: logits are {mixed.dtype} under autocast"
    assert (mixed - reference).abs().max() <= logits_bound(learner)


def training_step(learner: PromptModel, batch: dict[str, Any], bf16: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """The logits of one training step (forward and loss under autocast when `bf16`) and its gradients."""
    learner.train()
    with autocast_bf16() if bf16 else torch.autocast("cpu", enabled=False):
        output = learner(batch)
        terms = learner.loss(batch, output)
    loss = torch.stack([value.float() for value in terms.values()]).sum()
    assert torch.isfinite(loss), f"loss {loss}"
    params = learner.trainable_parameters()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True) if params else ()
    return output.logits, dict(zip(params, grads, strict=True))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_bf16_training_step_gives_fp32_logits_close_to_fp32s_and_finite_gradients(build, case: Case) -> None:
    batch = make_batch(build(case).clip)
    reference_logits, reference_grads = training_step(build(case), batch, bf16=False)
    learner = build(case)
    logits, grads = training_step(learner, batch, bf16=True)
    assert logits.dtype == torch.float32, f"{case.name}: training logits are {logits.dtype} under autocast"
    assert (logits - reference_logits).abs().max() <= logits_bound(learner)
    reached = {name for name, grad in grads.items() if grad is not None}
    assert reached == {name for name, grad in reference_grads.items() if grad is not None}
    for name in reached:
        assert grads[name].dtype == torch.float32 and torch.isfinite(grads[name]).all(), name


# ---------------------------------------------------------------------------------------------------------
# fp16: the loss scaler
# ---------------------------------------------------------------------------------------------------------


def test_a_loss_scaler_is_made_for_fp16_on_cuda_only() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():
        assert isinstance(grad_scaler(cuda, "fp16"), torch.amp.GradScaler)
    assert grad_scaler(cuda, "bf16") is None and grad_scaler(cuda, "fp32") is None
    assert grad_scaler(cpu, "fp16") is None


def nullcontext() -> Any:
    import contextlib

    return contextlib.nullcontext()


def test_the_scaler_skips_a_step_whose_gradients_overflowed(tiny_clip, monkeypatch: pytest.MonkeyPatch) -> None:
    from promptclip.methods.coop import CoOp, CoOpConfig

    torch.manual_seed(0)
    learner = CoOp(tiny_clip, ["cat", "dog", "tree", "car"], CoOpConfig(n_ctx=2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    monkeypatch.setattr(train_module, "grad_scaler", lambda device, precision: scaler)
    batches = [make_batch(tiny_clip, seed=i) for i in range(3)]
    trainer = Trainer(learner, batches, OptimConfig(lr=0.01, epochs=1, warmup_epochs=0, max_grad_norm=1.0))
    contexts: list[torch.Tensor] = []
    steps = iter(range(3))

    def overflow_second_step(grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf") if next(steps) == 1 else grad  # an fp16 overflow in step 2's backward

    learner.ctx.register_hook(overflow_second_step)
    original_step = trainer._optimizer_step

    def step_and_record() -> None:
        original_step()
        contexts.append(learner.ctx.detach().clone())

    trainer._optimizer_step = step_and_record  # type: ignore[method-assign]
    before = learner.ctx.detach().clone()
    trainer.fit()
    assert not torch.equal(contexts[0], before), "the first step must update the context"
    assert torch.equal(contexts[1], contexts[0]), "the overflowed step must be skipped"
    assert not torch.equal(contexts[2], contexts[1]), "training resumes after the skipped step"
    assert scaler.get_scale() == 2.0**9  # halved once, by the overflow
    assert torch.isfinite(learner.ctx).all()


# ---------------------------------------------------------------------------------------------------------
# Frozen towers stored in the compute dtype
# ---------------------------------------------------------------------------------------------------------


def test_frozen_towers_are_stored_in_the_compute_dtype_only_when_a_gpu_autocasts() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compute_dtype(cuda, "bf16") is torch.bfloat16 and compute_dtype(cuda, "fp16") is torch.float16
    assert compute_dtype(cuda, "fp32") is None and compute_dtype(cpu, "bf16") is None


def tower_features(clip: CLIP, images: torch.Tensor, tokens: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    with torch.no_grad(), autocast_bf16() if bf16 else torch.autocast("cpu", enabled=False):
        return [clip.encode_image(images).float(), clip.encode_text(tokens).float()]


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_towers_stored_in_bf16_give_autocasts_features(tiny_clips, arch: str) -> None:
    clip = tiny_clips(arch, 0)
    stored = tiny_clips.fresh(arch, 0)
    assert stored.store_matmul_weights(torch.bfloat16) == len(stored.matmul_weights())
    images = make_batch(clip)["image"]
    tokens = tokenizer.tokenize(["a photo of a cat.", "a golden retriever."])
    # Under autocast: the very same numbers, since autocast rounds each weight to bf16 at every call anyway.
    for mine, reference in zip(
        tower_features(stored, images, tokens, bf16=True), tower_features(clip, images, tokens, bf16=True), strict=True
    ):
        assert torch.equal(mine, reference)
    # Outside autocast the towers still compute in fp32, from weights rounded once to bf16 (2^-8 relative):
    # the features move by at most the tolerance of the logits above (per unit of logit scale).
    for mine, reference in zip(
        tower_features(stored, images, tokens, bf16=False),
        tower_features(clip, images, tokens, bf16=False),
        strict=True,
    ):
        assert mine.dtype == torch.float32
        change = (normalized(mine) - normalized(reference)).norm(dim=-1).max()
        assert 0 < change <= LOGIT_TOLERANCE
    kept = {name: p.dtype for name, p in stored.named_parameters() if p.dtype != torch.bfloat16}
    assert "logit_scale" in kept and "token_embedding.weight" in kept and "ln_final.weight" in kept
    assert set(kept.values()) == {torch.float32}


class Casts(TorchDispatchMode):
    """Counts the dtype conversions the dispatcher runs (autocast's casts among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._to_copy.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_autocast_casts_none_of_the_stored_weights(tiny_clips, arch: str) -> None:
    clip, stored = tiny_clips(arch, 0), tiny_clips.fresh(arch, 0)
    stored.store_matmul_weights(torch.bfloat16)
    images = make_batch(clip)["image"]
    casts = []
    for model in (clip, stored):
        with torch.no_grad(), autocast_bf16(), Casts() as counted:
            model.encode_image(images)
        casts.append(counted.count)
    image_tower = {id(p) for p in stored.visual.parameters()}
    saved = sum(id(p) in image_tower for p in stored.matmul_weights())
    assert casts[0] - casts[1] == saved  # one cast per weight per call, no longer made


def normalized(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features, dim=-1)


@pytest.mark.parametrize("name", ["coop-end", "cocoop", "maple", "ivlp", "promptkd", "coop+dapt-g"])
def test_a_learner_on_stored_towers_trains_as_under_autocast(build, tiny_clips, name: str) -> None:
    case = CASES[IDS.index(name)]
    clip = tiny_clips.fresh(case.arch, 1234)
    reference = build(case)
    learner = build(case, clip=clip)
    assert store_frozen_towers(learner, torch.device("cuda"), "bf16") > 0  # what a CUDA bf16 run does first
    assert store_frozen_towers(learner, torch.device("cpu"), "bf16") == 0  # and a CPU run never does
    assert all(p.dtype == torch.float32 for p in learner.trainable_parameters().values())
    batch = make_batch(clip)
    logits, grads = training_step(learner, batch, bf16=True)
    reference_logits, reference_grads = training_step(reference, batch, bf16=True)
    assert torch.equal(logits, reference_logits)
    for key, grad in grads.items():
        assert (grad is None) == (reference_grads[key] is None), key
        assert grad is None or torch.equal(grad, reference_grads[key]), key


def test_a_clip_with_trained_matmul_weights_is_never_stored_lower(tiny_clips) -> None:
    clip = tiny_clips.fresh("tiny-vit", 0)
    clip.text_projection.requires_grad_(True)
    with pytest.raises(ValueError, match="trained"):
        clip.store_matmul_weights(torch.bfloat16)
    learner = SimpleNamespace(modules=lambda: iter([clip]))
    assert store_frozen_towers(learner, torch.device("cuda"), "bf16") == 0  # type: ignore[arg-type]
    assert clip.text_projection.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# Host-to-device copies
# ---------------------------------------------------------------------------------------------------------


def on(device: str) -> Any:
    """Something with a `device`, standing in for a tensor on a device this machine may lack."""
    return SimpleNamespace(device=torch.device(device))


def test_only_host_to_gpu_copies_are_queued_without_waiting() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert copies_without_waiting(torch.zeros(2), cuda)
    assert not copies_without_waiting(torch.zeros(2), cpu)
    assert not copies_without_waiting(on("cuda"), cpu)  # to the host: its values are read right after
    assert not copies_without_waiting(on("cuda"), cuda)


def test_batches_move_to_a_gpu_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[torch.device, bool]] = []

    def record_to(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
        calls.append((device, non_blocking))
        return tensor

    monkeypatch.setattr(torch.Tensor, "to", record_to)
    batch = {"image": torch.zeros(2, 3), "label": torch.zeros(2), "path": ["a", "b"]}
    moved = move_batch(batch, torch.device("cuda"))
    assert calls == [(torch.device("cuda"), True)] * 2 and moved["path"] == ["a", "b"]
    calls.clear()
    move_batch(batch, torch.device("cpu"))
    assert calls == [(torch.device("cpu"), False)] * 2


# ---------------------------------------------------------------------------------------------------------
# torch.compile of the towers
# ---------------------------------------------------------------------------------------------------------


def compiles_here() -> str | None:
    """Why torch cannot compile on this machine, or None when it can."""
    import shutil

    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("g++") is None:
        return "inductor needs a C++ compiler for CPU kernels and none is installed"
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)  # inductor compiles 4 graphs (2 towers, forward and backward): minutes on a busy CPU
@pytest.mark.skipif(compiles_here() is not None, reason=str(compiles_here()))
def test_compiled_towers_give_the_eager_features_and_gradients_in_one_graph(tiny_clip) -> None:
    from promptclip.methods.prompting import assemble_prompts, build_prompt_parts

    clip = tiny_clip
    parts = build_prompt_parts(clip, ["cat", "golden retriever", "tree"], n_ctx=2)
    generator = torch.Generator().manual_seed(0)
    text_ctx = (0.02 * torch.randn(2, clip.transformer.width, generator=generator)).requires_grad_(True)
    width = clip.config.vision.width
    vision_ctx = (0.02 * torch.randn(2, width, generator=generator)).requires_grad_(True)
    deep = [None, (0.02 * torch.randn(2, width, generator=generator)).requires_grad_(True)]
    images = make_batch(clip)["image"]

    def text(ctx: torch.Tensor) -> torch.Tensor:
        return clip.encode_text_embeddings(assemble_prompts(parts, ctx), parts.eot_index, text_length=parts.length)

    def image(ctx: torch.Tensor, layer1: torch.Tensor) -> torch.Tensor:
        return clip.encode_image(images, ctx, [None, layer1])

    # fullgraph: each tower is one graph; a host read (e.g. int(eot_index.max())) would break it and fail here.
    compiled_text = torch.compile(text, fullgraph=True, dynamic=False)
    compiled_image = torch.compile(image, fullgraph=True, dynamic=False)
    # Inductor fuses and reorders fp32 sums: agreement to a few float32 ulps of the values' scale.
    close = {"rtol": 1e-4, "atol": 1e-5}
    for eager_fn, fused_fn, inputs in (
        (text, compiled_text, [text_ctx]),
        (image, compiled_image, [vision_ctx, deep[1]]),
    ):
        eager = eager_fn(*inputs)
        eager_grads = torch.autograd.grad(eager.square().sum(), inputs)
        fused = fused_fn(*inputs)
        fused_grads = torch.autograd.grad(fused.square().sum(), inputs)
        assert torch.allclose(fused, eager, **close)
        for fused_grad, eager_grad in zip(fused_grads, eager_grads, strict=True):
            assert torch.allclose(fused_grad, eager_grad, **close)


# ---------------------------------------------------------------------------------------------------------
# model.compile: the towers compiled while training
# ---------------------------------------------------------------------------------------------------------

COMPILED_CASES = [case for case in CASES if case.name in {"coop-end", "cocoop", "maple+dapt-s", "coop+dpc", "promptkd"}]


class CapturingBackend:
    """A torch.compile backend that keeps every graph dynamo captures and runs it as traced (the same
    operators in the same order, no fused kernels): the engine's wiring is checked without a C++ toolchain."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs.append(graph)
        return graph.forward


@pytest.fixture
def fresh_dynamo() -> Any:
    torch._dynamo.reset()  # no graph of another test (same Transformer.forward code) is reused
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", COMPILED_CASES, ids=[case.name for case in COMPILED_CASES])
def test_training_with_compiled_towers_captures_each_tower_once_and_keeps_the_eager_numbers(
    build, case: Case, monkeypatch: pytest.MonkeyPatch, fresh_dynamo: Any
) -> None:
    from promptclip.engine import compiling
    from promptclip.engine.compiling import towers

    backend = CapturingBackend()
    monkeypatch.setattr(compiling, "DEFAULT_BACKEND", backend)
    batches = [make_batch(build(case).clip, seed=i) for i in range(3)]
    eager, compiled = build(case, seed=5), build(case, seed=5)
    Trainer(eager, batches, optim(epochs=2), progress=False).fit()
    trainer = Trainer(compiled, batches, optim(epochs=2), progress=False, compile_mode="default")
    graphs_per_epoch: list[int] = []
    run_epoch = trainer._run_epoch

    def counted_epoch(epoch: int) -> dict[str, Any]:
        record = run_epoch(epoch)
        graphs_per_epoch.append(len(backend.graphs))
        return record

    monkeypatch.setattr(trainer, "_run_epoch", counted_epoch)
    trainer.fit()
    assert graphs_per_epoch[0] > 0, "no tower ran compiled while training"
    assert graphs_per_epoch[1] == graphs_per_epoch[0], "steps of the same shapes captured their towers again"
    # The captured graphs run the eager operators in the eager order: the same numbers bit for bit.
    for name, value in eager.trainable_state().items():
        assert torch.equal(compiled.trainable_state()[name], value), name
    assert all("forward" not in tower.__dict__ for tower in towers(compiled)), "a tower kept its compiled forward"
    before = len(backend.graphs)
    compiled.eval()
    with torch.no_grad():
        compiled.image_features(batches[0]["image"])
    assert len(backend.graphs) == before, "evaluation must run the eager towers"


def test_reduce_overhead_hands_out_copies_of_the_graph_outputs_and_keeps_the_numbers(
    build, monkeypatch: pytest.MonkeyPatch, fresh_dynamo: Any
) -> None:
    from promptclip.engine import compiling
    from promptclip.engine.compiling import CompiledTowers

    case = next(case for case in CASES if case.name == "coop-end")
    monkeypatch.setattr(compiling, "DEFAULT_BACKEND", CapturingBackend())
    batches = [make_batch(build(case).clip, seed=i) for i in range(2)]
    eager, compiled = build(case, seed=5), build(case, seed=5)
    Trainer(eager, batches, optim(epochs=1), progress=False).fit()
    Trainer(compiled, batches, optim(epochs=1), progress=False, compile_mode="reduce-overhead").fit()
    for name, value in eager.trainable_state().items():
        assert torch.equal(compiled.trainable_state()[name], value), name
    # A CUDA graph's outputs are overwritten by its next replay: a kept output must be a copy of its own.
    towers = CompiledTowers(compiled, "reduce-overhead")
    images = batches[0]["image"]
    with towers.installed(), torch.no_grad():
        first = compiled.clip.visual(images)
        second = compiled.clip.visual(images)
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, second)


def test_an_unknown_compile_mode_is_refused_with_the_modes(build) -> None:
    from promptclip.config import ConfigError, load_run_config
    from promptclip.engine.compiling import CompiledTowers

    with pytest.raises(ValueError, match=r"model\.compile must be one of off, default, reduce-overhead"):
        CompiledTowers(build(CASES[2]), "fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"model\.compile"):
        load_run_config(None, ["model.compile", "fast"])


@pytest.mark.slow
@pytest.mark.timeout(3600)  # inductor compiles the towers' forward and backward graphs: minutes on a busy CPU
@pytest.mark.skipif(compiles_here() is not None, reason=str(compiles_here()))
def test_training_with_inductor_compiled_towers_follows_the_eager_run(build, fresh_dynamo: Any) -> None:
    case = next(case for case in CASES if case.name == "maple")
    batches = [make_batch(build(case).clip, seed=i) for i in range(3)]
    eager, compiled = build(case, seed=5), build(case, seed=5)
    Trainer(eager, batches, optim(epochs=1), progress=False).fit()
    Trainer(compiled, batches, optim(epochs=1), progress=False, compile_mode="default").fit()
    # Inductor fuses and reorders fp32 sums; three SGD steps at lr 0.01 carry those ulps into the prompts.
    for name, value in eager.trainable_state().items():
        assert torch.allclose(compiled.trainable_state()[name], value, rtol=1e-4, atol=1e-5), name
