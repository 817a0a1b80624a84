"""Text-tower time with and without end-of-text truncation, for a ViT-B/16-sized text tower.

Usage: python benchmarks/text_tower.py [--repeats 7] [--threads N] [--no-write]

Encodes 100 class prompts ("a photo of a {class}.") with random ViT-B/16 text-tower weights, once on full
77-token sequences and once cut after the batch's last end-of-text token, alternating the two for each
repeat; prints the medians, their ratio and the largest difference between the two outputs, and writes them
into BENCHMARKS.md (section `text_tower`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, machine_description, write_section

from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import tokenize
from promptclip.clip.weights import arch_config

CLASSNAMES = [
    "goldfish", "great white shark", "tree frog", "loggerhead turtle", "bald eagle", "barn owl", "flamingo",
    "king penguin", "golden retriever", "german shepherd dog", "siberian husky", "tabby cat", "persian cat",
    "red fox", "brown bear", "giant panda", "african elephant", "zebra", "hippopotamus", "koala", "kangaroo",
    "monarch butterfly", "ladybug", "honey bee", "starfish", "sea anemone", "jellyfish", "hermit crab",
    "airliner", "fire truck", "school bus", "mountain bike", "sports car", "steam locomotive", "canoe",
    "container ship", "hot air balloon", "space shuttle", "tractor", "ambulance", "acoustic guitar",
    "grand piano", "violin", "trombone", "drum", "harmonica", "banana", "granny smith apple", "strawberry",
    "pineapple", "lemon", "pomegranate", "broccoli", "cauliflower", "bell pepper", "mushroom", "pizza",
    "cheeseburger", "hot dog", "ice cream", "chocolate cake", "french fries", "caesar salad", "sushi",
    "pad thai", "apple pie", "espresso", "red wine", "teapot", "frying pan", "wooden spoon", "coffee mug",
    "water bottle", "laptop computer", "computer keyboard", "cellular telephone", "digital clock",
    "table lamp", "rocking chair", "four-poster bed", "bookcase", "umbrella", "backpack", "running shoe",
    "cowboy hat", "sunglasses", "wristwatch", "teddy bear", "soccer ball", "tennis racket", "volcano",
    "coral reef", "alpine lake", "sandy beach", "lighthouse", "suspension bridge", "castle", "windmill",
    "sunflower", "pink primrose",
]  # fmt: skip


def vit_b16_text_tower() -> CLIP:
    """Random ViT-B/16 text-tower weights (a tiny image tower stands in: it is not timed)."""
    b16 = arch_config("ViT-B-16")
    cfg = dataclasses.replace(b16, name="ViT-B-16 text tower", vision=arch_config("tiny-vit").vision)
    torch.manual_seed(0)
    return CLIP(cfg).eval()


def run(repeats: int) -> dict[str, float]:
    assert len(CLASSNAMES) == 100
    model = vit_b16_text_tower()
    tokens = tokenize([f"a photo of a {name}." for name in CLASSNAMES])
    eot = tokens.argmax(dim=-1)
    with torch.inference_mode():
        full = model.encode_text(tokens, truncate=False)
        cut = model.encode_text(tokens, truncate=True)
        medians = interleaved_medians(
            {
                "full": lambda: model.encode_text(tokens, truncate=False),
                "cut": lambda: model.encode_text(tokens, truncate=True),
            },
            repeats,
        )
    full_s, cut_s = medians["full"], medians["cut"]
    return {
        "full_ms": full_s * 1e3,
        "cut_ms": cut_s * 1e3,
        "speedup": full_s / cut_s,
        "max_abs_diff": (full - cut).abs().max().item(),
        "cut_length": int(eot.max()) + 1,
        "mean_eot": float(eot.float().mean()) + 1,
    }


def report(result: dict[str, float], repeats: int, command: str) -> str:
    return f"""## Text tower: end-of-text truncation

`{command}`

Machine: {machine_description()}.

A ViT-B/16-sized text tower (12 layers, width 512, random weights) encodes 100 class prompts
"a photo of a {{class}}." (class names of 1-4 words; {result["mean_eot"]:.1f} tokens on average with the start
and end tokens). Median of {repeats} runs each, fp32, `torch.inference_mode`.

| sequence | tokens per prompt | time, relative to the full context |
|---|---:|---:|
| full context | 77 | 1.00 |
| cut after the last end-of-text | {result["cut_length"]} | {result["cut_ms"] / result["full_ms"]:.3f} |

(On a CPU only ratios measured side by side in one run are reported; absolute times depend on the machine's
load.)

Speed-up: **{result["speedup"]:.1f}x**. Largest absolute difference between the two outputs:
{result["max_abs_diff"]:.1e} (the causal mask makes the cut exact; the difference is float rounding).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each variant (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.repeats)
    command = "python benchmarks/text_tower.py" + (f" --threads {args.threads}" if args.threads else "")
    text = report(result, args.repeats, command)
    print(text)
    if not args.no_write:
        write_section("text_tower", text)


if __name__ == "__main__":
    main()
