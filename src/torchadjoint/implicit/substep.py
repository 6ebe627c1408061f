"""``y(t)`` inside an accepted implicit step, by a shorter implicit step from its start.

Why not the dense output: an implicit method's steps are long across stiff transients, where
a dense output built for smooth solutions (kvaerno3's cubic Hermite through the step's ends,
kvaerno5's order-4 continuous extension of its stages) is far off — with cubic Hermite up to
240 tolerances from the step's own solution on Van der Pol μ = 1000, and Robertson's y2 at
t = 1e4 about 300 tolerances off (263 with kvaerno5's extension). One step of the same
method from the step's start to ``t`` is within the accepted step's own error: it is shorter
and starts from the same state (the stepper reuses the step's Jacobian; only the LU changes
with the step size).

Used where a state strictly inside an implicit step is needed: Checkpointed's backward pass
(``y(t)`` along the replayed trajectory) and the event search (the state at the crossing).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..errors import SolveError

#: Newton failures halve the sub-step recursively this many times (down to 1/256 of it).
MAX_HALVINGS = 8


class ImplicitSubsteps:
    """``(t0, y0 (n,), f0 (n,), t) -> y(t) (n,)``: one implicit step of ``tableau`` from
    ``(t0, y0)`` to ``t``; where Newton does not converge, two halves, recursively.

    ``f(t, y)``: the solve's function on flat states; ``controller``: the forward's (its
    tolerances scale Newton's convergence test); ``record_graph``: steps taken with autograd
    on (the implicit function theorem carries the graph), otherwise under ``no_grad``.
    ``advice``: what the :class:`~torchadjoint.SolveError` raised after the last halving
    tells the user to do.
    """

    def __init__(self, tableau, controller, f: Callable, coeffs, advice: str, record_graph: bool = False):
        self.tableau, self.f, self.coeffs, self.advice = tableau, f, coeffs, advice
        self.record_graph = record_graph
        self.stepper = tableau.make_stepper(controller, f)

    def __call__(self, t0: float, y0: torch.Tensor, f0: torch.Tensor, t: float, depth: int = 0) -> torch.Tensor:
        with contextlib.nullcontext() if self.record_graph else torch.no_grad():
            result = self.stepper(self.f, t0, y0, f0, t - t0, t, self.tableau, self.coeffs)
        if result.y1 is not y0:  # the stepper hands y0 back when Newton failed
            return result.y1
        if depth >= MAX_HALVINGS:
            raise SolveError(t, f"could not recover y(t) inside an implicit step (Newton's iteration did not "
                                f"converge even on 1/{2 ** MAX_HALVINGS} of the step); {self.advice}")
        middle = t0 + (t - t0) / 2
        y_mid = self(t0, y0, f0, middle, depth + 1)
        return self(middle, y_mid, self.f(middle, y_mid), t, depth + 1)
