"""DPC's training step, promptclip's paths side by side with the naive ones, on a CPU at one thread.

* **Ranking**: a learner whose image side is frozen (CoOp, KgCoOp) ranks the hard negatives with the image
  features of its own forward; the naive path (`dpc_frozen_ranking_pass`, the official sampler's) runs the
  frozen image tower a second time on the anchors. Whole training steps of CoOp+DPC, timed.
* **Pictures**: the negatives' pictures are picked, cropped, resized and flipped in worker processes
  (`PluginContext.num_workers`, the run's `data.num_workers`), the main process only sending (class, seed)
  requests and normalising the 8-bit result on the model's device; the naive path
  (`dpc_pictures_in_main_process`) renders them in the main process. Drawing one step's negatives (choosing
  them and rendering their 8-bit pixels; the normalisation that follows runs on the model's device, the same
  in both paths), timed in main-process CPU time (what the training loop itself spends) and in wall time,
  for 500 x 375 pictures.

Both paths of a pair give the same numbers (tests/test_dpc_speed.py). The two paths are timed in turns and
the medians compared; only ratios are written (to BENCHMARKS.md, section `dpc-speed-cpu`), as the machine's
load changes absolute times.

    OMP_NUM_THREADS=1 python benchmarks/dpc_speed.py
    OMP_NUM_THREADS=1 python benchmarks/dpc_speed.py --layers 12 --repeats 5 --workers 4
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import NoisePhotos, machine_description, write_section
from methods import build_clip, class_names

from promptclip.data.datasets.base import DatasetSplits, Datum
from promptclip.methods.base import PluginContext, get_prompt_model
from promptclip.plugins.base import wrap_with_plugins
from promptclip.plugins.dpc import DPC

PICTURE_SIZE = (500, 375)  # width, height: a typical photo of the field's datasets


# ---------------------------------------------------------------------------------------------------------
# The naive paths
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def dpc_frozen_ranking_pass(learner: DPC) -> Iterator[None]:
    """While inside, DPC ranks with a frozen pass of its own over the anchors (as for a learner with visual
    prompts), then encodes the anchors again with the negatives."""
    previous = learner.rank_with_forward_features
    learner.rank_with_forward_features = False
    try:
        yield
    finally:
        learner.rank_with_forward_features = previous


@contextlib.contextmanager
def dpc_pictures_in_main_process(learner: DPC) -> Iterator[None]:
    """While inside, DPC renders its negatives' pictures in the main process."""
    previous = learner.context.num_workers
    learner.context.num_workers = 0
    try:
        yield
    finally:
        learner.context.num_workers = previous


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


def interleaved(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, main-process CPU seconds) of each function, timed in turns after one warm-up."""
    for function in functions.values():
        function()
    wall: dict[str, list[float]] = {name: [] for name in functions}
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            function()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in functions}


def build_dpc(layers: int, num_classes: int, pictures: tuple[int, int], workers: int) -> DPC:
    clip = build_clip("ViT-B-16", layers, torch.device("cpu"))
    names = class_names(num_classes)
    torch.manual_seed(1)
    learner = get_prompt_model(clip, {"method": "coop", "n_ctx": 16}, names)
    library = [Datum(f"train/{c}_{i}", c, n) for c, n in enumerate(names) for i in range(2)]
    splits = DatasetSplits("noise", None, names, "a photo of a {}.", library, [], [], reader=NoisePhotos(pictures))
    context = PluginContext(splits=splits, seed=1, num_workers=workers)
    dpc = wrap_with_plugins(learner, {"dpc": {"omega_b": 0.5, "top_k": 8}}, context)
    assert isinstance(dpc, DPC)
    return dpc.train()


def batch_of(count: int, num_classes: int, image_size: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(2)
    labels = torch.randperm(num_classes, generator=generator)[:count]
    return {"image": torch.randn(count, 3, image_size, image_size, generator=generator), "label": labels}


def training_step(learner: DPC, batch: dict[str, Any]) -> None:
    learner.zero_grad(set_to_none=True)
    sum(learner.loss(batch, learner(batch)).values()).backward()  # type: ignore[union-attr]


def ranking_rows(args: argparse.Namespace) -> list[str]:
    learner = build_dpc(args.layers, args.classes, (64, 64), workers=0)
    batch = batch_of(4, args.classes, learner.clip.image_size)

    def naive() -> None:
        with dpc_frozen_ranking_pass(learner):
            training_step(learner, batch)

    times = interleaved({"naive": naive, "ours": lambda: training_step(learner, batch)}, args.repeats)
    rows = []
    for clock, index in (("main-process CPU", 1), ("wall", 0)):
        ratio = times["naive"][index] / times["ours"][index]
        rows.append(
            f"| ranking from the forward's image features, CoOp+DPC training step, batch 4 | {clock} | {ratio:.2f}x |"
        )
    return rows


def picture_rows(args: argparse.Namespace) -> list[str]:
    rows = []
    for batch_size in (4, 32):
        num_classes = max(args.classes, batch_size * args.top_k)
        learner = build_dpc(args.layers, num_classes, PICTURE_SIZE, workers=args.workers)
        batch = batch_of(batch_size, num_classes, learner.clip.image_size)
        scores = torch.randn(batch_size, num_classes, generator=torch.Generator().manual_seed(3))

        def draw(learner: DPC = learner, scores: torch.Tensor = scores, batch: dict[str, Any] = batch) -> None:
            learner.draw_negatives(scores, batch["label"])  # normalised afterwards, on the model's device

        def naive(learner: DPC = learner, draw: Callable[[], None] = draw) -> None:
            with dpc_pictures_in_main_process(learner):
                draw()

        times = interleaved({"naive": naive, "ours": draw}, args.repeats)
        for clock, index in (("main-process CPU", 1), ("wall", 0)):
            ratio = times["naive"][index] / times["ours"][index]
            naive_ms, ours_ms = 1000 * times["naive"][index], 1000 * times["ours"][index]
            rows.append(
                f"| drawing the negatives with {args.workers} picture worker processes, batch {batch_size} "
                f"({naive_ms:.0f} -> {ours_ms:.0f} ms) | {clock} | {ratio:.2f}x |"
            )
        workers = learner.picture_workers()
        if workers is not None:
            workers.close()
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="layers per tower (ViT-B/16 widths)")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="picture worker processes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = [*ranking_rows(args), *picture_rows(args)]
    command = "OMP_NUM_THREADS=1 python benchmarks/dpc_speed.py " + " ".join(argv or sys.argv[1:])
    body = "\n".join(
        [
            "## DPC's step: naive vs promptclip (CPU, 1 thread)",
            "",
            f"`{command.strip()}` on {machine_description()}. Ratio naive / promptclip of median times "
            f"({args.repeats} repeats, interleaved); both paths give the same numbers (tests/test_dpc_speed.py). "
            f"ViT-B/16 widths with {args.layers} layers per tower, {args.classes} classes, K = {args.top_k}; "
            "pictures 500 x 375; drawing the negatives = choosing them and rendering their 8-bit pixels. "
            "The main-process CPU time is what the training loop spends; wall times gain from worker processes "
            "only where each has a free core, so read them only on an otherwise idle machine.",
            "",
            "| path | clock | speed-up |",
            "| --- | --- | ---: |",
            *rows,
        ]
    )
    print(body)
    if not args.no_write:
        write_section("dpc-speed-cpu", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
