"""One short GPU run: training steps/s, peak memory and FLOP utilisation, evaluation images/s, and the loader's
workers per GPU, for promptclip's paths beside the naive (official-like) ones.

Usage:
    python benchmarks/gpu.py                          # one CUDA device, ViT-B/16 dims, about 7 minutes
    python benchmarks/gpu.py --device cpu --tiny      # every line in CI size (tiny CLIP, 1-2 images), seconds

Training (random weights with ViT-B/16's dimensions, random 224 px images and labels, `--train-classes`
classes) of CoOp, MaPLe, MaPLe+DAPT, PromptSRC and CoOp+DPC at their recipes' batch sizes (32, 4, 4, 4, 4):
steps/s and peak memory in fp32, bf16 autocast and fp16 autocast with a GradScaler, each eager and under
`torch.compile` of the two towers; the naive path beside them (official-like: fp16 with a GradScaler, the
class prompts encoded again at every step over all 77 tokens, one image pass per DAPT view, DPC's stage-1
class features re-encoded at every step). Model FLOP utilisation: the FLOPs of one promptclip step (counted
with torch.utils.flop_counter) times steps/s over the device's dense bf16 peak (`PEAK_BF16_TFLOPS`); the naive
rows use the same FLOP count, so theirs is the share of the peak their speed would give the same work.

Evaluation images/s at 100 and 1000 classes, batches of 100: promptclip's path in bf16 with the class features
encoded once, the naive one in fp16 encoding every class prompt (77 tokens) for every batch.

Loader: images/s per worker of this machine's CPU (`benchmarks/loader_workers.py`'s measure) and the workers
each measured training rate needs.

Compiled runs go last, bf16 first, as long as `--budget-s` allows (each compiles the towers again); a cell the
budget leaves out says so. On a CUDA device the report is written to BENCHMARKS.md (section `gpu`) with the
device named; `--tiny` and CPU runs only print unless `--write` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, write_section
from methods import CASES, Case, build_clip, build_learner, class_names, compile_towers, make_batch
from speed_paths import (
    cocoop_loss_one_image_at_a_time,
    cocoop_one_image_at_a_time,
    dapt_three_passes,
    dpc_rescoring,
    forget_class_features,
    full_context,
    reencode_text_per_batch,
)

from promptclip.engine.compiling import mark_step_begin
from promptclip.methods.base import PromptModel

MIB = 2**20
SECTION = "gpu"
COMMAND = "python benchmarks/gpu.py"
OFFICIAL_BATCH = {"coop": 32, "maple": 4, "maple+dapt": 4, "promptsrc": 4, "coop+dpc": 4}
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Dense bf16 tensor-core peaks in TFLOP/s, by a piece of the device name (the first that matches).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)
NO_GPU_LINE = (
    "No GPU figures exist yet: no CUDA device has run this benchmark. On one CUDA device, "
    f"`{COMMAND}` produces this section (about 7 minutes)."
)


@dataclass
class TrainRow:
    case: str
    batch: int
    path: str  # "promptclip" or "naive"
    precision: str
    compiled: bool
    steps_per_s: float | None = None
    peak_mib: float | None = None
    mfu: float | None = None
    note: str = ""


@dataclass
class EvalRow:
    case: str
    classes: int
    path: str
    precision: str
    images_per_s: float | None = None


@dataclass
class Results:
    train: list[TrainRow] = field(default_factory=list)
    eval: list[EvalRow] = field(default_factory=list)
    flops: dict[str, float] = field(default_factory=dict)  # per training step, by case
    loader: dict[str, float] = field(default_factory=dict)  # images/s per worker, by item kind
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------
# Devices, precision, timing
# ---------------------------------------------------------------------------------------------------------


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak from `PEAK_BF16_TFLOPS`, or None (a CPU, or a device not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine_description()})"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast in `precision` on any device (CPU autocast runs the same code path in the tiny run)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(function: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Mean seconds of `repeats` calls after `warmup` ones, synchronising only around the timed block (so the
    host may run ahead of the device as it does in training)."""
    for _ in range(warmup):
        function()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Yields a dict whose "mib" is, afterwards, the growth of allocated memory's peak inside (None on a CPU)."""
    result: dict[str, float | None] = {"mib": None}
    if device.type != "cuda":
        yield result
        return
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield result
    synchronize(device)
    result["mib"] = (torch.cuda.max_memory_allocated(device) - base) / MIB


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """One learner's training step in one precision, promptclip's or the naive way."""

    case: Case
    learner: PromptModel
    batch: dict[str, Any]
    device: torch.device
    precision: str
    naive: bool = False

    def __post_init__(self) -> None:
        params = list(self.learner.trainable_parameters().values())
        self.optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def step(self) -> None:
        if self.device.type == "cuda":
            mark_step_begin()  # the graphs of a reduce-overhead step may reuse the last step's output memory
        with self._naive_context():
            loss = self._loss()
            if loss is not None:  # the one-image CoCoOp loop calls backward itself
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _loss(self) -> torch.Tensor | None:
        kind = self.case.kind
        if self.naive and kind == "cocoop":
            with autocast(self.device, self.precision):
                cocoop_loss_one_image_at_a_time(self.learner, self.batch)
            return None
        with autocast(self.device, self.precision):
            if self.naive and kind == "dapt":
                output = dapt_three_passes(self.learner, self.batch)
            else:
                output = self.learner(self.batch)
            terms = self.learner.loss(self.batch, output)
        return torch.stack([value.float() for value in terms.values()]).sum()

    @contextlib.contextmanager
    def _naive_context(self) -> Iterator[None]:
        if not self.naive:
            yield
            return
        forget_class_features(self.learner)
        with contextlib.ExitStack() as stack:
            stack.enter_context(full_context(self.learner.clip))
            if self.case.kind == "dpc":
                stack.enter_context(dpc_rescoring(self.learner))
            yield


def evaluation_step(
    case: Case, learner: PromptModel, images: torch.Tensor, device: torch.device, precision: str, naive: bool
) -> Callable[[], object]:
    def step() -> object:
        with torch.no_grad(), autocast(device, precision):
            if not naive:
                return learner({"image": images}).logits
            with full_context(learner.clip):
                if case.kind == "cocoop":
                    return cocoop_one_image_at_a_time(learner, {"image": images}).logits
                return reencode_text_per_batch(learner, {"image": images})

    return step


def step_flops(trainer: Trainer) -> float:
    """FLOPs of one of the trainer's steps (forward and backward), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    device: torch.device
    arch: str
    layers: int | None
    train_classes: int
    eval_classes: tuple[int, ...]
    eval_batch: int
    batch_cap: int | None
    warmup: int
    repeats: int
    cases: tuple[str, ...]
    precisions: tuple[str, ...]
    compile_mode: str | None  # None: no compiled runs
    compile_backend: str
    compile_cases: tuple[str, ...]
    budget_s: float
    loader_images: int


def case_named(name: str) -> Case:
    return next(case for case in CASES if case.name == name)


def batch_size(settings: Settings, name: str) -> int:
    size = OFFICIAL_BATCH[name]
    return min(size, settings.batch_cap) if settings.batch_cap else size


def build(settings: Settings, clip: Any, name: str, classes: int) -> PromptModel:
    return build_learner(case_named(name), clip, class_names(classes), {}).train()


def measure_training(
    settings: Settings, clip: Any, name: str, precision: str, compiled: bool, naive: bool, flops: dict[str, float]
) -> TrainRow:
    case = case_named(name)
    size = batch_size(settings, name)
    learner = build(settings, clip, name, settings.train_classes)
    batch = make_batch(case, size, settings.train_classes, clip.image_size, settings.device)
    trainer = Trainer(case, learner, batch, settings.device, precision, naive=naive)
    if not naive and not compiled and name not in flops:
        flops[name] = step_flops(dataclasses.replace(trainer, precision="fp32"))
    with peak_memory(settings.device) as memory:
        seconds = seconds_per_call(trainer.step, settings.device, settings.warmup, settings.repeats)
    row = TrainRow(name, size, "naive" if naive else "promptclip", precision, compiled, 1.0 / seconds, memory["mib"])
    peak = peak_bf16_tflops(settings.device)
    if peak is not None and name in flops:
        row.mfu = flops[name] * row.steps_per_s / (peak * 1e12)  # type: ignore[operator]
    return row


def measure_evaluation(settings: Settings, clip: Any, name: str, classes: int, naive: bool) -> EvalRow:
    case = case_named(name)
    precision = "fp16" if naive else ("bf16" if settings.device.type == "cuda" else "fp32")
    learner = build(settings, clip, name, classes).eval()
    images = make_batch(case, settings.eval_batch, classes, clip.image_size, settings.device)["image"]
    step = evaluation_step(case, learner, images, settings.device, precision, naive)
    seconds = seconds_per_call(step, settings.device, settings.warmup, settings.repeats)
    return EvalRow(name, classes, "naive" if naive else "promptclip", precision, settings.eval_batch / seconds)


def measure_loader(settings: Settings) -> dict[str, float]:
    """Images/s per worker of this CPU for the items a GPU loader hands over (one thread, CPU time)."""
    from loader_workers import measure, write_pictures

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            seconds = measure(write_pictures(Path(folder), settings.loader_images), repeats=2)
    finally:
        torch.set_num_threads(threads)
    return {name: 1.0 / value for name, value in seconds.items()}


def run(settings: Settings) -> Results:
    started = time.perf_counter()
    torch._dynamo.config.cache_size_limit = 64  # every case and precision compiles the towers for its shapes
    results = Results()
    eager = build_clip(settings.arch, settings.layers, settings.device)
    for name in settings.cases:
        for precision in settings.precisions:
            results.train.append(measure_training(settings, eager, name, precision, False, False, results.flops))
        results.train.append(measure_training(settings, eager, name, "fp16", False, True, results.flops))
        print(f"trained {name}", flush=True)
    for classes in settings.eval_classes:
        for name in settings.cases:
            for naive in (False, True):
                results.eval.append(measure_evaluation(settings, eager, name, classes, naive))
        print(f"evaluated {classes} classes", flush=True)
    results.loader = measure_loader(settings)
    if settings.compile_mode is not None:
        run_compiled(settings, eager, results, started)
    results.seconds = time.perf_counter() - started
    return results


def run_compiled(settings: Settings, eager: Any, results: Results, started: float) -> None:
    """Compiled training, bf16 first, while the budget lasts (a compile costs about as much as the first one)."""
    compiled = copy.deepcopy(eager)
    compile_towers(compiled, settings.compile_mode, settings.compile_backend)
    order = sorted(settings.precisions, key=lambda p: {"bf16": 0, "fp16": 1, "fp32": 2}[p])
    costs: list[float] = []
    for precision in order:
        for name in settings.compile_cases:
            elapsed = time.perf_counter() - started
            expected = statistics.median(costs) if costs else 0.0
            if elapsed + expected > settings.budget_s:
                results.train.append(
                    TrainRow(name, batch_size(settings, name), "promptclip", precision, True, note="budget")
                )
                continue
            begin = time.perf_counter()
            results.train.append(measure_training(settings, compiled, name, precision, True, False, results.flops))
            costs.append(time.perf_counter() - begin)
        print(f"compiled {precision}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def number(value: float | None, form: str = "{:,.1f}") -> str:
    return form.format(value) if value is not None else "n/a"


def training_table(results: Results) -> str:
    rows = [
        "| case | batch | path | precision | compile | steps/s | images/s | peak MiB | MFU (bf16 peak) |",
        "|---|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for row in results.train:
        if row.note == "budget":
            cells = ["not run: time budget"] + ["n/a"] * 3
        else:
            images = row.steps_per_s * row.batch if row.steps_per_s else None
            cells = [number(row.steps_per_s, "{:,.2f}"), number(images), number(row.peak_mib, "{:,.0f}")]
            cells.append(number(row.mfu, "{:.1%}"))
        head = f"| {row.case} | {row.batch} | {row.path} | {row.precision} | {'yes' if row.compiled else 'no'} | "
        rows.append(head + " | ".join(cells) + " |")
    return "\n".join(rows)


def evaluation_table(results: Results) -> str:
    rows = ["| case | classes | path | precision | images/s | speed-up |", "|---|---:|---|---|---:|---:|"]
    ours = {(r.case, r.classes): r.images_per_s for r in results.eval if r.path == "promptclip"}
    for row in results.eval:
        speedup = ""
        if row.path == "naive" and row.images_per_s:
            speedup = f"**{ours[(row.case, row.classes)] / row.images_per_s:.1f}x** for promptclip"  # type: ignore[operator]
        rows.append(
            f"| {row.case} | {row.classes} | {row.path} | {row.precision} | {number(row.images_per_s)} | {speedup} |"
        )
    return "\n".join(rows)


def loader_table(results: Results) -> str:
    best = {}
    for row in results.train:
        if row.path == "promptclip" and row.steps_per_s:
            best[row.case] = max(best.get(row.case, 0.0), row.steps_per_s * row.batch)
    kinds = [
        ("train_uint8", "crop on the host (uint8 pixels, the GPU default)"),
        ("train_decoded", "decode only (`data.crop_on_device`)"),
        ("kept_uint8", "kept picture (`in_memory`), crop on the host"),
        ("kept_decoded", "kept picture, `data.crop_on_device`"),
    ]
    header = "| training item | images/s per worker | " + " | ".join(f"workers for {case}" for case in best) + " |"
    rows = [header, "|---|---:|" + "---:|" * len(best)]
    for key, label in kinds:
        per_worker = results.loader.get(key)
        cells = [f"{-(-rate // per_worker):.0f}" if per_worker else "n/a" for rate in best.values()]
        rows.append(f"| {label} | {number(per_worker, '{:,.0f}')} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(results: Results, settings: Settings, command: str) -> str:
    device = settings.device
    peak = peak_bf16_tflops(device)
    size = "ViT-B/16 dimensions" if not settings.layers else f"{settings.arch}, {settings.layers} layers"
    lines = [
        f"## GPU: training, evaluation and loader ({device_name(device)})",
        "",
        f"`{command}`",
        "",
        f"Machine: {machine_description()}; device: {device_name(device)}"
        + (f", dense bf16 peak {peak:.0f} TFLOP/s." if peak else "."),
        "",
        f"Random weights ({settings.arch if settings.layers is None else size}), random images and labels,"
        f" {settings.train_classes} training classes; {settings.warmup} warm-up and {settings.repeats} timed"
        f" steps per row; {results.seconds:.0f} s in all. Naive: fp16 autocast with a GradScaler, class prompts"
        " encoded again at every step and every evaluation batch over all 77 tokens, one image pass per DAPT"
        " view, DPC's stage-1 class features encoded at every step. MFU: FLOPs of one promptclip step"
        " (torch.utils.flop_counter) x steps/s / the bf16 peak, the same FLOP count for every row of a case.",
        "",
        training_table(results),
        "",
        f"Evaluation, batches of {settings.eval_batch}:",
        "",
        evaluation_table(results),
        "",
        "Loader workers each training rate above needs (the fastest promptclip row of each case), from this"
        " machine's CPU (one worker = one process, one thread):",
        "",
        loader_table(results),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="CI size: the tiny CLIP, batches of at most 2")
    parser.add_argument("--cases", default=",".join(OFFICIAL_BATCH), help=f"of {', '.join(OFFICIAL_BATCH)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--train-classes", type=int, default=None, help="default 100 (tiny: 5)")
    parser.add_argument("--eval-classes", default=None, help="default 100,1000 (tiny: 5,10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 10, tiny 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, tiny 1)")
    parser.add_argument("--compile", default="default", choices=["off", "default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--budget-s", type=float, default=390.0, help="no compiled row starts after (seconds)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md even for a CPU or tiny run")
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    tiny = args.tiny
    cases = tuple(c for c in args.cases.split(",") if c)
    return Settings(
        device=torch.device(args.device),
        arch="tiny-vit" if tiny else "ViT-B-16",
        layers=None,
        train_classes=args.train_classes or (5 if tiny else 100),
        eval_classes=tuple(int(c) for c in (args.eval_classes or ("5,10" if tiny else "100,1000")).split(",")),
        eval_batch=2 if tiny else 100,
        batch_cap=2 if tiny else None,
        warmup=args.warmup if args.warmup is not None else (1 if tiny else 3),
        repeats=args.repeats or (1 if tiny else 10),
        cases=cases,
        precisions=tuple(p for p in args.precisions.split(",") if p),
        compile_mode=None if args.compile == "off" else args.compile,
        compile_backend="eager" if tiny else "inductor",  # tiny: dynamo traces, no code generation
        compile_cases=cases[:1] if tiny else cases,  # tiny: one trace per precision keeps the run short
        budget_s=args.budget_s,
        loader_images=2 if tiny else 16,
    )


def check(settings: Settings) -> None:
    unknown = [c for c in settings.cases if c not in OFFICIAL_BATCH] + [
        p for p in settings.precisions if p not in PRECISIONS
    ]
    if unknown:
        raise SystemExit(f"unknown case or precision {', '.join(unknown)}; cases: {', '.join(OFFICIAL_BATCH)}")
    if settings.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device here; `{COMMAND} --device cpu --tiny` runs every line in CI size")


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    settings = settings_from(args)
    check(settings)
    results = run(settings)
    arguments = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--write", "--no-write")]
    text = report(results, settings, COMMAND + "".join(f" {shlex.quote(a)}" for a in arguments))
    print(text)
    official = settings.device.type == "cuda" and not args.tiny
    if not args.no_write and (official or args.write):
        write_section(SECTION, text)
    return text


if __name__ == "__main__":
    main()
