"""Training and evaluation throughput and training peak memory of every method and plug-in, promptclip's
paths side by side with the naive ones (how the field's code runs them), at ViT-B/16 size.

Usage:
    python benchmarks/methods.py                                   # CPU: the reduced run (see below)
    python benchmarks/methods.py --device cuda --precision bf16    # one GPU: full depth, 50/500/1000 classes
    python benchmarks/methods.py --device cuda --compile reduce-overhead --attention flash

The naive path of every case: full 77-token text sequences, class features encoded again for every test
batch, fp32, and where a method has one, its official loop (CoCoOp: one image per text pass; DAPT: one image
pass per view; DPC: stage-1 class features encoded at every step). promptclip's path: sequences cut after the
last end-of-text token, class features encoded once per evaluation, autocast in `--precision` on a GPU, and
the batched forms. benchmarks/speed_paths.py holds the naive paths; tests/test_speed_paths.py checks that
both paths compute the same numbers.

Every case uses random weights with ViT-B/16's widths, heads, patch size and 77-token context, random
224 px images and random labels; its own two learners (one per path, same initial tensors) share the frozen
CLIP. The two paths of a case are timed in turns (naive, promptclip, naive, ...) and the medians compared.
Peak memory is measured in a fresh process per (case, path), during one training step after the state a
learner keeps for the whole run is built: on a GPU the growth of `torch.cuda.max_memory_allocated`, on a CPU
the growth of the peak resident set size (VmHWM, reset through /proc/self/clear_refs), with glibc returning
freed blocks at once.

On a CPU the defaults shrink the run to finish in minutes: 2 of the 12 layers in each tower (every width and
sequence length stays ViT-B/16's, so per-layer costs and their ratios are kept; prompt depths are capped at
2), 50 classes, training batches of 4, evaluation batches of 8, 2 timed repeats; peak memory at 1000
classes for CoOp and MaPLe only. `--layers 12 --classes 50,500,1000 ...` runs the full protocol anywhere.
Results go to BENCHMARKS.md, section `methods-<device>`; on a CPU only ratios are written, not times.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import NoisePhotos, interleaved_medians, machine_description, write_section
from speed_paths import (
    cocoop_loss_one_image_at_a_time,
    cocoop_one_image_at_a_time,
    dapt_three_passes,
    dpc_rescoring,
    forget_class_features,
    full_context,
    reencode_text_per_batch,
)

from promptclip.clip.model import CLIP
from promptclip.clip.weights import arch_config
from promptclip.data.datasets.base import DatasetSplits, Datum
from promptclip.engine.compiling import COMPILE_MODES, CompiledTowers, mark_step_begin
from promptclip.engine.evaluate import autocast_context
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.plugins.base import PluginContext, wrap_with_plugins

MIB = 2**20
CHUNK = 100  # text_chunk_size of the bounded-memory column
# CPU time: with one thread, what other processes on a loaded machine take does not count against a path.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    method_cfg: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, Any] = field(default_factory=dict)
    depth_keys: tuple[str, ...] = ()
    """Config fields holding prompt depths (capped at the backbone's layers)."""
    chunks: bool = True
    """Whether the learner encodes class prompts through text_chunk_size / text_checkpoint."""

    @property
    def kind(self) -> str:
        """Which official loop the naive path reproduces."""
        if "dapt" in self.plugins:
            return "dapt"
        if "dpc" in self.plugins:
            return "dpc"
        return "cocoop" if self.method == "cocoop" else "plain"


CASES = [
    Case("zeroshot", "zeroshot", chunks=False),
    Case("coop", "coop", {"n_ctx": 16}),
    Case("cocoop", "cocoop"),
    Case("kgcoop", "kgcoop"),
    Case("maple", "maple", {"depth": 9}, depth_keys=("depth",)),
    Case("ivlp", "ivlp", {"depth_text": 9, "depth_vision": 9}, depth_keys=("depth_text", "depth_vision")),
    Case("vpt", "vpt", {"depth": 12}, depth_keys=("depth",), chunks=False),
    Case("deep_lang", "deep_lang", {"depth": 12}, depth_keys=("depth",)),
    Case("promptsrc", "promptsrc", depth_keys=("depth_text", "depth_vision")),
    Case("promptkd", "promptkd", {"teacher_arch": ""}, depth_keys=("depth_vision",), chunks=False),
    Case("maple+dapt", "maple", {"depth": 9}, {"dapt": {"schedule": "joint"}}, depth_keys=("depth",)),
    Case("coop+dpc", "coop", {"n_ctx": 16}, {"dpc": {"omega_b": 0.2}}),
]
CASE_NAMES = [case.name for case in CASES]

WORDS_A = ("red", "small", "wild", "common", "giant", "striped", "spotted", "northern", "golden", "black", "white")
WORDS_B = ("fox", "owl", "car", "lamp", "tree", "frog", "boat", "shoe", "cake", "chair", "bridge", "guitar", "kettle")
WORDS_C = ("", "dog", "bird", "flower", "machine", "fish", "truck", "house", "beetle", "tower", "market")


def class_names(count: int) -> list[str]:
    """`count` distinct names of one to three words, like real class names."""
    names: list[str] = []
    for c in WORDS_C:
        for b in WORDS_B:
            for a in ("", *WORDS_A):
                names.append(" ".join(word for word in (a, b, c) if word))
    if count > len(names):
        raise ValueError(f"at most {len(names)} classes")
    order = np.random.default_rng(0).permutation(len(names))
    return [names[i] for i in order[:count]]


# ---------------------------------------------------------------------------------------------------------
# Building a case
# ---------------------------------------------------------------------------------------------------------


def build_clip(arch: str, layers: int | None, device: torch.device) -> CLIP:
    cfg = arch_config(arch)
    if layers is not None:
        cfg = dataclasses.replace(
            cfg,
            name=f"{cfg.name} ({layers} layers)",
            vision=dataclasses.replace(cfg.vision, layers=layers),
            text=dataclasses.replace(cfg.text, layers=layers),
        )
    torch.manual_seed(0)
    clip = CLIP(cfg).to(device).eval()
    clip.requires_grad_(False)
    return clip


def build_learner(case: Case, clip: CLIP, names: list[str], extra_cfg: dict[str, Any]) -> PromptModel:
    layers = min(clip.config.text.layers, clip.config.vision.layers)
    cfg = {**case.method_cfg, **(extra_cfg if case.chunks else {})}
    for key in case.depth_keys:
        cfg[key] = min(cfg.get(key, 9), layers)
    torch.manual_seed(1)
    learner = get_prompt_model(clip, {"method": case.method, **cfg}, names)
    if case.plugins:
        pictures = [Datum(f"train/{c}_{i}", c, n) for c, n in enumerate(names) for i in range(2)]
        splits = DatasetSplits("noise", None, names, "a photo of a {}.", pictures, [], [], reader=NoisePhotos((64, 64)))
        learner = wrap_with_plugins(learner, case.plugins, PluginContext(splits=splits, seed=1))
    return learner.to(next(clip.parameters()).device)


def make_batch(case: Case, count: int, num_classes: int, image_size: int, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(2)
    batch: dict[str, Any] = {
        "image": torch.randn(count, 3, image_size, image_size, generator=generator).to(device),
        "label": torch.randint(num_classes, (count,), generator=generator).to(device),
    }
    if case.kind == "dapt":  # a centred box of random size: the object
        mask = torch.zeros(count, 1, image_size, image_size)
        for row in range(count):
            half = int(image_size * (0.15 + 0.2 * torch.rand(1, generator=generator).item()))
            centre = image_size // 2
            mask[row, :, centre - half : centre + half, centre - half : centre + half] = 1
        batch["mask"] = mask.to(device)
    return batch


# ---------------------------------------------------------------------------------------------------------
# The two paths
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Paths:
    """One case's learners and steps: `naive` and `fast` (promptclip's)."""

    case: Case
    naive: PromptModel
    fast: PromptModel
    device: torch.device
    precision: str
    attention: str

    def __post_init__(self) -> None:
        self.optimizers = {
            "naive": make_optimizer(self.naive),
            "fast": make_optimizer(self.fast),
        }

    def train_step(self, which: str, batch: dict[str, Any]) -> None:
        learner = self.naive if which == "naive" else self.fast
        if self.device.type == "cuda":
            mark_step_begin()
        if which == "naive":
            forget_class_features(learner)
        with self._context(which):
            if which == "naive" and self.case.kind == "cocoop":
                cocoop_loss_one_image_at_a_time(learner, batch)
            else:
                output = dapt_three_passes(learner, batch) if which == "naive" and self.case.kind == "dapt" else None
                with self._autocast(which):
                    output = output if output is not None else learner(batch)
                    terms = learner.loss(batch, output)
                torch.stack([value.float() for value in terms.values()]).sum().backward()
        optimizer = self.optimizers[which]
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)

    def eval_step(self, which: str, images: torch.Tensor) -> torch.Tensor:
        learner = self.naive if which == "naive" else self.fast
        with torch.no_grad(), self._context(which):
            if which == "naive":
                if self.case.kind == "cocoop":
                    logits = cocoop_one_image_at_a_time(learner, {"image": images}).logits
                else:
                    logits = reencode_text_per_batch(learner, {"image": images})
            else:
                with self._autocast(which):
                    logits = learner({"image": images}).logits
        synchronize(self.device)
        return logits

    def seen_images_step(self, features: torch.Tensor) -> None:
        """Evaluation of images whose features a previous evaluation stored (a sweep's later runs)."""
        with torch.no_grad():
            self.fast.classify_image_features(features)
        synchronize(self.device)

    @contextlib.contextmanager
    def _context(self, which: str) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(attention_backend(self.attention))
            if which == "naive":
                stack.enter_context(full_context(self.naive.clip))
                if self.case.kind == "dpc":
                    stack.enter_context(dpc_rescoring(self.naive))
            yield

    def _autocast(self, which: str) -> contextlib.AbstractContextManager[Any]:
        precision = "fp32" if which == "naive" else self.precision
        return autocast_context(self.device, precision)


def make_optimizer(learner: PromptModel) -> torch.optim.Optimizer | None:
    params = list(learner.trainable_parameters().values())
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9) if params else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_backend(name: str) -> contextlib.AbstractContextManager[Any]:
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    return sdpa_kernel([backends[name]])


def compile_towers(clip: CLIP, mode: str, backend: str | None = None) -> CompiledTowers:
    """torch.compile the two towers' forwards (the engine's `model.compile`, here for the whole benchmark).
    `reduce-overhead` records CUDA graphs: it pays where shapes repeat (fixed batches, one class set)."""
    compiled = CompiledTowers(clip, mode, backend)  # type: ignore[arg-type]
    compiled.install()
    return compiled


def build_paths(case: Case, clip: CLIP, fast_clip: CLIP, num_classes: int, args: argparse.Namespace) -> Paths:
    names = class_names(num_classes)
    naive = build_learner(case, clip, names, {})
    fast = build_learner(case, fast_clip, names, {})
    return Paths(case, naive, fast, clip_device(clip), args.precision, args.attention)


def clip_device(clip: CLIP) -> torch.device:
    return next(clip.parameters()).device


# ---------------------------------------------------------------------------------------------------------
# Throughput
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    case: str
    classes: int
    train: dict[str, float] | None = None  # seconds per step, by path
    eval: dict[str, float] | None = None  # seconds per batch, by path
    seen: float | None = None  # seconds per batch of stored features
    max_logit_diff: float | None = None


def measure_throughput(case: Case, classes: int, clip: CLIP, fast_clip: CLIP, args: argparse.Namespace) -> Throughput:
    paths = build_paths(case, clip, fast_clip, classes, args)
    device = clip_device(clip)
    result = Throughput(case.name, classes)
    if paths.optimizers["fast"] is not None:
        batch = make_batch(case, args.batch_size, classes, clip.image_size, device)
        paths.naive.train()
        paths.fast.train()
        result.train = interleaved_medians(
            {which: functools.partial(paths.train_step, which, batch) for which in ("naive", "fast")},
            args.repeats,
            warmup=args.warmup,
            clock=CLOCKS[args.clock],
        )
    images = make_batch(case, args.eval_batch_size, classes, clip.image_size, device)["image"]
    paths.naive.eval()
    paths.fast.eval()
    naive_logits = paths.eval_step("naive", images)
    fast_logits = paths.eval_step("fast", images)
    result.max_logit_diff = float((naive_logits.float() - fast_logits.float()).abs().max())
    result.eval = interleaved_medians(
        {which: functools.partial(paths.eval_step, which, images) for which in ("naive", "fast")},
        args.repeats,
        warmup=max(0, args.warmup - 1),
        clock=CLOCKS[args.clock],
    )
    if paths.fast.cacheable_image_features:
        with torch.no_grad():
            features = paths.fast.image_features(images)
        seen = {"seen": lambda: paths.seen_images_step(features)}
        result.seen = interleaved_medians(seen, args.repeats, clock=CLOCKS[args.clock])["seen"]
    return result


# ---------------------------------------------------------------------------------------------------------
# Peak memory, in a fresh process per measurement
# ---------------------------------------------------------------------------------------------------------

MEMORY_PATHS = ("naive", "fast", "chunked")
MEMORY_LABELS = {
    "naive": "naive",
    "fast": "promptclip",
    "chunked": f"promptclip, chunks of {CHUNK} + checkpointing",
}


def peak_memory(case: Case, classes: int, path: str, args: argparse.Namespace) -> int | None:
    """Peak memory growth of one training step, in bytes, measured in a fresh process (None: not
    applicable)."""
    if case.method == "zeroshot" or (path == "chunked" and not case.chunks):
        return None
    command = [sys.executable, __file__, "--memory-worker", case.name, str(classes), path]
    command += ["--device", args.device, "--precision", args.precision, "--arch", args.arch]
    command += ["--batch-size", str(args.batch_size), "--attention", args.attention]
    if args.layers is not None:
        command += ["--layers", str(args.layers)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode != 0:
        print(f"memory of {case.name} ({path}, {classes} classes) failed:\n{finished.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(json.loads(finished.stdout.strip().splitlines()[-1])["peak_bytes"])


def memory_worker(case_name: str, classes: int, path: str, args: argparse.Namespace) -> None:
    case = next(c for c in CASES if c.name == case_name)
    device = torch.device(args.device)
    clip = build_clip(args.arch, args.layers, device)
    extra = {"text_chunk_size": CHUNK, "text_checkpoint": True} if path == "chunked" else {}
    learner = build_learner(case, clip, class_names(classes), extra).train()
    paths = Paths(case, learner, learner, device, args.precision, args.attention)
    which = "naive" if path == "naive" else "fast"
    batch = make_batch(case, args.batch_size, classes, clip.image_size, device)
    build_lazy_state(learner, batch)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        paths.train_step(which, batch)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        release_free_memory()
        base = reset_peak_rss()
        paths.train_step(which, batch)
        peak = peak_rss() - base
    print(json.dumps({"peak_bytes": peak}))


def build_lazy_state(learner: PromptModel, batch: dict[str, Any]) -> None:
    """Build what a learner computes once and keeps for the whole run (class-prompt pieces, frozen targets,
    DPC's picture library) with a cheap forward and loss without autograd, so the measured step holds only
    what every step holds."""
    with torch.no_grad():
        learner.loss(batch, learner(batch))


def release_free_memory() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}: peak memory on a CPU needs Linux")


def reset_peak_rss() -> int:
    """Reset the peak resident set size to the current one; return it in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def ratio(values: dict[str, float] | None) -> str:
    return f"**{values['naive'] / values['fast']:.1f}x**" if values else "n/a"


def logit_difference(result: Throughput) -> str:
    return f"{result.max_logit_diff:.1e}" if result.max_logit_diff is not None else "n/a"


def rate(seconds: float | None, count: int) -> str:
    return f"{count / seconds:.1f}" if seconds else "n/a"


def throughput_table(results: Sequence[Throughput], args: argparse.Namespace, absolute: bool) -> str:
    if absolute:
        header = (
            "| case | classes | train img/s naive | train img/s promptclip | train speed-up | eval img/s naive | "
            "eval img/s promptclip | eval speed-up | eval img/s, images seen before |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
    else:
        header = (
            "| case | classes | training speed-up | evaluation speed-up | largest eval-logit difference | later "
            "evaluations of the same images (sweeps) |\n|---|---:|---:|---:|---:|---|"
        )
    rows = [header]
    for r in results:
        seen = "image pass skipped" if r.seen else "n/a"
        if absolute:
            t, e = r.train or {}, r.eval or {}
            rows.append(
                f"| {r.case} | {r.classes} | {rate(t.get('naive'), args.batch_size)} | "
                f"{rate(t.get('fast'), args.batch_size)} | {ratio(r.train)} | "
                f"{rate(e.get('naive'), args.eval_batch_size)} | {rate(e.get('fast'), args.eval_batch_size)} | "
                f"{ratio(r.eval)} | {rate(r.seen, args.eval_batch_size)} |"
            )
        else:
            rows.append(
                f"| {r.case} | {r.classes} | {ratio(r.train)} | {ratio(r.eval)} | {logit_difference(r)} | {seen} |"
            )
    return "\n".join(rows)


def memory_table(memory: dict[str, dict[str, int | None]], classes: int) -> str:
    rows = [
        f"| case ({classes} classes) | " + " | ".join(f"{MEMORY_LABELS[p]}, MiB" for p in MEMORY_PATHS) + " |",
        "|---|" + "---:|" * len(MEMORY_PATHS),
    ]
    for name, by_path in memory.items():
        values = [by_path.get(p) for p in MEMORY_PATHS]
        cells = [f"{value / MIB:,.0f}" if value is not None else "n/a" for value in values]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def setting_lines(args: argparse.Namespace, clip: CLIP, command: str) -> list[str]:
    device = torch.device(args.device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    depth = clip.config.text.layers
    reduced = (
        ""
        if depth == 12
        else f" **Reduced for this machine: {depth} of the 12 layers in each tower** (prompt depths capped at {depth});"
        " widths, heads, patch size, image size and the 77-token context are ViT-B/16's, so the per-layer costs"
        " whose ratios are shown keep their proportions."
    )
    return [
        f"`{command}`",
        "",
        f"Machine: {machine_description()}{gpu}.",
        "",
        f"Backbone: random weights of {clip.config.name}.{reduced} Random {clip.image_size} px images and labels.",
    ]


def seen_share(results: Sequence[Throughput]) -> float:
    shares = [r.seen / r.eval["fast"] for r in results if r.seen and r.eval]
    return max(shares) if shares else 0.0


def throughput_report(results: Sequence[Throughput], args: argparse.Namespace, command: str, clip: CLIP) -> str:
    device = torch.device(args.device)
    absolute = device.type == "cuda"
    diff = max((r.max_logit_diff or 0.0) for r in results) if results else 0.0
    counts = "/".join(str(c) for c in dict.fromkeys(r.classes for r in results))
    lines = [
        f"## Methods and plug-ins: promptclip against the naive paths ({device.type}, {counts} classes)",
        "",
        *setting_lines(args, clip, command),
        "",
        f"Training batches of {args.batch_size} images, evaluation batches of {args.eval_batch_size}; precision of"
        f" promptclip's path: {args.precision if absolute else 'fp32 (autocast is for GPUs)'}; medians of"
        f" {args.repeats} steps per path, timed in turns after {args.warmup} warm-up step(s); attention:"
        f" {args.attention}; compile: {args.compile}.",
        "",
        "Naive path: full 77-token text sequences, class features encoded again at every forward (every test"
        " batch; every training step, a frozen template too), fp32, and the official loops (CoCoOp one image per"
        " text pass, DAPT one image pass per view, DPC's stage-1 class features encoded at every step)."
        " promptclip's path: sequences cut after the last end-of-text token, class features encoded once per"
        " evaluation (and frozen ones once per class set), autocast on GPUs, the batched forms. Both compute the"
        f" same numbers (tests/test_speed_paths.py); largest evaluation-logit difference seen here: {diff:.1e}"
        " (float rounding; larger under bf16).",
        "",
        throughput_table(results, args, absolute),
        "",
        "The last column: classifying features a previous evaluation stored (`ImageFeatureCache`: the later runs"
        " of a sweep over seeds, shots or methods whose image side is frozen CLIP); it took"
        f" {seen_share(results):.2%} of the time of promptclip's evaluation of the same batch here at most. n/a:"
        " learners with trainable image sides. Evaluation of promptclip's path is the steady state: its one"
        " encoding of the class"
        " features per evaluation is spread over the test set. PromptKD's class features are its frozen"
        " teacher's, encoded once in both paths (here the teacher is the student's own CLIP).",
    ]
    if not absolute:
        threads = torch.get_num_threads()
        clock = "this process's CPU time" if args.clock == "cpu" else "wall time"
        lines += [
            "",
            f"Recorded with {threads} torch thread{'s' if threads > 1 else ''} (`torch.set_num_threads({threads})`,"
            f" `--threads`), timed in {clock}: with more threads than free cores the two paths' times mix in the"
            " machine's load. On a CPU only ratios measured side by side in one run are reported, not times.",
        ]
    return "\n".join(lines)


def memory_report(memory: dict[str, dict[str, int | None]], args: argparse.Namespace, command: str, clip: CLIP) -> str:
    device = torch.device(args.device)
    measure = (
        "Growth of `torch.cuda.max_memory_allocated`"
        if device.type == "cuda"
        else "Growth of the peak resident set size (VmHWM, reset through /proc/self/clear_refs) of a fresh process"
        " per cell, glibc returning freed blocks at once (`MALLOC_MMAP_THRESHOLD_=65536`),"
    )
    return "\n".join(
        [
            f"## Peak memory of a training step, {args.memory_classes} classes ({device.type})",
            "",
            *setting_lines(args, clip, command),
            "",
            f"{measure} during one training step of a batch of {args.batch_size} images, after a forward without"
            " autograd has built what the learner keeps through the run (class-prompt pieces, frozen targets), which"
            " is not counted. Paths as in the throughput section; the last column adds `method_cfg.text_chunk_size"
            f" {CHUNK}` and `method_cfg.text_checkpoint true`. n/a: no training (zero-shot), no text prompts to"
            " chunk (VPT, PromptKD), or not measured in this run.",
            "",
            memory_table(memory, args.memory_classes),
        ]
    )


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="promptclip's path")
    parser.add_argument("--arch", default="ViT-B-16", help="architecture (random weights)")
    parser.add_argument("--layers", type=int, default=None, help="layers per tower (default: 12 on GPU, 2 on CPU)")
    parser.add_argument("--classes", default=None, help="class counts (default: 50,500,1000 on GPU; 50 on CPU)")
    parser.add_argument("--cases", default=",".join(CASE_NAMES), help=f"of {', '.join(CASE_NAMES)}")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: 32 GPU, 4 CPU)")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="default: 100 GPU, 8 CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per path (default: 5 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    parser.add_argument("--memory-classes", type=int, default=1000)
    parser.add_argument("--memory-cases", default=None, help="default: every case on GPU; coop,maple on CPU")
    parser.add_argument("--memory-paths", default=",".join(MEMORY_PATHS), help="of naive, fast, chunked")
    parser.add_argument("--no-memory", action="store_true", help="throughput only")
    parser.add_argument("--memory-only", action="store_true", help="peak memory only")
    parser.add_argument("--attention", default="auto", choices=["auto", "math", "flash", "efficient", "cudnn"])
    parser.add_argument("--compile", default="off", choices=COMPILE_MODES, help="promptclip's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--clock", default="wall", choices=list(CLOCKS), help="wall time, or this process's CPU time (loaded machines)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument(
        "--section", default=None, help="name of the throughput section in BENCHMARKS.md (default methods-<device>)"
    )
    parser.add_argument("--memory-worker", nargs=3, metavar=("CASE", "CLASSES", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    defaults = {
        "precision": "bf16" if gpu else "fp32",
        "layers": None if gpu else 2,
        "classes": "50,500,1000" if gpu else "50",
        "batch_size": 32 if gpu else 4,
        "eval_batch_size": 100 if gpu else 8,
        "repeats": 5 if gpu else 2,
        "memory_cases": ",".join(CASE_NAMES) if gpu else "coop,maple",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def selected(names: str) -> list[Case]:
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in CASE_NAMES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASE_NAMES)}")
    return [c for c in CASES if c.name in wanted]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        case, classes, path = args.memory_worker
        memory_worker(case, int(classes), path, args)
        return
    device = torch.device(args.device)
    clip = build_clip(args.arch, args.layers, device)
    fast_clip = clip
    if args.compile != "off":  # the naive path keeps an eager copy
        fast_clip = copy.deepcopy(clip)
        compile_towers(fast_clip, args.compile)
    results = []
    for classes in [] if args.memory_only else [int(c) for c in args.classes.split(",")]:
        for case in selected(args.cases):
            result = measure_throughput(case, classes, clip, fast_clip, args)
            results.append(result)
            print(
                f"{case.name:>11} {classes:>5} classes: train {ratio(result.train)}, eval {ratio(result.eval)}",
                flush=True,
            )
    memory: dict[str, dict[str, int | None]] = {}
    if not args.no_memory:
        paths = [p for p in args.memory_paths.split(",") if p]
        for case in selected(args.memory_cases):
            memory[case.name] = {p: peak_memory(case, args.memory_classes, p, args) for p in paths}
            print(f"{case.name:>11} memory ({args.memory_classes} classes): {memory[case.name]}", flush=True)
    arguments = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write"]
    command = "python benchmarks/methods.py" + "".join(f" {shlex.quote(a)}" for a in arguments)
    sections = {}
    if results:
        sections[args.section or f"methods-{device.type}"] = throughput_report(results, args, command, clip)
    if memory:
        sections[f"methods-memory-{device.type}"] = memory_report(memory, args, command, clip)
    for name, text in sections.items():
        print(text + "\n")
        if not args.no_write:
            write_section(name, text)


if __name__ == "__main__":
    main()
