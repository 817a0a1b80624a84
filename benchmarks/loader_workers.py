"""Host work per image of the loader, and how many workers keep a GPU fed.

Usage: python benchmarks/loader_workers.py [--images 64] [--repeats 5] [--no-write]

Writes 500x375 JPEG pictures (photo-like sizes and compression) to a temporary folder and times, per image and
in one process with one thread, every way the loader can prepare a 224 px item (`SplitDataset.item`):

* training crops: decoded and cropped on the host (`pixels` float: the CPU default; uint8: the GPU default,
  normalised on the device), or decoded only (`decoded`: `data.crop_on_device`, cropped on the device), each
  from the file or from a picture decoded once and kept (`in_memory`, few-shot sets);
* evaluation crops: decoded, resized and centre-cropped on the host, or served from the crop cache.

The time is the process's CPU time (`time.process_time`, median of `--repeats` passes over the pictures), which
other processes on a loaded machine do not inflate; one such process is what a loader worker is. Images per
second per worker are the inverse. Section `loader-workers` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, write_section

from promptclip.data.crop_cache import CropCache
from promptclip.data.datasets.base import DatasetSplits, Datum
from promptclip.data.loader import SplitDataset, build_loader

IMAGE_SIZE = 224
VIT_B16_FORWARD_GFLOP = 35.0  # 12 layers x 197 tokens x (12 d^2 + 2 N d) multiply-adds, d = 768, twice
H100_BF16_TFLOPS = 989.0  # dense peak of an H100 SXM


def write_pictures(folder: Path, count: int) -> DatasetSplits:
    """`count` smooth random 500x375 JPEG pictures (quality 90), two classes."""
    rng = np.random.default_rng(0)
    data = []
    for index in range(count):
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        picture = Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC)
        picture.save(folder / f"img{index}.jpg", quality=90)
        data.append(Datum(f"img{index}.jpg", index % 2, f"class {index % 2}"))
    return DatasetSplits("pictures", folder, ["class 0", "class 1"], "a photo of a {}.", data, [], data)


def cpu_seconds_per_image(function: Callable[[int], object], count: int, repeats: int) -> float:
    """Median over `repeats` passes of the CPU seconds per image of `function(index)` for every picture."""
    function(0)  # warm-up: imports, first allocations
    passes = []
    for _ in range(repeats):
        start = time.process_time()
        for index in range(count):
            function(index)
        passes.append((time.process_time() - start) / count)
    return statistics.median(passes)


def measure(splits: DatasetSplits, repeats: int) -> dict[str, float]:
    count = len(splits.train)

    def training(in_memory: bool) -> SplitDataset:
        return SplitDataset(splits, splits.train, train=True, image_size=IMAGE_SIZE, seed=1, in_memory=in_memory)

    from_disk, kept = training(False), training(True)
    evaluation = SplitDataset(splits, splits.test, train=False, image_size=IMAGE_SIZE)
    cache_loader = build_loader(splits, "test", batch_size=count, image_size=IMAGE_SIZE, crop_cache=CropCache())
    list(cache_loader)  # fills the cache: the next pass is what a later evaluation of these images costs
    cases: dict[str, Callable[[int], object]] = {
        "train_float": lambda i: from_disk.item(i, "float"),
        "train_uint8": lambda i: from_disk.item(i, "uint8"),
        "train_decoded": lambda i: from_disk.item(i, "decoded"),
        "kept_float": lambda i: kept.item(i, "float"),
        "kept_uint8": lambda i: kept.item(i, "uint8"),
        "kept_decoded": lambda i: kept.item(i, "decoded"),
        "eval_float": lambda i: evaluation.item(i, "float"),
        "eval_uint8": lambda i: evaluation.item(i, "uint8"),
    }
    seconds = {name: cpu_seconds_per_image(function, count, repeats) for name, function in cases.items()}
    start = time.process_time()
    for _ in range(repeats):
        list(cache_loader)
    seconds["cached_float"] = (time.process_time() - start) / (repeats * count)
    store = cache_loader._crop_store()
    assert store is not None and store.has_all([d.path for d in splits.test], evaluation.signatures(range(count)))

    def kept_batch() -> None:  # what a GPU loader does for a kept batch on the host: check and stack
        evaluation.signatures(range(count))
        store.get([d.path for d in splits.test])

    start = time.process_time()
    for _ in range(repeats):
        kept_batch()
    seconds["cached_uint8"] = (time.process_time() - start) / (repeats * count)
    return seconds


ROWS = [
    ("train_float", "training crop from the file, float pixels (CPU default)", "decode, crop, resize, flip, normalise"),
    ("train_uint8", "training crop from the file, uint8 pixels (GPU default)", "decode, crop, resize, flip"),
    ("train_decoded", "training crop from the file, `data.crop_on_device`", "decode"),
    ("kept_float", "training crop of a kept picture (`in_memory`), float pixels", "crop, resize, flip, normalise"),
    ("kept_uint8", "training crop of a kept picture, uint8 pixels", "crop, resize, flip"),
    ("kept_decoded", "training crop of a kept picture, `data.crop_on_device`", "copy to a tensor"),
    ("eval_float", "evaluation crop from the file, float pixels", "decode, resize, centre crop, normalise"),
    ("eval_uint8", "evaluation crop from the file, uint8 pixels", "decode, resize, centre crop"),
    ("cached_float", "evaluation crop kept from an earlier evaluation, float pixels", "stack, normalise"),
    ("cached_uint8", "evaluation crop kept from an earlier evaluation, uint8 pixels (GPU)", "stack"),
]


def workers_needed(images_per_second: float, per_worker: float) -> str:
    return f"{max(1, int(np.ceil(images_per_second / per_worker)))}"


def report(seconds: dict[str, float], count: int, repeats: int, command: str) -> str:
    rate = {name: 1.0 / value for name, value in seconds.items()}
    # GPU demand at an assumed 40% of the bf16 peak: evaluation is one image-tower forward per image; training
    # with visual prompts adds the backward pass to the images (about one more forward).
    gpu_rate = H100_BF16_TFLOPS * 0.4 * 1e3 / VIT_B16_FORWARD_GFLOP
    demand = {"evaluation": gpu_rate, "training with visual prompts": gpu_rate / 2}
    lines = [
        "## Loader: host work per image and workers per GPU",
        "",
        f"`{command}`",
        "",
        f"Machine: {machine_description()}.",
        "",
        f"{count} JPEG pictures of 500x375 (quality 90), {IMAGE_SIZE} px items; CPU time of one process with one"
        f" thread (a loader worker), median of {repeats} passes. These are absolute figures of this machine's"
        " cores, measured as CPU time so that other processes' load does not inflate them; a faster core scales"
        " every row alike.",
        "",
        "| item | host work | CPU ms per image | images/s per worker |",
        "|---|---|---:|---:|",
    ]
    for name, label, work in ROWS:
        lines.append(f"| {label} | {work} | {1e3 * seconds[name]:.2f} | {rate[name]:,.0f} |")
    lines += [
        "",
        f"Workers an H100 needs, estimated: a ViT-B/16 image-tower forward is about {VIT_B16_FORWARD_GFLOP:.0f}"
        f" GFLOP, so at 40% of the bf16 peak ({H100_BF16_TFLOPS:.0f} TFLOP/s) an H100 evaluates about"
        f" {demand['evaluation']:,.0f} images/s and trains a learner with visual prompts (MaPLe, PromptSRC, IVLP)"
        f" on about {demand['training with visual prompts']:,.0f} images/s (CoOp's text-side cost is small beside"
        " it). That is the demand of a step whose GPU work is not waiting for the host: at the recipes' small"
        " batches an eager step is host-bound (section `profile-step`), which lowers the rate to batch size /"
        " host time per step, and capturing the step (CUDA graphs) raises it towards these figures."
        " `python benchmarks/gpu.py` measures the rates on the GPU and redoes this division with its own CPU.",
        "",
        "| item | workers for training (" + f"{demand['training with visual prompts']:,.0f} img/s) | workers for"
        f" evaluation ({demand['evaluation']:,.0f} img/s) |",
        "|---|---:|---:|",
    ]
    for name, label, _ in ROWS:
        training = workers_needed(demand["training with visual prompts"], rate[name])
        evaluation = workers_needed(demand["evaluation"], rate[name])
        lines.append(
            f"| {label} | {training if name.startswith(('train', 'kept')) else 'n/a'} | "
            f"{evaluation if name.startswith(('eval', 'cached')) else 'n/a'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        splits = write_pictures(Path(folder), args.images)
        seconds = measure(splits, args.repeats)
    command = "python benchmarks/loader_workers.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--no-write")
    text = report(seconds, args.images, args.repeats, command)
    print(text)
    if not args.no_write:
        write_section("loader-workers", text)


if __name__ == "__main__":
    main()
