"""Training programs: built-in tasks, data-parallel loop, atomic checkpoints, plots.

Run from the command line (``torchadjoint train --help``) or from Python::

    from torchadjoint.training import train, default_config
    result = train(default_config("digits", epochs=3, out="runs/try"))
"""
from .config import resolve
from .errors import TrainingError
from .loop import RunResult, train
from .tasks import TASKS, Task, load_trained


def default_config(task: str = "digits", **options):
    """The configuration ``torchadjoint train TASK`` would use, with ``options`` overriding
    (option names as in Python: ``batch_size=...``)."""
    from ..commands.train import parse

    args = parse([task])
    for key, value in options.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown training option {key!r}; see torchadjoint train --help")
        setattr(args, key, value)
    return resolve(args)


__all__ = ["train", "default_config", "resolve", "RunResult", "TrainingError", "TASKS", "Task", "load_trained"]
