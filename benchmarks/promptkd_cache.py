"""PromptKD's training epoch with the frozen teacher's image features kept across epochs, against encoding
them at every epoch, on a CPU at one thread.

Training without random augmentation (`data.augment none`) feeds the same pixels at every epoch, so promptclip
keeps the teacher's image features of the first epoch (`method_cfg.teacher_cache_mb`) and the teacher's image
tower runs no more; the naive path (`promptkd_teacher_every_epoch`, as the field's code does) runs it for every
batch of every epoch. Both give the same losses and gradients (tests/test_promptkd_cache.py).

The teacher is bigger than the student as in the paper (ViT-L/14 teacher, ViT-B/16 student: about 4.6 times
the image tower's forward work): here both are reduced for a CPU, the teacher 1.5 times as wide and twice as
deep (4.5 times the student's matmul work per image), the same patch grid. Random weights and random
500 x 375 pictures, read through the loader (kept 8-bit crops from the second epoch on, as for a dataset on
disk); SGD steps of the student's prompts and projector, batch 8 (the recipes'). Whole epochs are timed in
turns (promptclip, naive, ...) in this process's CPU time, which other processes on a loaded machine do not
inflate, and the medians compared; only ratios are written (to BENCHMARKS.md, section `promptkd-cache-cpu`).

    OMP_NUM_THREADS=1 python benchmarks/promptkd_cache.py
    OMP_NUM_THREADS=1 python benchmarks/promptkd_cache.py --images 128 --repeats 5 --no-write
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import NoisePhotos, interleaved_medians, machine_description, write_section
from speed_paths import promptkd_teacher_every_epoch

from promptclip.clip.model import CLIP, ArchConfig
from promptclip.data.crop_cache import CropCache
from promptclip.data.datasets.base import DatasetSplits, Datum
from promptclip.data.loader import EpochLoader, build_loader
from promptclip.methods.base import get_prompt_model
from promptclip.methods.promptkd import PromptKD, PromptKDConfig

PICTURE_SIZE = (500, 375)  # width, height: a typical photo of the field's datasets
IMAGE_SIZE, PATCH = 96, 16


def arch(name: str, width: int, layers: int, embed: int) -> ArchConfig:
    return ArchConfig.from_dict(
        {
            "name": name,
            "embed_dim": embed,
            "vision": {
                "image_size": IMAGE_SIZE,
                "width": width,
                "layers": layers,
                "heads": width // 64,
                "patch_size": PATCH,
            },
            "text": {"width": embed, "heads": embed // 64, "layers": 2},
        }
    )


def frozen_clip(cfg: ArchConfig, seed: int) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(cfg).requires_grad_(False).eval()


def training_loader(images: int, classes: int, batch: int) -> EpochLoader:
    names = [f"class {c}" for c in range(classes)]
    train = [Datum(f"train/{i}.jpg", i % classes, names[i % classes]) for i in range(images)]
    splits = DatasetSplits("noise", None, names, "a photo of a {}.", train, [], [], reader=NoisePhotos(PICTURE_SIZE))
    return build_loader(
        splits, "train", batch_size=batch, image_size=IMAGE_SIZE, seed=1, augment=False, crop_cache=CropCache()
    )


def build_student(args: argparse.Namespace, classes: int) -> PromptKD:
    student_arch = arch("student", args.width, args.layers, 128)
    teacher_arch = arch("teacher", args.width * 3 // 2, args.layers * 2, 192)
    names = [f"class {c}" for c in range(classes)]
    teacher = get_prompt_model(frozen_clip(teacher_arch, 1), {"method": "zeroshot"}, names)
    torch.manual_seed(2)
    cfg = PromptKDConfig(depth_vision=args.layers)
    return PromptKD(frozen_clip(student_arch, 0), names, cfg, teacher=teacher).train()


def run_epoch(student: PromptKD, loader: EpochLoader, optimizer: torch.optim.Optimizer, number: int) -> None:
    loader.set_epoch(number)
    for batch in loader:
        optimizer.zero_grad(set_to_none=True)
        sum(student.loss(batch, student(batch)).values()).backward()  # type: ignore[union-attr]
        optimizer.step()


def measure(args: argparse.Namespace) -> dict[str, float]:
    loader = training_loader(args.images, args.classes, args.batch)
    student = build_student(args, args.classes)
    optimizer = torch.optim.SGD(list(student.trainable_parameters().values()), lr=1e-3, momentum=0.9)
    epochs = iter(range(1, 10**6))
    run_epoch(student, loader, optimizer, 0)  # reads and keeps the crops, keeps the teacher's features
    kept = len(student.teacher_cache.rows)
    if kept != len(loader) * args.batch:
        raise RuntimeError(f"the first epoch kept {kept} teacher features, expected one per trained image")

    def ours() -> None:
        hits = student.teacher_cache.hits
        run_epoch(student, loader, optimizer, next(epochs))
        if student.teacher_cache.hits - hits != len(loader) * args.batch:
            raise RuntimeError("a later epoch ran the teacher's image tower")

    def naive() -> None:
        with promptkd_teacher_every_epoch(student):
            run_epoch(student, loader, optimizer, next(epochs))

    def first() -> None:  # an epoch that keeps the features: what keeping them costs
        student.teacher_cache.clear()
        run_epoch(student, loader, optimizer, next(epochs))

    return interleaved_medians(
        {"naive": naive, "ours": ours, "first": first}, args.repeats, warmup=0, clock=time.process_time
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="student image tower width (teacher: 1.5 x)")
    parser.add_argument("--layers", type=int, default=4, help="student image tower layers (teacher: 2 x)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    times = measure(args)
    command = "OMP_NUM_THREADS=1 python benchmarks/promptkd_cache.py " + " ".join(argv or sys.argv[1:])
    rows = [
        f"| a later epoch: teacher features kept vs encoded again | {times['naive'] / times['ours']:.2f}x |",
        f"| the first epoch, which keeps them, vs encoding without keeping | {times['naive'] / times['first']:.2f}x |",
    ]
    body = "\n".join(
        [
            "## PromptKD's teacher features kept across epochs (CPU, 1 thread)",
            "",
            f"`{command.strip()}` on {machine_description()}. Ratio of median CPU times of whole training epochs, "
            f"naive / promptclip ({args.repeats} repeats, interleaved); the same losses and gradients either way "
            f"(tests/test_promptkd_cache.py). `data.augment none`, {args.images} images of {PICTURE_SIZE[0]} x "
            f"{PICTURE_SIZE[1]}, batch {args.batch}, {IMAGE_SIZE} px; student image tower {args.layers} layers of "
            f"width {args.width} (every layer prompted), teacher {2 * args.layers} layers of width "
            f"{args.width * 3 // 2}, patch {PATCH} for both: 4.5 times the student's matmul work per image, as "
            "ViT-L/14 is about 4.6 times ViT-B/16's.",
            "",
            "| epoch | speed-up |",
            "| --- | ---: |",
            *rows,
        ]
    )
    print(body)
    if not args.no_write:
        write_section("promptkd-cache-cpu", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
