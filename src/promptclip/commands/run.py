"""`promptclip run PROTOCOL`: expand a protocol into run specs and execute them (skipping finished runs).

Also the helpers the other training commands share: recipe lookup, config loading with `--opts`, and the
translation of the errors a user can fix into `CLIError`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from promptclip.config import ConfigError, RunConfig, apply_overrides, build_run_config, load_recipe
from promptclip.recipes import recipe_name, resolve_recipe

# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix (bad config, data, weights, checkpoints, run folders) into `CLIError`."""
    from promptclip.errors import CLIError, user_error_message

    try:
        yield
    except CLIError:
        raise
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        raise CLIError(message) from None


def load_config(
    recipe: Path | None,
    method: str | None = None,
    opts: Sequence[str] = (),
    data_overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """The run config of a recipe (or the defaults), `--method`, direct data flags and `--opts` overrides."""
    data = load_recipe(recipe) if recipe is not None else {}
    source = str(recipe) if recipe is not None else "command line"
    if method:
        # A plain method's recipe may take plug-ins on top: `--recipe maple/... --method maple+dapt`.
        if data.get("method") not in (None, method, method.split("+")[0]):
            raise ConfigError(
                f"{source}: this recipe is for method {data['method']!r}, not {method!r}; pick a "
                f"{method.split('+')[0]}/... recipe (`promptclip list recipes`) or leave out --method"
            )
        data["method"] = method
    elif "method" not in data:
        raise ConfigError(f"{source}: no method given; pass --method (see `promptclip list methods`) or a recipe")
    if data_overrides:
        data["data"] = with_data_overrides(data.get("data") or {}, data_overrides, source)
    return build_run_config(apply_overrides(data, list(opts)), source=source)


def with_data_overrides(section: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """The recipe's `data` section with the flags given (None: not given); `name` (--name) is a dataset option."""
    section = dict(section)
    given = {key: value for key, value in overrides.items() if value is not None}
    if "name" in given:
        options = section.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: data.options must be a mapping of dataset options, not {options!r}")
        section["options"] = {**options, "name": given.pop("name")}
    section.update(given)
    return section


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every training command takes."""
    parser.add_argument("--root", help="data root holding the dataset folders (CoOp's DATA layout)")
    parser.add_argument(
        "--name",
        help="name of your own data (folder, csv) in run folders and reports, i.e. data.options.name "
        "(default: the root folder's name)",
    )
    parser.add_argument(
        "--opts",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY VALUE",
        help="config overrides as dotted key / value pairs, e.g. --opts optim.epochs 5 data.batch_size 16",
    )
    parser.add_argument("--runs-dir", help="root of the run folders (default: the config's output_dir, 'runs')")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs from checkpoints/last.pt")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="a run folder that holds something else (your files, a run of another configuration, an interrupted "
        "run) is moved aside to <folder>.replaced-<time> and the run starts there; nothing is deleted",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (off anyway without a TTY)")
    parser.add_argument("--tensorboard", action="store_true", help="also log to <run>/tensorboard (needs tensorboard)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary (log.txt still gets it all)")


def run_options(args: argparse.Namespace, cfg: RunConfig) -> Any:
    from promptclip.runs import RunOptions

    return RunOptions(
        resume=args.resume,
        overwrite=args.overwrite,
        progress=False if (args.no_progress or args.quiet) else None,
        tensorboard=args.tensorboard,
        echo=not args.quiet,
        allow_torchscript=backbone_named_on_command_line(args.opts, cfg),
    )


def backbone_named_on_command_line(opts: Sequence[str], cfg: RunConfig) -> bool:
    """Whether `--opts` named the weights path the run opens (model.weights, or model.arch when no weights file
    is set, or the whole model section): only then may it be a TorchScript archive. A recipe is a file, and a
    path read from a file never opens one."""
    keys = set(opts[::2])
    return ("model.weights" if cfg.model.weights is not None else "model.arch") in keys or "model" in keys


def split_list(text: str | None, cast: type = str, what: str = "") -> list[Any] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [cast(item) for item in items]
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected a comma-separated list of {cast.__name__} values") from None


# ---------------------------------------------------------------------------------------------------------
# promptclip run
# ---------------------------------------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from promptclip.protocols.spec import PROTOCOL_NAMES

    parser = subparsers.add_parser(
        "run",
        help="run a protocol sweep (few-shot, base-to-novel, cross-dataset, ...)",
        description="Expand a protocol into runs (datasets x shots x seeds, ...) and execute them; a run is "
        "skipped when a finished run of the same configuration (identity) exists.",
    )
    parser.add_argument("protocol", choices=PROTOCOL_NAMES)
    parser.add_argument("--method", help="method (and plug-ins), e.g. coop or maple+dapt; default: the recipe's")
    parser.add_argument("--recipe", help="recipe file or name from `promptclip list recipes` (e.g. coop/vit_b16_ctxv1)")
    parser.add_argument(
        "--datasets", help="comma-separated datasets (transfer protocols: the sources, default imagenet)"
    )
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    parser.add_argument(
        "--shots", help="comma-separated shots per class (few_shot default 1,2,4,8,16; others: data.shots)"
    )
    parser.add_argument(
        "--targets", help="transfer targets (cross_dataset / domain_generalization); default the field's"
    )
    parser.add_argument("--ratios", help="data_efficient ratios (default 0.05,0.1,0.2,0.3,0.5,1.0)")
    parser.add_argument("--selectors", help="data_efficient selectors (default uniform; `promptclip list selectors`)")
    parser.add_argument("--shard", help="i/n: run every n-th spec starting at i (0-based: 0/4 .. 3/4)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done; run nothing")
    parser.add_argument("--keep-going", action="store_true", help="report a failed run and go on with the sweep")
    add_run_flags(parser)
    parser.set_defaults(func=run_protocol)


def run_protocol(args: argparse.Namespace) -> int:
    from promptclip.errors import CLIError

    with user_errors():
        specs, cfg = plan(args)
        if args.dry_run:
            return dry_run(specs, cfg)
        from promptclip.runs import run_specs

        outcomes = run_specs(specs, cfg, run_options(args, cfg), keep_going=args.keep_going)
    failed = [o for o in outcomes if o.status == "failed"]
    from promptclip.engine.distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 alone reports
        return 1 if failed else 0
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    busy = sum(o.status == "busy" for o in outcomes)
    elsewhere = f", {busy} left to another running sweep (run again later to pick them up)" if busy else ""
    print(f"{done} runs finished, {skipped} skipped (done before){elsewhere}, {len(failed)} failed")
    if failed:
        raise CLIError(f"{len(failed)} runs failed; see log.txt in: " + ", ".join(str(o.spec.run_dir) for o in failed))
    return 0


DRY_RUN_STATES = {
    "empty": "todo",
    "finished": "done",
    "started": "todo",
    "interrupted": "interrupted (--resume continues it)",
    "other": "blocked (holds another run; --overwrite moves it aside)",
    "foreign": "blocked (holds other files; --overwrite moves them aside)",
}


def dry_run(specs: Sequence[Any], cfg: RunConfig) -> int:
    """Print each run's folder and state (done, todo, interrupted, blocked) without running or writing."""
    from promptclip.runs import plan_run

    done = 0
    for spec in specs:
        planned = plan_run(spec, cfg)
        state = planned.state().value
        done += state == "finished"
        print(f"{DRY_RUN_STATES[state]}  {planned.run_dir.path}  ({spec.describe()})")
    print(f"{len(specs)} runs, {done} done, {len(specs) - done} to run")
    return 0


def plan(args: argparse.Namespace) -> tuple[list[Any], RunConfig]:
    """The specs of this invocation (after --shard) and the base config."""
    from promptclip.protocols.spec import Sweep, expand, parse_shard, take_shard

    recipe = resolve_recipe(args.recipe) if args.recipe else None
    cfg = load_config(recipe, args.method, args.opts, {"root": args.root, "name": args.name})
    default_sources = [cfg.data.dataset] if args.protocol not in ("cross_dataset", "domain_generalization") else []
    sweep = Sweep(
        datasets=split_list(args.datasets, str, "--datasets") or default_sources,
        seeds=split_list(args.seeds, int, "--seeds") or [],
        shots=split_list(args.shots, int, "--shots"),
        targets=split_list(args.targets, str, "--targets"),
        ratios=split_list(args.ratios, float, "--ratios"),
        selectors=split_list(args.selectors, str, "--selectors"),
        runs_dir=Path(args.runs_dir or cfg.output_dir),
        recipe=recipe_name(recipe),
    )
    specs = expand(args.protocol, cfg, sweep)
    if args.shard:
        index, count = parse_shard(args.shard)
        specs = take_shard(specs, index, count)
    return specs, cfg
