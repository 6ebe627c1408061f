"""The small protocol every gradient method follows.

A gradient method turns a forward solve into outputs ``ys`` (N, n) carrying an autograd
graph (or a custom ``autograd.Function``) to the flat initial state ``y0`` (n,) and to the
problem's ``params``. Time gradients are not its business: :mod:`torchadjoint.time_gradients`
attaches them around every method in the same way.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..options import SolverOptions
from ..problem import Problem


class GradientMethod:
    """Base class. Subclasses implement :meth:`run`."""

    name = "gradient method"

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        """Solve forward from ``y0`` (n,) and return ``ys`` (N, n), differentiable with
        respect to ``y0`` and ``problem.params``. Fill ``stats["forward"]`` now and
        ``stats["backward"]`` when the backward pass runs."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def split_like(flat: torch.Tensor, tensors: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
    """Split a flat vector into pieces shaped like ``tensors``."""
    sizes = [t.numel() for t in tensors]
    return tuple(piece.view_as(t) for piece, t in zip(torch.split(flat, sizes), tensors))


def refuse_double_backward(method_name: str) -> None:
    """Raised when a graph through an adjoint's backward is differentiated again."""
    raise RuntimeError(
        f"double backward through the {method_name} adjoint is not supported (its backward pass is itself a "
        f"solve with no graph); for higher derivatives use gradient=Direct(), which differentiates through the "
        f"solver's steps with autograd"
    )


def forward_stats(stats: dict, first_stage) -> dict:
    """A forward solve's stats, counting the evaluation of the params check that served as
    its first stage (``first_stage`` not None)."""
    return dict(stats, nfe=stats["nfe"] + (first_stage is not None))
