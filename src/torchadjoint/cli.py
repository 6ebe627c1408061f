"""The ``torchadjoint`` command-line program: argument parsing and dispatch only.

The subcommands live in :mod:`torchadjoint.commands` (one module each, listed in
``COMMANDS``).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import List, Optional

from . import __version__
from .commands import COMMANDS, CommandError


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-wrapped descriptions and examples as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchadjoint",
        description="Neural ODEs in PyTorch, trained with the continuous adjoint method.",
        epilog="Run 'torchadjoint COMMAND --help' for the options of a command.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"torchadjoint {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f".{name}", "torchadjoint.commands")
        command = sub.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
            epilog=getattr(module, "EPILOG", None), formatter_class=_Formatter,
        )
        module.add_arguments(command)
        command.set_defaults(_run=module.run, _parser=command)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the program with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    # Known options first, then the unknown ones reported by the subcommand: a misspelt
    # option is named (with the closest real one), not mistaken for a positional's value.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unrecognised(args._parser, unknown)
    try:
        return int(args._run(args) or 0)
    except CommandError as exc:
        print(f"torchadjoint {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"torchadjoint {args.command}: interrupted", file=sys.stderr)
        return 130


def _unrecognised(command: argparse.ArgumentParser, unknown: List[str]) -> None:
    """Exit (status 2) naming the first unrecognised argument and the closest option."""
    options = [s for action in command._actions for s in action.option_strings]
    word = unknown[0]
    name = word.split("=", 1)[0]
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6) if name.startswith("-") else []
    hint = f" (did you mean {close[0]}?)" if close else ""
    what = "option" if name.startswith("-") else "argument"
    # One line, without argparse's usage wall: the message says where the options are listed.
    command.exit(2, f"{command.prog}: error: unrecognized {what} {word!r}{hint}; see {command.prog} --help\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
