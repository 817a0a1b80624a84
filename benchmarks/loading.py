"""Training-image loading of a few-shot set: decoded from disk every epoch, against decoded once and kept.

Usage: python benchmarks/loading.py [--classes 10] [--shots 16] [--repeats 5] [--no-write]

A few-shot training set (`--shots` JPEG pictures of 500x375 per class, written to a temporary folder) is read
for one epoch of 224 px training crops in three ways, timed in turns:

* `disk`: the loader decodes each JPEG every epoch (`build_loader(..., in_memory=False)`), then crops and
  flips it with PIL (the field's way);
* `memory`: the loader decodes every picture once and crops the decoded copy each epoch (`in_memory=True`,
  what the runner uses for sets up to 2000 images) -- the same batches, bit for bit;
* `tensors`: the decoded pictures kept as uint8 tensors, cropped and flipped on tensors
  (`random_resized_crop_tensor`, the same crop boxes and flips, resized as PIL resizes with torch's kernels;
  pixels differ only at rare rounding ties, reported below).

Writes the `loading` section of BENCHMARKS.md (ratios only: this is a CPU measurement).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, machine_description, write_section

from promptclip.clip.transforms import normalize, random_resized_crop_tensor
from promptclip.data.datasets.base import DatasetSplits, Datum
from promptclip.data.loader import _SAMPLE, build_loader, derive_seed

IMAGE_SIZE = 224


def write_pictures(folder: Path, classes: int, shots: int) -> DatasetSplits:
    """`shots` smooth random 500x375 JPEG pictures per class (photo-like sizes and compression)."""
    rng = np.random.default_rng(0)
    train = []
    for label in range(classes):
        for shot in range(shots):
            low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            picture = Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC)
            path = f"class{label}/img{shot}.jpg"
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            picture.save(folder / path, quality=90)
            train.append(Datum(path, label, f"class {label}"))
    names = [f"class {i}" for i in range(classes)]
    return DatasetSplits("pictures", folder, names, "a photo of a {}.", train, [], [])


def epoch_of(loader: object, epoch: int) -> list[torch.Tensor]:
    loader.set_epoch(epoch)  # type: ignore[attr-defined]
    return [batch["image"] for batch in loader]  # type: ignore[attr-defined]


class TensorPictures:
    """The decoded pictures as uint8 tensors, cropped and flipped on tensors with the loader's draws."""

    def __init__(self, splits: DatasetSplits, seed: int) -> None:
        self.data = splits.train
        self.seed = seed
        self.pixels = [
            torch.from_numpy(np.asarray(splits.load_image(d), dtype=np.uint8).copy()).permute(2, 0, 1)
            for d in self.data
        ]

    def item(self, index: int, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(_SAMPLE, self.seed, epoch, index))
        crop, _ = random_resized_crop_tensor(self.pixels[index], IMAGE_SIZE, generator)
        return normalize(crop)

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        return [self.item(index, epoch) for index in range(len(self.data))]


def run(classes: int, shots: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        splits = write_pictures(Path(folder), classes, shots)
        options = {"batch_size": 32, "image_size": IMAGE_SIZE, "seed": 1, "shuffle": False, "drop_last": False}
        disk = build_loader(splits, "train", **options)  # type: ignore[arg-type]
        memory = build_loader(splits, "train", in_memory=True, **options)  # type: ignore[arg-type]
        tensors = TensorPictures(splits, seed=1)
        same = all(torch.equal(a, b) for a, b in zip(epoch_of(disk, 0), epoch_of(memory, 0), strict=True))
        pil = torch.cat(epoch_of(disk, 0))
        on_tensors = torch.stack(tensors.epoch(0))
        # Compare in 8-bit levels (the float noise of normalising is far below a level).
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        difference = ((pil - on_tensors) * std * 255.0).abs()
        counter = iter(range(1, 10_000))
        medians = interleaved_medians(
            {
                "disk": lambda: epoch_of(disk, next(counter)),
                "memory": lambda: epoch_of(memory, next(counter)),
                "tensors": lambda: tensors.epoch(next(counter)),
            },
            repeats,
            clock=time.process_time,  # CPU time: other processes' load does not count against a path
        )
    return {
        **{f"{k}_s": v for k, v in medians.items()},
        "images": len(splits.train),
        "identical": float(same),
        "differing": float((difference > 0.01).float().mean()),
        "max_levels": float(difference.max().round()),
    }


def report(result: dict[str, float], repeats: int, command: str) -> str:
    disk = result["disk_s"]
    memory, tensors = f"**{disk / result['memory_s']:.1f}x**", f"**{disk / result['tensors_s']:.1f}x**"
    identical = "bit for bit identical" if result["identical"] else "NOT identical"
    return f"""## Few-shot training images: decoded every epoch, or once

`{command}`

Machine: {machine_description()}.

One epoch of {int(result["images"])} training crops ({IMAGE_SIZE} px) of 500x375 JPEG pictures, read through
the loader without workers, one thread; median CPU time of {repeats} epochs each, timed in turns.

| pictures | speed-up over decoding every epoch |
|---|---:|
| decoded from disk every epoch, cropped with PIL | 1.0 |
| decoded once and kept (`in_memory`, the runner's default up to 2000 images), cropped with PIL | {memory} |
| decoded once as uint8 tensors, cropped on tensors (`random_resized_crop_tensor`) | {tensors} |

Kept pictures give batches {identical} to decoding every epoch. Tensor crops use the same crop boxes and flips
and PIL's two rounded passes; {result["differing"]:.3%} of the values differ from PIL's, by at most
{result["max_levels"]:.0f} 8-bit level(s) (rounding ties of PIL's fixed-point weights). The loader offers them
on the device (`pixels="decoded"`, `data.crop_on_device`).
(On a CPU only ratios measured side by side in one run are reported.)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.classes, args.shots, args.repeats)
    command = "python benchmarks/loading.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--no-write")
    text = report(result, args.repeats, command)
    print(text)
    if not args.no_write:
        write_section("loading", text)


if __name__ == "__main__":
    main()
