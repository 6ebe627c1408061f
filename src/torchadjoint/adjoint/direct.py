"""Discretise-then-optimise: autograd through the solver's own steps.

The exact gradient of the computation the forward pass did. Memory grows with the number
of steps (every stage is kept for backward).
"""
from __future__ import annotations

import torch

from ..options import SolverOptions
from ..problem import Problem, solve_flat
from .base import GradientMethod


class Direct(GradientMethod):
    """Backpropagate with autograd through every step of the solver."""

    name = "direct"

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        with torch.enable_grad():
            result = solve_flat(problem, options, y0)
        stats["forward"] = result.stats
        return result.ys
