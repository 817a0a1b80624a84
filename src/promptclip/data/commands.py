"""`promptclip data {check,fewshot,info}`, and the dataset/mask options other commands reuse.

    promptclip data check   --dataset NAME --root DIR [--masks] [--ignore-sizes]
    promptclip data fewshot --dataset NAME --root DIR --shots K --seed S [--print | --out FILE]
    promptclip data info    --dataset NAME --root DIR

Dataset options are given as `--set KEY=VALUE` (repeatable); `--csv FILE`, `--classnames FILE` and
`--name NAME` are shortcuts for the user-data datasets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, get_args

import yaml

from promptclip.data.datasets import build_dataset
from promptclip.data.datasets.base import DatasetError, DatasetSplits, write_text_atomic
from promptclip.data.datasets.check import CheckOptions, CheckReport, check_dataset
from promptclip.data.fewshot import describe_short, draw_fewshot, draw_to_json, lists_digest, load_or_draw
from promptclip.data.masks import IgnoreAs, MaskConfig, MaskEncoding, MaskFallback, MaskRule

DEFAULT_LIST_LIMIT = 20
NAME_HELP = (
    "name of your own data (folder, csv) in run folders and reports: letters, digits, _-. "
    "(default: the root folder's name; csv: <folder>-<CSV stem>)"
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="check a dataset folder, draw few-shot splits, describe datasets")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: _print_help(data))

    check = actions.add_parser(
        "check",
        help="verify a dataset folder before training (all problems, with fixes; non-zero exit if any)",
    )
    add_dataset_arguments(check)
    check.add_argument("--masks", action="store_true", help="also check that every training image has a mask")
    add_mask_arguments(check, with_fallback=False)
    check.add_argument(
        "--ignore-sizes", action="store_true", help="do not compare class count and split sizes with the published ones"
    )
    check.add_argument("--full-decode", action="store_true", help="decode every image fully (slower, stricter)")
    check.add_argument("--workers", type=int, default=8, help="threads that read images (default 8)")
    check.add_argument(
        "--max-list",
        type=int,
        default=DEFAULT_LIST_LIMIT,
        help=f"paths listed per problem (default {DEFAULT_LIST_LIMIT}; 0 lists all)",
    )
    check.set_defaults(func=run_check)

    fewshot = actions.add_parser("fewshot", help="draw (or show) the K-shot split of a seed, as the field does")
    add_dataset_arguments(fewshot)
    fewshot.add_argument("--shots", type=int, required=True, help="images per class (K >= 1)")
    fewshot.add_argument("--seed", type=int, default=1, help="the run's seed (default 1)")
    fewshot.add_argument("--cache-dir", help="few-shot cache folder (default $PROMPTCLIP_CACHE/fewshot)")
    fewshot.add_argument("--out", help="also write the draw as JSON to this file")
    fewshot.add_argument("--print", action="store_true", dest="print_json", help="print the draw's JSON")
    fewshot.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    fewshot.set_defaults(func=run_fewshot)

    info = actions.add_parser("info", help="class names, template and split sizes of a dataset")
    add_dataset_arguments(info)
    info.set_defaults(func=run_info)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --root, --csv, --classnames, --name, --set KEY=VALUE (every command that reads a dataset)."""
    parser.add_argument("--dataset", required=True, help="a name from `promptclip list datasets`")
    parser.add_argument("--root", help="the data root that holds the dataset folder (or the dataset folder itself)")
    parser.add_argument("--csv", help="CSV file of the `csv` dataset (path,label[,classname][,split])")
    parser.add_argument("--classnames", help="JSON file of class names (user-data datasets)")
    parser.add_argument("--name", help=NAME_HELP)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="dataset_options",
        help="a dataset option, e.g. --set split_seed=2 (repeatable)",
    )


def add_mask_arguments(parser: argparse.ArgumentParser, with_fallback: bool = True) -> None:
    """--mask-rule, --mask-dir, --mask-encoding, --mask-ignore-as [, --mask-fallback]."""
    parser.add_argument("--mask-rule", choices=get_args(MaskRule), help="how a mask file is found (default mirror)")
    parser.add_argument("--mask-dir", help="mask folder (default <dataset dir>/mask)")
    parser.add_argument("--mask-encoding", choices=get_args(MaskEncoding), help="mask values (default auto)")
    parser.add_argument(
        "--mask-ignore-as", choices=get_args(IgnoreAs), help="label-index 255 pixels (default background)"
    )
    if with_fallback:
        parser.add_argument(
            "--mask-fallback", choices=get_args(MaskFallback), help="a missing mask: error (default), full or skip"
        )


def parse_option_value(text: str) -> Any:
    """A command-line option value: YAML scalars (numbers, booleans, null), anything else kept as text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool)) or value is None else text


def dataset_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of `build_dataset` given by --set, --csv and --classnames."""
    options: dict[str, Any] = {}
    for item in args.dataset_options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DatasetError(f"--set {item!r} is not KEY=VALUE")
        options[key.strip()] = parse_option_value(value)
    for key in ("csv", "classnames", "name"):
        if getattr(args, key, None):
            options[key] = getattr(args, key)
    return options


def mask_config_from_args(args: argparse.Namespace) -> MaskConfig | None:
    """A `MaskConfig` if any mask option (or --masks) is given, else None."""
    given = {
        "rule": getattr(args, "mask_rule", None),
        "mask_dir": getattr(args, "mask_dir", None),
        "encoding": getattr(args, "mask_encoding", None),
        "ignore_as": getattr(args, "mask_ignore_as", None),
        "fallback": getattr(args, "mask_fallback", None),
    }
    chosen = {key: value for key, value in given.items() if value is not None}
    if not chosen and not getattr(args, "masks", False):
        return None
    return MaskConfig(**chosen)


def _cli_error(err: Exception) -> Exception:
    from promptclip.errors import CLIError

    return CLIError(str(err))


def _build(args: argparse.Namespace) -> DatasetSplits:
    try:
        return build_dataset(args.dataset, args.root, **dataset_options_from_args(args))
    except DatasetError as err:
        raise _cli_error(err) from None


def run_check(args: argparse.Namespace) -> int:
    try:
        options = dataset_options_from_args(args)
        settings = CheckOptions(
            check_sizes=not args.ignore_sizes,
            full_decode=args.full_decode,
            workers=args.workers,
            mask_config=mask_config_from_args(args),
        )
    except DatasetError as err:
        raise _cli_error(err) from None
    report = check_dataset(args.dataset, args.root, options, settings)
    print_report(report, args.max_list)
    return 0 if report.ok else 1


def print_report(report: CheckReport, max_list: int = DEFAULT_LIST_LIMIT) -> None:
    print(f"Checking {report.dataset}" + (f" in {report.location}" if report.location else ""))
    for fact in report.facts:
        print(f"  {fact}")
    for number, problem in enumerate(report.problems, start=1):
        print(f"\nProblem {number}: {problem.title}")
        shown = problem.items if max_list <= 0 else problem.items[:max_list]
        for item in shown:
            print(f"    {item}")
        if len(shown) < len(problem.items):
            print(f"    ... and {len(problem.items) - len(shown)} more (--max-list 0 lists all)")
        print(f"  fix: {problem.fix}")
    count = len(report.problems)
    verdict = "no problems found" if not count else f"{count} problem{'s' if count > 1 else ''} found"
    print(f"\n{report.dataset}: {verdict}.")


def run_fewshot(args: argparse.Namespace) -> int:
    from promptclip.errors import CLIError

    if args.shots < 1:
        raise CLIError(f"--shots {args.shots}: K < 1 means every image, which needs no draw; give K >= 1")
    splits = _build(args)
    if not splits.train:
        raise CLIError(f"dataset {splits.name!r} has no training split to draw from")
    if args.no_cache:
        draw, path = draw_fewshot(splits.train, splits.val, args.shots, args.seed), None
    else:
        draw, path = load_or_draw(splits, args.shots, args.seed, args.cache_dir)
    content = draw_to_json(draw, splits.name, lists_digest(splits.train, splits.val))
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(content, indent=1))
    if args.print_json:
        print(json.dumps(content, indent=1))
        return 0
    print(
        f"{_title(splits)}: {args.shots} shots, seed {args.seed}: train {len(draw.train)}, val {len(draw.val)} images"
    )
    for split, short in (("train", draw.short_train), ("val", draw.short_val)):
        if short:
            print(
                f"  {len(short)} {split} classes have fewer images and are used whole: "
                + describe_short(short, splits.classnames)
            )
    for where in (path, args.out):
        if where:
            print(f"  written to {where}")
    return 0


def _title(splits: DatasetSplits) -> str:
    """`pets (folder)` for own data, the dataset's name for the field's."""
    return splits.name if splits.display_name == splits.name else f"{splits.display_name} ({splits.name})"


def run_info(args: argparse.Namespace) -> int:
    splits = _build(args)
    print(f"{_title(splits)}: {splits.num_classes} classes, template {splits.template!r}")
    print(f"  folder: {splits.root if splits.root is not None else '(rendered, no files)'}")
    print("  " + ", ".join(f"{split} {count}" for split, count in splits.sizes().items()))
    if splits.info.get("split_source"):
        print(f"  split: {splits.info['split_source']}")
    shown = ", ".join(splits.classnames[:10]) + (" ..." if splits.num_classes > 10 else "")
    print(f"  classes: {shown}")
    return 0
