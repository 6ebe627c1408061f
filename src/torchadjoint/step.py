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
    # Each tensor operation costs microseconds of dispatch however small the state, and a
    # step runs dozens of them: the views are taken once per step, not once per stage.
    s = tableau.stages
    a_rows, c = coeffs.a_rows, tableau.c
    stages = y0.new_empty((s, y0.shape[0]))
    if torch.is_grad_enabled():
        # A graph through the steps (Direct): autograd refuses in-place writes into views
        # taken before earlier writes, so every access goes through ``stages`` itself.
        def store(i: int, x: torch.Tensor) -> None:
            stages[i] = x

        def columns() -> torch.Tensor:
            return stages.T
    else:
        rows, all_columns = stages.unbind(0), stages.T

        def store(i: int, x: torch.Tensor) -> None:
            rows[i].copy_(x)

        def columns() -> torch.Tensor:
            return all_columns  # (n, s)

    store(0, f0)
    yi = y0
    for i in range(1, s):
        # Stage i's input: y0 + h · Σ_j<i a_ij k_j.
        yi = torch.addmv(y0, columns()[:, :i], a_rows[i], alpha=h)
        store(i, f(t1 if c[i] == 1 else t0 + c[i] * h, yi))
    if tableau.fsal:
        # The last stage input is y1 itself: reuse it rather than recombine.
        y1, f1 = yi, stages[-1]
    else:
        y1, f1 = torch.addmv(y0, columns(), coeffs.b, alpha=h), None
    # beta=0: y0 only lends its shape (addmv then ignores its values, NaN included).
    error = None if coeffs.b_error is None else torch.addmv(y0, columns(), coeffs.b_error, beta=0, alpha=h)
    return StepResult(y1, f1, error, stages)
