"""The `promptclip` command line.

Each subsystem adds its own sub-commands through an `add_commands(subparsers)` function, so this file only
wires them together; a sub-command sets `func(args) -> int` as its handler.

Building the parser imports no torch (nor anything that does): `promptclip --help` and a mistyped option answer
at once. A command module imports its heavy dependencies inside its handler; one whose option defaults live in
such a module adds its options through `add_parser(..., options=add)`, called only when that command is chosen
or its help is shown (`CommandParser`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from promptclip.errors import CLIError, user_error_message

# Modules that contribute sub-commands; each defines add_commands(subparsers).
COMMAND_MODULES = (
    "promptclip.commands.train",
    "promptclip.commands.evaluate",
    "promptclip.commands.import_prompt",
    "promptclip.commands.run",
    "promptclip.commands.predict",
    "promptclip.commands.listing",
    "promptclip.data.commands",
    "promptclip.commands.report",
    "promptclip.commands.masks",
    "promptclip.commands.explain",
    "promptclip.commands.pretrain",
    "promptclip.commands.demo",
    "promptclip.commands.weights",
)


__all__ = ["CLIError", "CommandParser", "build_parser", "main"]

OptionAdder = Callable[[argparse.ArgumentParser], None]


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose options may be added on first use: `subparsers.add_parser(name,
    options=add)` calls `add(parser)` when the command is parsed or its help or usage is shown, not when the
    command line is built."""

    def __init__(self, *args: Any, options: OptionAdder | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_options = options

    def _add_pending_options(self) -> None:
        if self._pending_options is not None:
            add, self._pending_options = self._pending_options, None
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[Any, list[str]]:
        self._add_pending_options()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_pending_options()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_pending_options()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
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
    from promptclip.engine.stop import Stopped, stop_on_signals

    try:
        with stop_on_signals(), plain_warnings():
            return int(args.func(args) or 0)
    except Stopped as stopped:
        print(f"promptclip: {describe_stop(stopped, sys.argv[1:] if argv is None else list(argv))}", file=sys.stderr)
        return stopped.exit_code
    except BrokenPipeError:
        # The reader went away (`promptclip list methods | head`): stop quietly, as Unix tools do.
        sys.stderr.close()
        return 0
    except Exception as err:  # every error a user can fix, from any subsystem, in one place
        message = user_error_message(err)
        if message is None:
            raise
        print(f"promptclip: error: {message}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """promptclip's own warnings (a TorchScript archive being opened, weights loaded under an assumed activation)
    as one `promptclip: warning:` line each, every time; other warnings as Python shows them."""
    from promptclip.clip.errors import ActivationWarning, TorchScriptWarning

    own = (TorchScriptWarning, ActivationWarning)
    with warnings.catch_warnings():
        for category in own:
            warnings.simplefilter("always", category)
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
            if issubclass(category, own):
                print(f"promptclip: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)  # type: ignore[arg-type]

        warnings.showwarning = show
        yield


def describe_stop(stopped: Exception, argv: Sequence[str]) -> str:
    """What was reached when a signal stopped the command, and the exact command that resumes it."""
    epochs_done, epochs = getattr(stopped, "epochs_done", None), getattr(stopped, "epochs", None)
    run_dir = getattr(stopped, "run_dir", None)
    reached = f"after {epochs_done} of {epochs} epochs" if epochs_done is not None else "before the run finished"
    where = f" in {run_dir}" if run_dir is not None else ""
    line = f"{stopped} {reached}{where}; the run folder's lock is released."
    if argv and argv[0] in ("train", "run", "demo"):
        again = [*argv, "--resume"] if "--resume" not in argv and argv[0] != "demo" else list(argv)
        line += f" Resume with: promptclip {shlex.join(again)}"
    return line


if __name__ == "__main__":
    raise SystemExit(main())
