"""Subcommands of the ``torchadjoint`` program.

Each is a module here defining ``HELP`` (one line), ``DESCRIPTION``, optionally ``EPILOG``,
``add_arguments(parser)`` and ``run(args) -> exit code``. Registering one is one entry in
``COMMANDS``; modules are imported when the parser is built.
"""

COMMANDS = (
    "train",
    "compare",
)


class CommandError(Exception):
    """A user-facing error of a subcommand: printed as ``torchadjoint CMD: error: ...``
    without a traceback, exit status 2."""
