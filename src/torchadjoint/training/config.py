"""A run's configuration: resolved from the options, saved as ``config.json``, compared on resume.

The configuration is the parsed command line (an ``argparse.Namespace``): an option added
to the parser is part of it without further code. Options that only steer *how* the run
is carried out (``RUN_CONTROL``: where it writes, on which device, how many epochs in
total, progress output) may change between a run and its resumption; every other option
defines the run, and resuming with a different value is an error.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict

from .errors import TrainingError

CONFIG_FILE = "config.json"

# May differ between a run and its resumption. ``epochs`` is here so that a finished run
# can be extended (no schedule depends on the total number of epochs).
RUN_CONTROL = frozenset({"epochs", "out", "resume", "overwrite", "plots", "progress", "device", "threads", "dist_timeout", "command"})


def identity(config: argparse.Namespace) -> Dict[str, Any]:
    """The options that define the run, JSON-normalised (tuples become lists)."""
    values = {k: v for k, v in sorted(vars(config).items()) if k not in RUN_CONTROL and not k.startswith("_")}
    return json.loads(json.dumps(values))


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == ""


def differences(saved: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, tuple]:
    """``{option: (saved value, current value)}`` for every option that differs.

    An option missing on one side (added to the program after the run began) counts as
    equal when the other side has it switched off (None, False, 0)."""
    out = {}
    for key in sorted(set(saved) | set(current)):
        if key in RUN_CONTROL:
            continue
        if key not in saved or key not in current:
            value = current.get(key, saved.get(key))
            if not _is_off(value):
                out[key] = (saved.get(key, "<absent>"), current.get(key, "<absent>"))
        elif saved[key] != current[key]:
            out[key] = (saved[key], current[key])
    return out


def check_same(saved: Dict[str, Any], config: argparse.Namespace, where: str) -> None:
    """Raise :class:`TrainingError` naming every option that differs from the saved run."""
    diff = differences(saved, identity(config))
    if diff:
        lines = ", ".join(f"--{k.replace('_', '-')}: {a!r} in the saved run, {b!r} now" for k, a, b in
                          ((k, *v) for k, v in diff.items()))
        raise TrainingError(
            f"{where} belongs to a run with a different configuration ({lines}). Resume with the same options, "
            f"or train into another --out folder"
        )


def save_config(config: argparse.Namespace, folder: str) -> str:
    """Write ``config.json`` (all options, run control included, for the record) atomically."""
    path = os.path.join(folder, CONFIG_FILE)
    record = {"run": identity(config), "run_control": {k: v for k, v in sorted(vars(config).items()) if k in RUN_CONTROL}}
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=2, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_config(folder: str) -> Dict[str, Any]:
    """The defining options of the run saved in ``folder`` (its ``config.json``)."""
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path) as fh:
            record = json.load(fh)
        return dict(record["run"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"cannot read the run configuration {path}: {exc}") from None


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """The run's configuration: ``args`` with every option left unset (None) taken from the
    task's defaults, and the options checked against each other."""
    from ..tableaux import METHODS
    from .tasks import TASKS

    if args.task not in TASKS:
        raise TrainingError(f"unknown task {args.task!r}; choose from {sorted(TASKS)}")
    config = argparse.Namespace(**vars(args))
    for key, value in TASKS[args.task].defaults.items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    if getattr(config, "out", None) is None:
        config.out = f"runs/{config.task}"
    tableau = METHODS.get(config.method)
    if tableau is None:
        raise TrainingError(f"--method {config.method!r} is not a solver; choose from {sorted(METHODS)}")
    if not tableau.adaptive and config.step_size is None:
        raise TrainingError(f"--method {config.method} has a fixed step: give --step-size (e.g. --step-size 0.1)")
    if tableau.adaptive and config.step_size is not None:
        raise TrainingError(f"--step-size applies to fixed-step methods, but --method {config.method} is adaptive")
    if config.rtol == 0 and config.atol == 0:
        raise TrainingError("--rtol and --atol cannot both be zero")
    return config
