"""The one exception type for a training run that cannot start or go on because of its
options or its output folder (the command line prints its message, without a traceback)."""


class TrainingError(Exception):
    """A user-facing problem: bad options, an unreadable checkpoint, a folder from another run."""
