"""`promptclip pretrain`: contrastive pretraining of the tiny CLIP on the synthetic world.

The bundled `tiny-synthetic` weights were made by this command (see docs/tiny-clip.md). It writes a
resumable `checkpoint.pt` and `metrics.json` into `--out`, and at the end the weights as fp16 safetensors
with their architecture JSON, printing the file's sha256 and the zero-shot accuracy on every synthetic task.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("runs") / "pretrain" / "tiny-synthetic"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    # The defaults come from PretrainConfig, whose package imports torch: the options are added only when
    # this command is chosen (promptclip.cli.CommandParser).
    subparsers.add_parser(
        "pretrain",
        help="pretrain the tiny CLIP on the synthetic world (image-caption contrastive)",
        description="Contrastive image-caption pretraining of a tiny CLIP on the synthetic world. Resumes from "
        "OUT/checkpoint.pt when it exists (same settings), so an interrupted run continues where it stopped.",
        options=add_pretrain_options,
    )


def add_pretrain_options(parser: argparse.ArgumentParser) -> None:
    from promptclip.pretraining import PretrainConfig

    defaults = PretrainConfig()
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--export", type=Path, default=None, help="weights file to write (default OUT/tiny-synthetic.safetensors)"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--partial-captions",
        type=float,
        default=defaults.partial_caption_prob,
        help="fraction of captions naming only some attributes (default %(default)s)",
    )
    parser.add_argument(
        "--twin-fraction",
        type=float,
        default=defaults.twin_fraction,
        help="fraction of each batch made of shape twins (default %(default)s)",
    )
    parser.add_argument(
        "--world",
        choices=("kinds", "shapes"),
        default=defaults.world,
        help="kinds: every shape, kind, colour and scene; shapes: the ten plain shapes and ten scenes only "
        f"(default {defaults.world})",
    )
    parser.add_argument("--init", default=None, help="weights file to start from (default: random initialisation)")
    parser.add_argument(
        "--crop-fraction",
        type=float,
        default=defaults.crop_fraction,
        help=f"fraction of images shown as a zoomed-in crop (default {defaults.crop_fraction})",
    )
    parser.add_argument(
        "--style-fraction",
        type=float,
        default=defaults.style_fraction,
        help=f"fraction of images shown pixelated, noisy or faded (default {defaults.style_fraction})",
    )
    parser.add_argument("--min-lr", type=float, default=defaults.min_lr)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between zero-shot checks")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=defaults.precision)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this call (resume later)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/checkpoint.pt exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from promptclip.errors import CLIError
    from promptclip.pretraining import (
        PretrainConfig,
        PretrainError,
        build_probes,
        export_weights,
        format_zero_shot_table,
        pretrain,
        set_threads,
        zero_shot_accuracy,
        zero_untrained_tokens,
    )

    set_threads(args.threads)
    cfg = PretrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        partial_caption_prob=args.partial_captions,
        twin_fraction=args.twin_fraction,
        world=args.world,
        init=args.init,
        crop_fraction=args.crop_fraction,
        style_fraction=args.style_fraction,
        min_lr=args.min_lr,
        eval_every=args.eval_every,
        precision=args.precision,
    )
    try:
        result = pretrain(
            cfg,
            args.out,
            resume=not args.no_resume,
            device=args.device,
            progress=not args.no_progress,
            stop_after=args.stop_after,
        )
    except PretrainError as err:
        raise CLIError(str(err)) from None
    finished = bool(result.history) and result.history[-1]["step"] == cfg.steps
    if not finished:
        done = result.history[-1]["step"] if result.history else 0
        print(f"stopped at step {done}/{cfg.steps}; run the same command again to continue")
        return 0
    export = args.export or args.out / "tiny-synthetic.safetensors"
    if result.trained_tokens is not None:
        kept = zero_untrained_tokens(result.model, result.trained_tokens)
        print(f"token embedding: {kept} rows trained; the other rows (never seen) are stored as zeros")
    sha256 = export_weights(result.model, export)
    print(f"weights: {export} (fp16 safetensors, sha256 {sha256})")
    print("zero-shot accuracy (%) on the test split of each synthetic task:")
    print(format_zero_shot_table(zero_shot_accuracy(result.model, build_probes("test", 32))))
    return 0
