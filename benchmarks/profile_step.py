"""Where the time of one training step goes: operator counts, compute against host work, and what a GPU changes.

Usage: python benchmarks/profile_step.py [--cases maple+dapt,coop+dpc] [--classes 100] [--no-write]
       python benchmarks/profile_step.py --host-only    # host ms of the five GPU-benchmark cases, their batches

For each case (random weights with ViT-B/16's dimensions, a batch of 4 random 224 px images, `--classes`
classes, one thread), after one warm-up step:

* one step under `torch.profiler`: the operators the step runs (leaf aten operators: on a GPU each is a
  kernel launch, or a few), and the CPU time of the matrix products and attention against every other operator;
* the FLOPs of the step (`torch.utils.flop_counter`), and the time an H100 needs for them at its dense bf16
  peak (989 TFLOP/s) and at 40% of it;
* the host cost of the same step: the same learner on a backbone with ViT-B/16's layers and text context
  but tiny widths and images (the same operators), where the arithmetic is negligible and what remains is
  Python, autograd, the dispatcher and the operators' fixed costs. This is what a GPU cannot hide: the host
  must issue every kernel.

Writes section `profile-step` of BENCHMARKS.md (CPU times are of this machine; the counts do not depend on it).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, write_section
from gpu import OFFICIAL_BATCH, Trainer, step_flops
from methods import CASES, build_learner, class_names, make_batch

from promptclip.clip.model import CLIP
from promptclip.clip.weights import arch_config
from promptclip.engine.compiling import CompiledTowers

H100_BF16_TFLOPS = 989.0
COMPUTE_OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_dot_product", "convolution")
BATCH = 4


def backbone(narrow: bool) -> CLIP:
    """ViT-B/16 with random weights; `narrow`: the same layers and text context (so the same operators), with
    widths of 8, one head, and 32 px images (5 image tokens), whose arithmetic is negligible."""
    cfg = arch_config("ViT-B-16")
    if narrow:
        cfg = dataclasses.replace(
            cfg,
            name="ViT-B-16 layers, narrow",
            embed_dim=8,
            vision=dataclasses.replace(cfg.vision, width=8, heads=1, image_size=32),
            text=dataclasses.replace(cfg.text, width=8, heads=1),
        )
    torch.manual_seed(0)
    clip = CLIP(cfg).eval()
    clip.requires_grad_(False)
    return clip


def trainer_for(name: str, clip: CLIP, classes: int, batch_size: int = BATCH) -> Trainer:
    case = next(c for c in CASES if c.name == name)
    learner = build_learner(case, clip, class_names(classes), {}).train()
    batch = make_batch(case, batch_size, classes, clip.image_size, torch.device("cpu"))
    return Trainer(case, learner, batch, torch.device("cpu"), "fp32")


def is_compute(name: str) -> bool:
    return any(name.startswith(f"aten::{op}") for op in COMPUTE_OPS)


def profile(trainer: Trainer) -> dict[str, float]:
    """Operators of one step (aten operators no other aten operator called: those the step dispatches, about
    one kernel each on a GPU) and the share of the profiled time in matrix products and attention."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    trainer.step()  # warm-up: lazily built state, first allocations
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    dispatched = [e for e in events if not _inside_aten(e)]
    compute = sum(e.cpu_time_total for e in dispatched if is_compute(e.name))
    total = sum(e.cpu_time_total for e in dispatched)
    return {
        "ops": float(len(dispatched)),
        "compute_ops": float(sum(1 for e in dispatched if is_compute(e.name))),
        "compute_share": compute / total,
    }


def _inside_aten(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def host_ms(trainer: Trainer, repeats: int, warmup: int = 1) -> float:
    """Median CPU milliseconds of a step of the narrow model (its arithmetic is negligible)."""
    for _ in range(warmup):
        trainer.step()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        trainer.step()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def measure(name: str, classes: int, repeats: int, compiled: bool = False) -> dict[str, Any]:
    full = trainer_for(name, backbone(narrow=False), classes)
    result: dict[str, Any] = profile(full)
    result["gflop"] = step_flops(full) / 1e9
    narrow = trainer_for(name, backbone(narrow=True), classes)
    result["host_ms"] = host_ms(narrow, repeats)
    result["narrow_gflop"] = step_flops(narrow) / 1e9
    if compiled:
        result["host_ms_compiled"] = compiled_host_ms(name, classes, repeats)
    return result


def compiled_host_ms(name: str, classes: int, repeats: int) -> float:
    """Host ms of the narrow step with the towers compiled as `model.compile default` compiles them (inductor's
    fused CPU kernels: the operators a compiled graph no longer dispatches one by one). Warm-up steps trace
    and compile every graph the step needs (with and without gradients) before the timed ones."""
    torch._dynamo.reset()
    trainer = trainer_for(name, backbone(narrow=True), classes)
    CompiledTowers(trainer.learner, "default").install()
    return host_ms(trainer, repeats, warmup=3)


def report(results: dict[str, dict[str, Any]], classes: int, command: str) -> str:
    compiled = all("host_ms_compiled" in r for r in results.values())
    rows = [
        "| step (batch 4) | operators | of them matrix products / attention | their share of the CPU time |"
        " host ms (narrow model) |"
        + (" host ms, towers compiled | host time removed by compiling |" if compiled else "")
        + " GFLOP | H100 at the bf16 peak, ms | H100 at 40% of it, ms |",
        "|---|---:|---:|---:|---:|" + ("---:|---:|" if compiled else "") + "---:|---:|---:|",
    ]
    for name, r in results.items():
        peak_ms = r["gflop"] / H100_BF16_TFLOPS
        fused = f" {r['host_ms_compiled']:,.0f} | {1 - r['host_ms_compiled'] / r['host_ms']:.0%} |" if compiled else ""
        rows.append(
            f"| {name} | {r['ops']:,.0f} | {r['compute_ops']:,.0f} | {r['compute_share']:.0%} | {r['host_ms']:,.0f} |"
            f"{fused} {r['gflop']:,.0f} | {peak_ms:.2f} | {peak_ms / 0.4:.2f} |"
        )
    narrow = ", ".join(f"{name} {r['narrow_gflop']:.2f}" for name, r in results.items())
    return "\n".join(
        [
            "## Where the time of one training step goes (CPU profile, one thread)",
            "",
            f"`{command}`",
            "",
            f"Machine: {machine_description()}.",
            "",
            f"Random weights with ViT-B/16's dimensions (12 layers per tower), {classes} classes, a batch of"
            f" {BATCH} random 224 px images, fp32, one thread; one profiled step after a warm-up step. Operators:"
            " the aten operators the step dispatches (not those they call inside), about one GPU kernel each."
            " Host ms: CPU time of the same step on a backbone with ViT-B/16's layers and text context but widths"
            f" of 8, one head and 32 px images, whose arithmetic is negligible (GFLOP: {narrow}): Python,"
            " autograd, the dispatcher and each operator's fixed cost, which a GPU run pays on the host at every"
            " step. H100 columns: the step's FLOPs over the dense bf16 peak (989 TFLOP/s)."
            + (
                " Towers compiled: the same narrow step with `model.compile default` (inductor's fused CPU"
                " kernels, measured after the warm-up steps that compile them); on a GPU `reduce-overhead`"
                " also replays each tower's kernels as one CUDA graph launch, which removes more."
                if compiled
                else ""
            ),
            "",
            *rows,
        ]
    )


def host_table(classes: int, repeats: int) -> str:
    """Host ms per step (narrow backbone) of the GPU benchmark's cases at their recipes' batch sizes, and the
    images/s that host time alone allows."""
    rows = ["| case | batch | host ms per step | images/s the host allows |", "|---|---:|---:|---:|"]
    clip = backbone(narrow=True)
    for name, size in OFFICIAL_BATCH.items():
        milliseconds = host_ms(trainer_for(name, clip, classes, size), repeats)
        rows.append(f"| {name} | {size} | {milliseconds:.0f} | {1e3 * size / milliseconds:,.0f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="maple+dapt,coop+dpc")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="steps of the narrow model")
    parser.add_argument("--host-only", action="store_true", help="host ms at the recipes' batch sizes only")
    parser.add_argument("--compiled", action="store_true", help="also host ms with the towers compiled (minutes)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.host_only:
        print(host_table(args.classes, args.repeats))
        return
    results = {}
    for name in args.cases.split(","):
        results[name] = measure(name, args.classes, args.repeats, args.compiled)
        print(name, results[name], flush=True)
    arguments = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write"]
    text = report(results, args.classes, "python benchmarks/profile_step.py" + "".join(f" {a}" for a in arguments))
    print(text)
    if not args.no_write:
        write_section("profile-step", text)


if __name__ == "__main__":
    main()
