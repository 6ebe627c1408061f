"""Evaluating ``f`` on the inside of each step at grid points (torchdiffeq's ``perturb``).

torchdiffeq can evaluate ``f`` one floating-point number *inside* the step at the step's
ends: the first stage at ``nextafter(t0, t1)`` and any stage at the end time at
``nextafter(t1, t0)``. With ``f`` discontinuous at the grid points (a piecewise-constant
control, say) every step then sees only the piece it integrates over. It does this always
for adaptive methods at their ``c = 1`` stages (so at ``step_t`` and ``jump_t`` as well), and
for fixed-grid methods when ``options=dict(perturb=True)``. The user's ``f`` never receives
a ``perturb`` argument: it only sees the shifted time.

The solver loop here calls ``f(t, y)`` with exact host times and knows nothing of sides,
so :class:`SideOfStep` decides the side from the sequence of calls: at a grid point, a call
that follows calls inside the step behind it is an end-of-step stage (the first
``end_stages`` calls there, as many as the method has stages with ``c = 1``); any other call
there starts the next step. A start is nudged forward in the direction of integration, an
end backward, and never out of the solve's interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Sides:
    """Where to nudge during one phase of a solve (the forward pass, or the adjoint's).

    ``is_point(t)``: whether ``t`` (a float in the state's dtype) is a grid point;
    ``direction``: ±1, the direction of integration in this phase; ``end_stages``: stages
    per step at the step's end time; ``lo``/``hi``: the interval ``f`` lives on.
    """

    is_point: Callable[[float], bool]
    direction: float
    end_stages: int
    lo: float = -math.inf
    hi: float = math.inf


class SideOfStep:
    """``func(t, y)`` with ``t`` moved one ulp into the current step at grid points.

    The forward phase is active from the start; :meth:`enter_backward` switches to the
    adjoint's phase (``backward=None``: no nudging there).
    """

    def __init__(self, func: Callable, forward: Optional[Sides], backward: Optional[Sides] = None):
        self.func = func
        self.forward, self.backward = forward, backward
        self.sides = forward
        self.prev: Optional[float] = None
        self.run = 0  # consecutive calls at the same grid point
        self.run_is_end = False

    def enter_backward(self) -> None:
        self.sides = self.backward
        self.prev, self.run = None, 0

    def __call__(self, t: torch.Tensor, y):
        sides = self.sides
        if sides is None:
            return self.func(t, y)
        raw = float(t)
        if sides.is_point(raw):
            if raw == self.prev:
                self.run += 1
                end = self.run_is_end and self.run <= sides.end_stages
            else:
                self.run = 1
                end = sides.end_stages > 0 and self.prev is not None and sides.direction * (raw - self.prev) > 0
                self.run_is_end = end
            side = -sides.direction if end else sides.direction
            if raw <= sides.lo:
                side = 1.0
            elif raw >= sides.hi:
                side = -1.0
            t = torch.nextafter(t, torch.full_like(t, math.copysign(math.inf, side)))
        else:
            self.run = 0
        self.prev = raw
        return self.func(t, y)


def point_set(points, dtype: torch.dtype) -> Callable[[float], bool]:
    """Membership in a finite set of times, compared in the state's dtype (``f`` sees
    times in that dtype)."""
    rounded = {float(x) for x in torch.tensor(list(points), dtype=torch.float64).to(dtype).tolist()}
    return rounded.__contains__


def uniform_grid(t0: float, step: float, direction: float, dtype: torch.dtype) -> Callable[[float], bool]:
    """Membership in the unbounded grid ``t0 + k·step`` (as the fixed-step event search builds it)."""

    def is_point(t: float) -> bool:
        k = round(direction * (t - t0) / step)
        if k < 0:
            return False
        return float(torch.tensor(t0 + direction * k * step, dtype=torch.float64).to(dtype)) == t

    return is_point


class EnterBackward(torch.autograd.Function):
    """Identity on the outputs; its backward runs before the gradient method's (it sits
    after the solve in the graph) and switches :class:`SideOfStep` to the adjoint's phase."""

    @staticmethod
    def forward(ctx, wrapper: SideOfStep, *xs):
        ctx.wrapper = wrapper
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.wrapper.enter_backward()
        return (None, *grads)
