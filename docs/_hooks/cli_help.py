"""MkDocs hook: replace ``<!-- cli-help: COMMAND -->`` in a page by ``torchadjoint COMMAND --help``.

The help is generated from the program's own argument parser at build time, so the
command-line page cannot fall behind the options. ``COMMAND`` is ``torchadjoint`` for the
top-level help. The package is imported from ``src/`` beside ``mkdocs.yml``.
"""
from __future__ import annotations

import os
import re
import sys

MARKER = re.compile(r"^<!-- cli-help: (\S+) -->$", re.M)
WIDTH = "88"  # argparse wraps at $COLUMNS


def _help(command: str) -> str:
    import argparse

    from torchadjoint.cli import build_parser

    parser = build_parser()
    if command == "torchadjoint":
        return parser.format_help()
    for action in parser._actions:  # argparse keeps subcommands in its subparsers action
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command].format_help()
    raise ValueError(f"cli-help marker names unknown command {command!r}")


def on_config(config, **kwargs):
    src = os.path.join(os.path.dirname(config.config_file_path), "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if "<!-- cli-help:" not in markdown:
        return markdown
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return MARKER.sub(lambda m: "```text\n" + _help(m.group(1)).rstrip() + "\n```", markdown)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = previous
