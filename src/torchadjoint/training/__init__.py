"""Training programs: built-in tasks, data-parallel loop, atomic checkpoints, plots.

Run from the command line (``torchadjoint train --help``) or from Python::

    from torchadjoint.training import train, default_config
    result = train(default_config("digits", epochs=3, out="runs/try"))

The configuration is a :class:`TrainConfig`; the command line builds one, and nothing
here imports the command line.
"""
from .config import TrainConfig, build_config, resolve
from .errors import TrainingError
from .loop import RunResult, train
from .tasks import TASKS, Task, load_trained


def default_config(task: str = "digits", **options) -> TrainConfig:
    """The configuration ``torchadjoint train TASK`` would use, with ``options`` overriding
    (option names as in Python: ``batch_size=...``; ``resume=""`` with ``out=...``
    continues the run saved there, as ``--out ... --resume`` does)."""
    return build_config(dict(task=task, **options))


__all__ = ["train", "default_config", "build_config", "resolve", "TrainConfig", "RunResult", "TrainingError", "TASKS",
           "Task", "load_trained"]
