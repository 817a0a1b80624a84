"""`promptclip train --recipe FILE`: one training run, evaluated on the classes it was trained on (and on the
new half when it trained on the base half)."""

from __future__ import annotations

import argparse
from pathlib import Path

from promptclip.commands.run import add_run_flags, load_config, run_options, user_errors
from promptclip.recipes import recipe_name, resolve_recipe


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one prompt from a recipe and evaluate it",
        description="One run: train on data.dataset (data.shots per class, data.subsample classes) with the "
        "recipe's method and optimiser, save the prompt, evaluate on the test split, write results.json.",
    )
    parser.add_argument("--recipe", help="recipe file or name from `promptclip list recipes` (e.g. coop/vit_b16_ep50)")
    parser.add_argument("--method", help="method, when no recipe is given (or to check the recipe's)")
    parser.add_argument("--dataset", help="dataset name (overrides data.dataset)")
    parser.add_argument("--shots", type=int, help="images per class (overrides data.shots; 0 = all)")
    parser.add_argument("--subsample", choices=["all", "base", "new"], help="classes to train on (data.subsample)")
    parser.add_argument("--seed", type=int, help="seed (overrides seed)")
    parser.add_argument("--output", help="the run folder (default: <runs>/<protocol>/<dataset>/<method>/<recipe>/...)")
    add_run_flags(parser)
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from promptclip.protocols.spec import single_run_spec
    from promptclip.runs import execute

    with user_errors():
        recipe = resolve_recipe(args.recipe) if args.recipe else None
        overrides = {
            "dataset": args.dataset,
            "shots": args.shots,
            "subsample": args.subsample,
            "root": args.root,
            "name": args.name,
        }
        cfg = load_config(recipe, args.method, args.opts, overrides)
        if args.seed is not None:
            cfg.seed = args.seed
        spec = single_run_spec(cfg, recipe_name(recipe), Path(args.runs_dir or cfg.output_dir), args.output)
        outcome = execute(spec, cfg, run_options(args, cfg))
    run_dir = outcome.run_dir.path if outcome.run_dir is not None else spec.run_dir
    if outcome.status == "skipped":
        print(f"already finished: {run_dir / 'results.json'} (same configuration; --overwrite runs it again)")
        return 0
    from promptclip.engine.distributed import is_main_process

    if args.quiet and is_main_process():  # otherwise the run's log has already shown all of this
        for key, entry in (outcome.results.evaluations if outcome.results else {}).items():
            print(f"{key}: {entry.accuracy:.2f}% ({sum(entry.correct)}/{entry.num_samples})")
        print(f"results: {run_dir / 'results.json'}")
    return 0
