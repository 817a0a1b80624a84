"""The `promptclip` command line.

Each subsystem adds its own sub-commands through an `add_commands(subparsers)` function, so this file only
wires them together; a sub-command sets `func(args) -> int` as its handler.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that contribute sub-commands; each defines add_commands(subparsers).
COMMAND_MODULES = (
    "promptclip.commands.train",
    "promptclip.commands.evaluate",
    "promptclip.commands.run",
    "promptclip.commands.predict",
    "promptclip.commands.listing",
    "promptclip.data.commands",
    "promptclip.commands.report",
    "promptclip.commands.masks",
    "promptclip.commands.explain",
    "promptclip.commands.pretrain",
    "promptclip.commands.demo",
)


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptclip",
        description="Prompt tuning of CLIP: DAPT, DPC and the CoOp family.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from promptclip import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"promptclip: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`promptclip list methods | head`): stop quietly, as Unix tools do.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
