"""Rendering throughput of the synthetic world on one CPU core.

Usage: python benchmarks/synthetic_world.py [--count 5000] [--sizes 32 64 224]

Pins the process to one core and one BLAS/OpenMP thread, renders ``count`` pretraining specs (image and
exact mask) at each size and prints images per second.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

from promptclip.data.synthetic import render, sample_pretraining_specs  # noqa: E402


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"core {core}"
    return "unpinned (no sched_setaffinity on this platform)"


def images_per_second(count: int, image_size: int) -> float:
    specs = sample_pretraining_specs(count, seed=0)
    for spec in specs[:50]:  # warm the coordinate-grid caches
        render(spec, image_size)
    start = time.perf_counter()
    for spec in specs:
        render(spec, image_size)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="images rendered per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224], help="image sides in pixels")
    args = parser.parse_args()
    where = pin_to_one_core()
    print(f"synthetic world rendering, one thread, {where}, {platform.processor() or platform.machine()}")
    for size in args.sizes:
        print(f"  {size:4d} px: {images_per_second(args.count, size):8.0f} images/s (image + exact mask)")


if __name__ == "__main__":
    main()
