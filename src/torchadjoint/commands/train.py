"""``torchadjoint train``: train a neural ODE on a built-in task.

The options are added group by group (``ARGUMENT_GROUPS``); a new group of options is one
function and one entry there. Every option lands in the run's configuration (saved as
``config.json``) without further code.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

from . import CommandError
from .argtypes import non_negative_float, non_negative_int, positive_float, positive_int

HELP = "train a neural ODE on a built-in task (digits classifier, spiral dynamics)"
DESCRIPTION = """\
Train a neural ODE, backpropagating through the ODE solve with the continuous adjoint
(or another --gradient method).

tasks:
  digits   (default) the classic ODE classifier on scikit-learn's bundled 8x8 handwritten
           digits: an input layer maps the image to y(0), an ODE block evolves it to y(T),
           an affine layer and softmax classify. The input layer is trained through dL/dy(0).
  spiral   learn the dynamics of a 2-d time series (the cubic oscillator dy/dt = (y**3) A,
           1000 observations on [0, 25]) from random sub-trajectories, with a loss at every
           observation time.

Options left out take the task's default (shown as "digits/spiral" where they differ).
Outputs (in --out): config.json, metrics.csv (one row per epoch), nfe.csv (function
evaluations per iteration), checkpoint.pt (+ checkpoint.prev.pt, written atomically each
epoch), model.pt (the final model), train.log, and PNG plots."""
EPILOG = """\
examples:
  torchadjoint train                                   # digits, defaults (a few minutes on a CPU)
  torchadjoint train spiral --out runs/spiral
  torchadjoint train --gradient direct --rtol 1e-5 --atol 1e-6 --out runs/direct
  torchadjoint train --out runs/digits --resume --epochs 20   # continue (and extend) a run
  torchrun --nproc_per_node=2 -m torchadjoint train            # data-parallel on 2 processes"""


def _task_default(key: str) -> str:
    from ..training.tasks import TASKS

    values = [str(task.defaults[key]) for task in TASKS.values() if key in task.defaults]
    return "/".join(values) if len(set(values)) > 1 else values[0]


def decay_factor(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 keeps the learning rate constant), got {text}")
    return value


def task_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.tasks import TASKS

    parser.add_argument("task", nargs="?", default="digits", choices=sorted(TASKS), help="what to train (default: digits)")
    group = parser.add_argument_group("model and data")
    group.add_argument("--hidden", type=positive_int, help=f"ODE state size (digits) / vector-field width (spiral) (default: {_task_default('hidden')})")
    group.add_argument("--time", dest="T", type=positive_float, metavar="T", help=f"digits: integrate y from 0 to T (default: {_task_default('T')})")
    group.add_argument("--seq-len", type=positive_int, help=f"spiral: observations per sub-trajectory (default: {_task_default('seq_len')})")
    group.add_argument("--iterations", type=positive_int, help=f"spiral: iterations per epoch (default: {_task_default('iterations')})")
    group.add_argument("--limit-batches", type=non_negative_int, default=0, metavar="N",
                       help="use only the first N batches of every epoch (quick checks; default: 0 = all)")


def solver_arguments(parser: argparse.ArgumentParser) -> None:
    from ..adjoint import GRADIENT_METHODS
    from ..tableaux import METHODS

    group = parser.add_argument_group("ODE solver and gradient")
    # The registry is read now, not copied: every gradient method the library has is offered.
    group.add_argument("--gradient", default="backsolve", choices=sorted(GRADIENT_METHODS),
                       help="how gradients pass through the solve (default: backsolve, the continuous adjoint)")
    group.add_argument("--method", default="dopri5", choices=sorted(METHODS), help="ODE solver (default: dopri5)")
    group.add_argument("--rtol", type=non_negative_float, help=f"relative tolerance (default: {_task_default('rtol')})")
    group.add_argument("--atol", type=non_negative_float, help=f"absolute tolerance (default: {_task_default('atol')})")
    group.add_argument("--step-size", type=positive_float, help="step size of fixed-step methods (euler, rk4, ...)")
    # A diverging model makes its dynamics stiff: without a bound a solve would crawl for hours.
    group.add_argument("--max-steps", type=positive_int, default=10000,
                       help="most steps one ODE solve may take before training stops with an error (default: 10000)")


def optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=positive_int, help=f"total number of epochs (default: {_task_default('epochs')})")
    group.add_argument("--batch-size", type=positive_int,
                       help=f"global batch size, split across processes (default: {_task_default('batch_size')})")
    group.add_argument("--lr", type=positive_float, help=f"Adam learning rate (default: {_task_default('lr')})")
    group.add_argument("--lr-decay", type=decay_factor, metavar="GAMMA",
                       help=f"learning rate factor per epoch (default: {_task_default('lr_decay')})")
    group.add_argument("--kinetic", type=non_negative_float, default=0.0, metavar="WEIGHT",
                       help="weight of the kinetic-energy regulariser ∫|f|² dt (Finlay et al. 2020): straighter "
                            "dynamics, fewer solver steps (default: 0 = off; try 0.01)")
    group.add_argument("--jacobian", type=non_negative_float, default=0.0, metavar="WEIGHT",
                       help="weight of the Jacobian regulariser ∫|∂f/∂y|_F² dt, a Hutchinson estimate with one noise "
                            "draw per solve (default: 0 = off; try 0.01)")
    group.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: 0)")
    group.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="floating-point precision (default: float32)")


def output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", help="output folder (default: runs/TASK)")
    group.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                       help="continue the run in --out from its last checkpoint (or from CHECKPOINT); "
                            "the options must match the saved config.json, except --epochs and --device")
    group.add_argument("--overwrite", action="store_true", help="start again in an --out folder that holds a run")
    group.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots (default: yes)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar per epoch (default: when the output is a terminal)")


def hardware_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hardware and processes")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda if available)")
    group.add_argument("--threads", type=positive_int, default=1,
                       help="CPU threads per process (default: 1; these models are too small to gain from more, "
                            "and extra threads slow a busy machine down)")
    group.add_argument("--dist-timeout", type=positive_float, default=300.0, metavar="SECONDS",
                       help="under torchrun: how long a process waits for the others before failing (default: 300)")


# Order of the --help sections. A new group of options: one function, one entry here.
ARGUMENT_GROUPS: List[Callable[[argparse.ArgumentParser], None]] = [
    task_arguments, solver_arguments, optimisation_arguments, output_arguments, hardware_arguments,
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for add in ARGUMENT_GROUPS:
        add(parser)


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The options of ``torchadjoint train`` from ``argv`` (without the ``train`` word)."""
    parser = argparse.ArgumentParser(prog="torchadjoint train")
    add_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from ..training import TrainingError, resolve, train

    try:
        config = resolve(args)
        train(config)
    except TrainingError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        out = args.out or f"runs/{args.task}"
        print(f"\ninterrupted: every finished epoch is saved in {out!r}; continue with --resume", file=sys.stderr)
        return 130
    return 0
