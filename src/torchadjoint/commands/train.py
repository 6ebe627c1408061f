"""``torchadjoint train``: train a neural ODE on a built-in task.

The options are added group by group (``ARGUMENT_GROUPS``); a new group of options is one
function and one entry there. Each option is a field of
:class:`torchadjoint.training.TrainConfig` (same name as its ``dest``); only the options
the user typed reach :func:`torchadjoint.training.build_config`, which takes the rest from
the defaults (new run) or from the saved run (``--resume``).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional

from . import CommandError
from .argtypes import non_negative_float, non_negative_int, positive_float, positive_int

HELP = "train a neural ODE on a built-in task (digits classifier, spiral dynamics, cnf density, latent ODE)"
DESCRIPTION = """\
Train a neural ODE, backpropagating through the ODE solve with the continuous adjoint
(or another --gradient method).

tasks:
  digits   (default) the classic ODE classifier on scikit-learn's bundled 8x8 handwritten
           digits: an input layer maps the image to y(0), an ODE block evolves it to y(T),
           an affine layer and softmax classify. The input layer is trained through dL/dy(0).
  spiral   learn the dynamics of a 2-d time series (the cubic oscillator dy/dt = (y**3) A,
           1000 observations on [0, 25]) from random sub-trajectories, with a loss at every
           observation time. Its "trajectory loss" (metrics.csv, curves.png) is the mean
           absolute difference |y_learned(t_i) - y_true(t_i)| over all 1000 observations and
           both coordinates, the learned trajectory solved from the true y(0) alone: how
           well the learned dynamics reproduce the whole spiral, not just short pieces.
  cnf      a continuous normalising flow (FFJORD) on a 2-d toy density (--density
           8gaussians, moons, circles, checkerboard): log p(x) as an ODE state, Hutchinson
           (or --trace exact) trace, optional --kinetic/--jacobian (RNODE); test NLL beside
           the true density's NLL on the same points.
  latent   a latent ODE on irregularly sampled noisy time series (random damped
           rotations): backward GRU encoder, ODE decoder, ELBO; interpolation and
           extrapolation error beside a GRU baseline trained in the same run.

Options left out take the task's default (shown as "digits/spiral" where they differ).
Outputs (in --out; default a new numbered folder runs/TASK-1, runs/TASK-2, ...):
config.json, metrics.csv (one row per epoch), nfe.csv (function evaluations per
iteration), checkpoint.pt (+ checkpoint.prev.pt, written atomically each epoch), model.pt
(the final model), train.log, and PNG plots. --resume continues a run with the options it
was started with (read from its config.json)."""
EPILOG = """\
examples:
  torchadjoint train                                   # digits, defaults, into runs/digits-N
  torchadjoint train spiral --out runs/spiral
  torchadjoint train --gradient direct --rtol 1e-5 --atol 1e-6 --out runs/direct
  torchadjoint train --out runs/spiral --resume --epochs 20   # continue (and extend) a run
  torchrun --nproc_per_node=2 -m torchadjoint train            # data-parallel on 2 processes"""


def _task_default(key: str) -> str:
    from ..training.tasks import TASKS

    values = [str(task.defaults[key]) for task in TASKS.values() if key in task.defaults]
    if not values:
        return "none"
    return "/".join(values) if len(set(values)) > 1 else values[0]


def _default(key: str):
    """The program's default of an option (the TrainConfig field's)."""
    from ..training.config import FIELDS

    return FIELDS[key].default


def decay_factor(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 keeps the learning rate constant), got {text}")
    return value


# Every option is left out of the parsed namespace unless given (argparse.SUPPRESS): what
# the user typed is known exactly, so a resumed run can take the rest from the saved run.
_GIVEN_ONLY = argparse.SUPPRESS


def task_option(group, flag: str, help: str, **kwargs) -> None:
    """Add ``flag``, an option whose default is the task's: its help ends with that default
    (``(default: 64/32)`` where the tasks differ), and it is left out unless given."""
    key = kwargs.get("dest") or flag.lstrip("-").replace("-", "_")
    group.add_argument(flag, default=_GIVEN_ONLY, help=f"{help} (default: {_task_default(key)})", **kwargs)


def task_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.tasks import TASKS

    # No ``choices``: an unknown task is reported after parsing, so that a misspelt option
    # followed by its value (``--epcohs 3``) is named as such instead of "invalid task '3'".
    parser.add_argument("task", nargs="?", default=_GIVEN_ONLY, metavar="TASK",
                        help=f"what to train: {', '.join(sorted(TASKS))} (default: digits)")
    group = parser.add_argument_group("model and data")
    task_option(group, "--hidden", "ODE state size (digits) / vector-field width (spiral, cnf) / encoder and field width "
                "(latent)", type=positive_int)
    task_option(group, "--time", "digits, cnf: integrate y from 0 to T", dest="T", type=positive_float, metavar="T")
    task_option(group, "--seq-len", "spiral: observations per sub-trajectory", type=positive_int)
    task_option(group, "--iterations", "spiral, cnf: iterations per epoch", type=positive_int)
    group.add_argument("--limit-batches", type=non_negative_int, metavar="N", default=_GIVEN_ONLY,
                       help="use only the first N batches of every epoch (quick checks; default: 0 = all)")


def cnf_latent_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.data_cnf import DENSITIES
    from ..training.tasks_cnf import TRACES

    group = parser.add_argument_group("cnf and latent tasks")
    task_option(group, "--density", "cnf: the 2-d data density", choices=sorted(DENSITIES))
    task_option(group, "--trace", "cnf: trace of ∂f/∂z in d log p/dt: hutchinson (one VJP per evaluation, Rademacher "
                "noise fixed per solve) or exact (one VJP per dimension)", choices=TRACES)
    task_option(group, "--latent-dim", "latent: size of the latent ODE state", type=positive_int)


def solver_arguments(parser: argparse.ArgumentParser) -> None:
    from ..adjoint import GRADIENT_METHODS
    from ..tableaux import METHODS

    group = parser.add_argument_group("ODE solver and gradient")
    # The registry is read now, not copied: every gradient method the library has is offered.
    group.add_argument("--gradient", choices=sorted(GRADIENT_METHODS), default=_GIVEN_ONLY,
                       help="how gradients pass through the solve (default: backsolve, the continuous adjoint; per task "
                            f"{_task_default('gradient')}, the fastest measured for the task)")
    group.add_argument("--method", choices=sorted(METHODS), default=_GIVEN_ONLY,
                       help=f"ODE solver (default: {_default('method')})")
    task_option(group, "--rtol", "relative tolerance", type=non_negative_float)
    task_option(group, "--atol", "absolute tolerance", type=non_negative_float)
    group.add_argument("--step-size", type=positive_float, default=_GIVEN_ONLY,
                       help="step size of fixed-step methods (euler, rk4, ...)")
    # A diverging model makes its dynamics stiff: without a bound a solve would crawl for hours.
    group.add_argument("--max-steps", type=positive_int, default=_GIVEN_ONLY,
                       help=f"most steps one ODE solve may take before training stops with an error "
                            f"(default: {_default('max_steps')})")


def optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    task_option(group, "--epochs", "total number of epochs", type=positive_int)
    task_option(group, "--batch-size", "global batch size, split across processes", type=positive_int)
    task_option(group, "--lr", "Adam learning rate", type=positive_float)
    task_option(group, "--lr-decay", "learning rate factor per epoch", type=decay_factor, metavar="GAMMA")
    group.add_argument("--kinetic", type=non_negative_float, metavar="WEIGHT", default=_GIVEN_ONLY,
                       help="weight of the kinetic-energy regulariser ∫|f|² dt (Finlay et al. 2020): straighter "
                            "dynamics, fewer solver steps (default: 0 = off; try 0.01)")
    group.add_argument("--jacobian", type=non_negative_float, metavar="WEIGHT", default=_GIVEN_ONLY,
                       help="weight of the Jacobian regulariser ∫|∂f/∂y|_F² dt, a Hutchinson estimate with one noise "
                            "draw per solve (default: 0 = off; try 0.01)")
    group.add_argument("--seed", type=int, default=_GIVEN_ONLY,
                       help=f"seed of initialisation and data order (default: {_default('seed')})")
    group.add_argument("--dtype", choices=("float32", "float64"), default=_GIVEN_ONLY,
                       help=f"floating-point precision (default: {_default('dtype')})")


def output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=_GIVEN_ONLY,
                       help="output folder (default: a new numbered folder runs/TASK-1, runs/TASK-2, ...); "
                            "a folder that already holds a run is refused unless --resume or --overwrite")
    group.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT", default=_GIVEN_ONLY,
                       help="continue the run in --out from its last checkpoint (or from CHECKPOINT; a run folder given here is taken as --out), with the "
                            "options it was started with; only --epochs, --device, --threads, --dist-timeout, "
                            "--plots and --progress may be given differently")
    group.add_argument("--overwrite", action="store_true", default=_GIVEN_ONLY,
                       help="start again in an --out folder that holds a run (deletes its run files)")
    group.add_argument("--plots", action=argparse.BooleanOptionalAction, default=_GIVEN_ONLY,
                       help="write PNG plots (default: yes)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=_GIVEN_ONLY,
                       help="progress bar per epoch (default: when the output is a terminal)")


def hardware_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hardware and processes")
    group.add_argument("--device", default=_GIVEN_ONLY,
                       help="cpu, cuda, cuda:N or auto (default: auto = cuda if available)")
    group.add_argument("--threads", type=positive_int, default=_GIVEN_ONLY,
                       help="CPU threads per process (default: 1; these models are too small to gain from more, "
                            "and extra threads slow a busy machine down)")
    group.add_argument("--dist-timeout", type=positive_float, metavar="SECONDS", default=_GIVEN_ONLY,
                       help="under torchrun: how long a process waits for the others before failing (default: 300)")


# Order of the --help sections. A new group of options: one function, one entry here.
ARGUMENT_GROUPS: List[Callable[[argparse.ArgumentParser], None]] = [
    task_arguments, cnf_latent_arguments, solver_arguments, optimisation_arguments, output_arguments, hardware_arguments,
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for add in ARGUMENT_GROUPS:
        add(parser)


def given_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options the user typed, ``{TrainConfig field: value}`` (the program's own
    entries, ``command`` and ``_run``, left out)."""
    return {k: v for k, v in vars(args).items() if k != "command" and not k.startswith("_")}


def _config(args: argparse.Namespace):
    from ..training import TrainingError, build_config
    from ..training.tasks import TASKS

    options = given_options(args)
    if "task" in options and options["task"] not in TASKS:
        raise CommandError(f"unknown task {options['task']!r}; choose from {', '.join(sorted(TASKS))}")
    try:
        return build_config(options)
    except TrainingError as exc:
        raise CommandError(str(exc)) from None


def parse(argv: Optional[List[str]] = None):
    """The :class:`~torchadjoint.training.TrainConfig` of ``torchadjoint train ARGV``
    (``argv`` without the ``train`` word)."""
    parser = argparse.ArgumentParser(prog="torchadjoint train")
    add_arguments(parser)
    return _config(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from ..training import TrainingError, train

    config = _config(args)
    try:
        train(config)
    except TrainingError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        # The run has logged where its finished epochs are and how to continue.
        return 130
    return 0
