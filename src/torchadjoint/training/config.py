"""A run's configuration: a typed record (:class:`TrainConfig`), built from the options a
user chose, saved as ``config.json``, and read back on resume.

Fields left ``None`` take the task's default (``Task.defaults``). Options that only steer
*how* the run is carried out (``RUN_CONTROL``: where it writes, on which device, how many
epochs in total, progress output) may change between a run and its resumption; every
other option defines the run: resuming reads it from the saved run, and an explicit
different value is refused (by its command-line name, ``OPTION``).

A new option is one field here (with ``metadata={"option": "--its-name"}`` when the
command-line name is not ``--field-name``) and one ``add_argument`` in
``torchadjoint.commands.train``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch

from .errors import TrainingError

CONFIG_FILE = "config.json"

# May differ between a run and its resumption. ``epochs`` is here so that a finished run
# can be extended (no schedule depends on the total number of epochs).
RUN_CONTROL = frozenset({"epochs", "out", "resume", "overwrite", "plots", "progress", "device", "threads", "dist_timeout"})
# Run control a resumed run takes from the saved run unless given again ("continue as it was").
RESUMED_CONTROL = ("epochs", "plots")


@dataclass
class TrainConfig:
    """Every option of a training run (``torchadjoint train --help`` explains each).

    ``None`` means "the task's default" for the task-dependent fields; ``out=None`` means
    a new numbered folder ``runs/TASK-N``.
    """

    task: str = field(default="digits", metadata={"option": "the task (first argument)"})
    # model and data
    hidden: Optional[int] = None
    T: Optional[float] = field(default=None, metadata={"option": "--time"})
    seq_len: Optional[int] = None
    iterations: Optional[int] = None
    limit_batches: int = 0
    density: Optional[str] = None  # cnf: the 2-d data density
    trace: Optional[str] = None  # cnf: "hutchinson" or "exact"
    latent_dim: Optional[int] = None  # latent: size of the latent ODE state
    # solver and gradient (None: the task's default, backsolve but where measurements chose another)
    gradient: Optional[str] = None
    method: str = "dopri5"
    rtol: Optional[float] = None
    atol: Optional[float] = None
    step_size: Optional[float] = None
    max_steps: int = 10000
    # optimisation
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_decay: Optional[float] = None
    kinetic: float = 0.0
    jacobian: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    # output
    out: Optional[str] = None
    resume: Optional[str] = field(default=None, metadata={"option": "--resume"})  # "" = OUT/checkpoint.pt
    overwrite: bool = False
    plots: bool = field(default=True, metadata={"option": "--plots/--no-plots"})
    progress: Optional[bool] = field(default=None, metadata={"option": "--progress/--no-progress"})
    # hardware
    device: str = "auto"
    threads: int = 1
    dist_timeout: float = 300.0

    def identity(self) -> Dict[str, Any]:
        """The options that define the run, JSON-normalised (plain types only)."""
        values = {k: v for k, v in sorted(dataclasses.asdict(self).items()) if k not in RUN_CONTROL}
        return json.loads(json.dumps(values))

    def run_control(self) -> Dict[str, Any]:
        return {k: v for k, v in sorted(dataclasses.asdict(self).items()) if k in RUN_CONTROL}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def option_name(key: str) -> str:
    """The command-line name of the configuration field ``key`` (``T`` -> ``--time``)."""
    f = FIELDS.get(key)
    if f is not None and "option" in f.metadata:
        return f.metadata["option"]
    return "--" + key.replace("_", "-")


def _describe(key: str, value: Any) -> str:
    if key == "task":
        return f"task {value!r}"
    if isinstance(value, bool) and "/" in option_name(key):
        on, off = option_name(key).split("/")
        return on if value else off
    if isinstance(value, float):
        return f"{option_name(key)} {value:g}"
    return f"{option_name(key)} {value!r}" if isinstance(value, str) else f"{option_name(key)} {value}"


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Dict[str, tuple]:
    """``{field: (saved value, current value)}`` for every defining option that differs.

    An option missing on one side (added to the program after the run began) counts as
    equal when the other side has it switched off (None, False, 0, "")."""
    def off(value):
        return value is None or value is False or value == 0 or value == ""

    out = {}
    for key in sorted(set(saved) | set(current)):
        if key in RUN_CONTROL:
            continue
        if key not in saved or key not in current:
            value = current.get(key, saved.get(key))
            if not off(value):
                out[key] = (saved.get(key, "<absent>"), current.get(key, "<absent>"))
        elif saved[key] != current[key]:
            out[key] = (saved[key], current[key])
    return out


def _refuse(diff: Dict[str, tuple], where: str) -> TrainingError:
    changes = "; ".join(f"{_describe(k, b)} given, but the run was trained with {_describe(k, a)}"
                        for k, (a, b) in diff.items())
    names = " and ".join(option_name(k) if k != "task" else "the task" for k in diff)
    return TrainingError(
        f"cannot resume {where} with different options: {changes}. These options define the run; only "
        f"{', '.join(option_name(k) for k in sorted(RUN_CONTROL - {'resume', 'out', 'overwrite'}))} may change on resume. "
        f"Leave out {names} to continue the run as it was, or start a new run in another --out folder"
    )


def check_same(saved: Mapping[str, Any], config: TrainConfig, where: str) -> None:
    """Raise :class:`TrainingError` naming (by command-line name) every defining option of
    ``config`` that differs from the ``saved`` run."""
    diff = differences(saved, config.identity())
    if diff:
        raise _refuse(diff, where)


def save_config(config: TrainConfig, folder: str) -> str:
    """Write ``config.json`` (all options, run control included, for the record) atomically."""
    from .checkpoint import write_text_atomic

    path = os.path.join(folder, CONFIG_FILE)
    record = {"run": config.identity(), "run_control": json.loads(json.dumps(config.run_control(), default=str))}
    write_text_atomic(json.dumps(record, indent=2) + "\n", path)
    return path


def read_record(folder: str) -> Dict[str, Any]:
    """The whole ``config.json`` of the run in ``folder``: ``{"run": ..., "run_control": ...}``."""
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path) as fh:
            record = json.load(fh)
        return {"run": dict(record["run"]), "run_control": dict(record.get("run_control") or {})}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"cannot read the run configuration {path}: {exc}") from None


def load_config(folder: str) -> Dict[str, Any]:
    """The defining options of the run saved in ``folder`` (its ``config.json``)."""
    return read_record(folder)["run"]


def _saved_run(config: TrainConfig) -> tuple:
    """``(defining options, run control, where)`` of the run ``config.resume`` continues."""
    from .checkpoint import CHECKPOINT, load_checkpoint

    folder = config.out
    if not os.path.isdir(folder):
        raise TrainingError(f"--resume: there is no run in {folder!r} (the folder does not exist); check --out")
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        record = read_record(folder)
        return record["run"], record["run_control"], repr(folder)
    path = config.resume or os.path.join(folder, CHECKPOINT)
    state = load_checkpoint(path)  # a clear error when missing or unreadable
    return dict(state["config"]), {}, repr(path)


def build_config(options: Mapping[str, Any]) -> TrainConfig:
    """The run's configuration from the options a user chose (``{field: value}``, only
    those given): a new run fills the rest from the program's and the task's defaults; a
    resumed run (``resume`` set) takes them from the saved run, and refuses a defining
    option whose value differs from it."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; the options are {sorted(FIELDS)} "
                        f"(see torchadjoint train --help)")
    options = dict(options)
    if options.get("resume") is not None:
        if options.get("overwrite"):
            raise TrainingError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                                "--overwrite deletes it and starts again; give one of them")
        resume = options["resume"]
        if resume and os.path.isdir(resume):
            # ``--resume RUN_FOLDER``: the folder of the run, not a checkpoint file in it.
            if options.get("out") is not None and os.path.abspath(options["out"]) != os.path.abspath(resume):
                raise TrainingError(f"--resume {resume!r} is a folder, and --out {options['out']!r} another; --resume "
                                    f"takes a checkpoint file, or nothing: --out {resume!r} --resume continues that run")
            options["out"], options["resume"] = resume, ""
        if options.get("out") is None:
            if not options["resume"]:
                raise TrainingError("--resume needs --out DIR, the folder of the run to continue "
                                    "(new runs are written to numbered folders runs/TASK-1, runs/TASK-2, ...)")
            options["out"] = os.path.dirname(options["resume"]) or "."
        probe = TrainConfig(out=options["out"], resume=options["resume"])
        saved, control, where = _saved_run(probe)
        diff = differences({k: v for k, v in saved.items() if k in FIELDS},
                           json.loads(json.dumps({k: v for k, v in options.items() if k not in RUN_CONTROL})))
        # Only what the user gave counts: an option absent from ``options`` is taken from the run.
        diff = {k: v for k, v in diff.items() if k in options}
        if diff:
            raise _refuse(diff, where)
        merged = {k: v for k, v in saved.items() if k in FIELDS and k not in RUN_CONTROL}
        merged.update({k: control[k] for k in RESUMED_CONTROL if k in control and control[k] is not None})
        merged.update(options)
        options = merged
    return resolve(TrainConfig(**options))


def resolve(config: TrainConfig) -> TrainConfig:
    """``config`` with every task-dependent option left unset (None) taken from the task's
    defaults, and the options checked against each other."""
    from ..tableaux import METHODS
    from .tasks import TASKS

    if not isinstance(config, TrainConfig):
        raise TypeError(f"expected a TrainConfig (see torchadjoint.training.default_config), got {type(config).__name__}")
    if config.task not in TASKS:
        raise TrainingError(f"unknown task {config.task!r}; choose from {', '.join(sorted(TASKS))}")
    filled = {k: v for k, v in TASKS[config.task].defaults.items() if getattr(config, k, None) is None}
    unknown = sorted(set(filled) - set(FIELDS))
    if unknown:  # a task whose defaults name options this configuration lacks
        raise TypeError(f"task {config.task!r} has defaults for unknown options {unknown}; add them to TrainConfig")
    config = dataclasses.replace(config, **filled)
    tableau = METHODS.get(config.method)
    if tableau is None:
        raise TrainingError(f"--method {config.method!r} is not a solver; choose from {sorted(METHODS)}")
    if not tableau.adaptive and config.step_size is None:
        raise TrainingError(f"--method {config.method} has a fixed step: give --step-size (e.g. --step-size 0.1)")
    if tableau.adaptive and config.step_size is not None:
        raise TrainingError(f"--step-size applies to fixed-step methods, but --method {config.method} is adaptive")
    if config.rtol == 0 and config.atol == 0:
        raise TrainingError("--rtol and --atol cannot both be zero")
    if not -2**63 <= config.seed < 2**64:  # the range torch.manual_seed accepts
        raise TrainingError(f"--seed {config.seed} is out of range; give an integer in [-2**63, 2**64)")
    # A time or step that rounds to zero in the run's dtype would make the solve's grid degenerate.
    for key in ("T", "step_size"):
        value = getattr(config, key)
        if value is not None and not float(torch.tensor(value, dtype=getattr(torch, config.dtype))) > 0:
            raise TrainingError(f"{option_name(key)} {value:g} is zero in {config.dtype}; give a larger value")
    return config
