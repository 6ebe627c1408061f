"""One explicit Runge–Kutta step as a pure function (no loop, no control)."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .flat_views import alias, flat_view
from .tableaux.base import ButcherTableau, TableauTensors

FlatFunc = Callable[[float, torch.Tensor], torch.Tensor]


class StepResult(NamedTuple):
    """``y1`` (n,); ``f1`` = f(t1, y1) when the method is FSAL, else None; ``error`` (n,)
    the embedded error estimate (None for fixed-step methods); ``stages`` (s, n).

    A compiled step (:mod:`~torchadjoint.compiled`) also brings ``error_ratio``, the
    controller's norm of the error already taken inside its graph (None: the loop takes it),
    and ``evaluations``, the calls of f made inside the graph, which the loop's counter did
    not see."""

    y1: torch.Tensor
    f1: Optional[torch.Tensor]
    error: Optional[torch.Tensor]
    stages: torch.Tensor
    error_ratio: Optional[float] = None
    evaluations: int = 0


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
    if torch.is_grad_enabled():
        return _recording_step(f, t0, y0, f0, h, t1, tableau, coeffs)
    s = tableau.stages
    if s == 1:
        # One stage (Euler): one add, exactly as the recording step below computes it.
        return StepResult(torch.add(y0, f0, alpha=h * tableau.b[0]), None, None, f0[None])
    a_rows, c = coeffs.a_rows, tableau.c
    stages = y0.new_empty((s, y0.shape[0]))
    rows, columns = stages.unbind(0), stages.T  # (n, s)
    rows[0].copy_(f0)
    yi = y0
    for i in range(1, s):
        # Stage i's input: y0 + h · Σ_j<i a_ij k_j.
        if tableau.fsal and i == s - 1:
            yi = advance(y0, columns[:, :i], a_rows[i], h)  # y1 itself (below)
        else:
            yi = torch.addmv(y0, columns[:, :i], a_rows[i], alpha=h)
        rows[i].copy_(f(t1 if c[i] == 1 else t0 + c[i] * h, yi))
    if tableau.fsal:
        # The last stage input is y1 itself: reuse it rather than recombine.
        y1, f1 = yi, stages[-1]
    else:
        y1, f1 = advance(y0, columns, coeffs.b, h), None
    # beta=0: y0 only lends its shape (addmv then ignores its values, NaN included).
    error = None if coeffs.b_error is None else torch.addmv(y0, columns, coeffs.b_error, beta=0, alpha=h)
    return StepResult(y1, f1, error, stages)


def _recording_step(
    f: FlatFunc, t0: float, y0: torch.Tensor, f0: torch.Tensor, h: float, t1: float,
    tableau: ButcherTableau, coeffs: TableauTensors,
) -> StepResult:
    """:func:`rk_step` while autograd records a graph through the steps (Direct).

    No writes into a preallocated buffer: each would cost a CopySlices node plus the views
    around it, per stage. The stages are a list; stage ``i``'s input stacks the ``i`` before
    it into a fresh (i, n) tensor whose transpose has the strides of the buffer's columns in
    :func:`rk_step`, so the very same ``addmv`` runs and the values are bitwise those of a
    solve without a graph (a checkpointed replay retakes the forward's steps exactly). A
    one-stage method is one add, on the shaped tensors behind the flat views
    (:mod:`~torchadjoint.flat_views`) when there are: one node per call of f beyond f's own.
    The error estimate only steers the controller, which reads it detached: no graph.
    """
    s, a_rows, c = tableau.stages, coeffs.a_rows, tableau.c
    if s == 1:
        k0, y0_shaped = alias(f0), alias(y0)
        if k0 is not None:
            y1_shaped = torch.add(y0_shaped if y0_shaped is not None else y0.view(k0.shape), k0, alpha=h * tableau.b[0])
            y1 = flat_view(y1_shaped)
        else:
            y1 = torch.add(y0, f0, alpha=h * tableau.b[0])
        return StepResult(y1, None, None, f0[None])
    ks = [f0]
    yi = y0
    for i in range(1, s):
        if tableau.fsal and i == s - 1:
            yi = advance(y0, torch.stack(ks).T, a_rows[i], h)  # y1, as in rk_step
        else:
            yi = torch.addmv(y0, torch.stack(ks).T, a_rows[i], alpha=h)
        ks.append(f(t1 if c[i] == 1 else t0 + c[i] * h, yi))
    stages = torch.stack(ks)  # (s, n): dense output reads it (a node only where an output does)
    if tableau.fsal:
        y1, f1 = yi, ks[-1]
    else:
        y1, f1 = advance(y0, stages.T, coeffs.b, h), None
    error = None
    if coeffs.b_error is not None:
        with torch.no_grad():
            error = torch.addmv(y0, stages.T, coeffs.b_error, beta=0, alpha=h)
    return StepResult(y1, f1, error, stages)


def advance(y0: torch.Tensor, columns: torch.Tensor, weights: torch.Tensor, h: float) -> torch.Tensor:
    """``y0 + h · columns @ weights``, the increment rounded into ``y0`` once.

    ``torch.addmv(y0, columns, weights)`` adds the stage terms to ``y0`` one column at a
    time, rounding the state once per stage; over many steps those roundings add up (float32,
    rk4 on a constant field with steps of 0.01: 5.0e-5 of drift after 150 steps against
    1.4e-5 for euler and for this form). Stage inputs do not carry over to the next step, so
    they keep the fused (faster) addmv.
    """
    return y0.add(torch.mv(columns, weights), alpha=h)
