"""One explicit Runge–Kutta step as a pure function (no loop, no control)."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .tableaux.base import ButcherTableau, TableauTensors

FlatFunc = Callable[[float, torch.Tensor], torch.Tensor]


class StepResult(NamedTuple):
    """``y1`` (n,); ``f1`` = f(t1, y1) when the method is FSAL, else None; ``error`` (n,)
    the embedded error estimate (None for fixed-step methods); ``stages`` (s, n)."""

    y1: torch.Tensor
    f1: Optional[torch.Tensor]
    error: Optional[torch.Tensor]
    stages: torch.Tensor


def rk_step(
    f: FlatFunc,
    t0: float,
    y0: torch.Tensor,
    f0: torch.Tensor,
    h: float,
    t1: float,
    tableau: ButcherTableau,
    coeffs: TableauTensors,
) -> StepResult:
    """Take one step of size ``h`` from ``(t0, y0)`` with ``f0 = f(t0, y0)`` known.

    ``t1`` is the step's end time as the caller wants it hit exactly (``t0 + h`` up to
    rounding); stages with ``c == 1`` are evaluated there. All stages live in one (s, n)
    tensor so each stage input is a single matrix–vector product.
    """
    s = tableau.stages
    stages = y0.new_empty((s, y0.shape[0]))
    stages[0] = f0
    yi = y0
    rows = coeffs.a_rows or tuple(coeffs.a[i, :i] for i in range(s))
    for i in range(1, s):
        yi = torch.addmv(y0, stages[:i].T, rows[i], alpha=h)
        ci = tableau.c[i]
        stages[i] = f(t1 if ci == 1 else t0 + ci * h, yi)
    if tableau.fsal:
        # The last stage input is y1 itself: reuse it rather than recombine.
        y1, f1 = yi, stages[-1]
    else:
        y1, f1 = torch.addmv(y0, stages.T, coeffs.b, alpha=h), None
    error = None if coeffs.b_error is None else torch.mv(stages.T, coeffs.b_error) * h
    return StepResult(y1, f1, error, stages)
