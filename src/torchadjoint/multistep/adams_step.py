"""The Adams–Bashforth(–Moulton) step, called by the loop like ``rk_step``.

History: ``f`` at the last grid points, newest first. It is valid only while the steps
chain (this step starts where the last ended, from the very state it produced) and keep
the same size; otherwise it restarts, and Kutta's 3/8 rule takes the steps until four
values of ``f`` are known again.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from ..step import StepResult, rk_step
from ..tableaux.adams import BASHFORTH4, MOULTON4
from ..tableaux.rk4_38 import RK4_38

_AB = tuple(float(x) for x in BASHFORTH4)
_AM = tuple(float(x) for x in MOULTON4)


class AdamsStepper:
    """One solve's Adams stepper; ``stats``: ``bootstrap_steps`` (taken by RK4),
    ``corrector_iterations`` (evaluations of ``f`` by the corrector)."""

    def __init__(self, tableau):
        self.tableau = tableau
        self.history: List[torch.Tensor] = []
        self._end: Optional[tuple] = None  # (t1, y1, h) of the last step
        self.stats = dict(bootstrap_steps=0, corrector_iterations=0)

    def __call__(self, f, t0: float, y0: torch.Tensor, f0: torch.Tensor, h: float, t1: float, tableau, coeffs) -> StepResult:
        chained = (self._end is not None and self._end[0] == t0 and self._end[1] is y0
                   and math.isclose(self._end[2], h, rel_tol=1e-9))
        self.history = [f0] + self.history[:3] if chained else [f0]
        if len(self.history) < 4:
            self.stats["bootstrap_steps"] += 1
            step = rk_step(f, t0, y0, f0, h, t1, RK4_38, RK4_38.as_tensors(y0.dtype, y0.device))
            y1 = step.y1
        else:
            y1 = y0 + h * sum(beta * fj for beta, fj in zip(_AB, self.history))
            if self.tableau.corrector:
                known = y0 + h * sum(beta * fj for beta, fj in zip(_AM[1:], self.history[:3]))
                for _ in range(self.tableau.max_iters):
                    self.stats["corrector_iterations"] += 1
                    corrected = known + (h * _AM[0]) * f(t1, y1)
                    change = float((corrected - y1).detach().abs().max()) if y1.numel() else 0.0
                    y1 = corrected
                    if change <= 1e-10 * (1.0 + float(y1.detach().abs().max())):
                        break
        self._end = (t1, y1, h)
        stages = torch.stack([f0, (y1 - y0) / h])
        return StepResult(y1, None, None, stages)
