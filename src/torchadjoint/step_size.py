"""Step-size controllers: where the integration loop's next step ends, and whether it is kept.

The loop (:func:`~torchadjoint.integrate.integrate`) keeps the output times and the
landings; it asks one :class:`StepSizeController` per solve for everything else about
step sizes. Two implement the protocol (as torchode's and diffrax's controllers do, a
fixed grid being ``ConstantStepSize``/``StepTo`` there):

- :class:`AdaptiveSteps`: the steps follow the embedded error estimate, judged by the
  PI rule of a :class:`~torchadjoint.controller.PIController` (adaptive methods);
- :class:`GridSteps`: the steps are a given grid, each one accepted (fixed-step methods).

All times here are on the loop's clock (offsets ``s``, see
:class:`~torchadjoint.integrate.TimeFrame`); the public ``t`` passed beside them is only
for error messages. Step sizes are signed host floats.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Protocol, Sequence

import torch

from .controller import PIController
from .errors import SolveError
from .step import StepResult


class StepSizeController(Protocol):
    """What the integration loop asks about step sizes. One object per solve: it carries
    the step size and the controller's memory from one step to the next.

    Attributes:
        adaptive: True when steps are judged by an error estimate (a rejected step is
            retried, a non-finite one rejected); False for a fixed sequence of steps,
            whose states the loop checks for finite values once, at the end.
        h: the signed size the controller proposes for the next step (after a solve:
            ``IntegrateResult.h_next``, to continue it seamlessly).
        state: the controller's memory between steps (the PI rule's previous accepted
            error ratio; passed through unchanged by a grid): ``IntegrateResult.controller_state``.

    The loop calls :meth:`start` once, then for each attempted step :meth:`end_of_step`,
    takes the step from ``s`` to ``s1`` (size ``s1 - s``), and calls :meth:`judge`.
    """

    adaptive: bool
    h: float
    state: float

    def start(self, f: Callable, t: float, y: torch.Tensor, f0: torch.Tensor) -> None:
        """Before the first step from ``(t, y)``, ``f0 = f(t, y)``: choose ``h`` if it was
        not given (``f`` counts as the solve's evaluations)."""

    def end_of_step(self, s: float, stop: float, t: float) -> float:
        """Where the next step from ``s`` ends: never past ``stop`` (the next landing,
        which it reaches exactly). Raises SolveError when no step can make progress."""

    def judge(self, step: StepResult, y0: torch.Tensor, s: float, s1: float, t: float) -> bool:
        """Keep (True) or reject the step just taken from ``(s, y0)`` to ``s1``; sets ``h``
        and ``state`` for the next attempt."""


def no_graph(x: torch.Tensor) -> torch.Tensor:
    """``x`` without its autograd history (no op when there is none: this runs per step)."""
    return x.detach() if x.requires_grad else x


class AdaptiveSteps:
    """Steps chosen by the embedded error estimate (see :class:`StepSizeController`).

    ``pi`` is the error-control rule (tolerances, norm, the PI formula, the first-step
    heuristic); this object applies it to the loop's steps: landing exactly on the next
    stop, keeping a step that only rounding stretched, and telling step-size underflow.

    Args:
        pi: the rule; its rtol is first raised to ``dtype``'s resolution (with a warning).
        order: the method's order (the PI exponent, the first-step heuristic).
        direction: +1 or -1, the direction of integration.
        length: the clock's interval length (underflow is judged against it too).
        first_step, state: a signed first step and the controller's state, to continue
            an earlier solve (``first_step=None``: select it in :meth:`start`).
        implicit: the method is implicit (says so in the underflow message).
        label: "forward" or "backward", for error messages.
    """

    adaptive = True

    def __init__(self, pi: PIController, dtype: torch.dtype, order: int, direction: float, length: float,
                 first_step: Optional[float], state: float, implicit: bool = False, label: str = "forward"):
        pi.limit_to_precision(dtype)
        self.pi, self.order, self.direction, self.label, self.implicit = pi, order, direction, label, implicit
        # Near s = 0 the spacing of floats is denormal-small, and steps that small make no
        # progress anyone could wait for. (Capped at 1: a search with a far-away nominal
        # end, as for events, keeps fine steps.)
        self.length, self.span = length, min(length, 1.0)
        self.h = first_step
        self.state = state
        self._proposed = 0.0  # h as proposed before a landing shortened it
        self._landed = False  # the current step was cut short to land on a stop
        self._nonfinite = False  # the last rejection saw NaN or inf

    def start(self, f: Callable, t: float, y: torch.Tensor, f0: torch.Tensor, init: Optional[Callable] = None) -> None:
        """Select the first step (unless given); ``init``: the rule's ``init`` computed elsewhere
        (the compiled loop's graph), same signature."""
        if self.h is not None:
            return
        if not bool(torch.isfinite(f0).all()):
            raise SolveError(t, "f returned non-finite values (NaN or inf) at the initial state", self.label)
        self.h, self.state = (init or self.pi.init)(f, t, y, f0, self.direction, self.order)

    def took(self, h: float, state: Optional[float]) -> None:
        """Steps were taken elsewhere (the compiled loop's graph, by this rule): ``h`` is the step
        they propose next, ``state`` the controller's state after the last accepted one (None:
        none was accepted)."""
        self.h = h
        if state is not None:
            self.state, self._nonfinite = state, False

    def end_of_step(self, s: float, stop: float, t: float) -> float:
        h = self._proposed = self.h
        s1 = s + h
        # Land on the next stop, also when a step would end a hair before it (rounding).
        slack = 64 * math.ulp(max(abs(s), abs(stop)))
        self._landed = self.direction * (s1 - stop) >= -slack
        if self._landed:
            return stop
        if abs(h) <= 16 * math.ulp(max(abs(s), abs(s1), self.span)):
            raise SolveError(t, underflow_reason(self._nonfinite, h, self.length, self.implicit), self.label)
        # The loop steps by exactly s1 - s, the distance the clock advances: s + h rounds,
        # and a step of the unrounded h labelled s1 would drift by up to half a spacing of
        # s per step (1e-9 per step at t = 1e7, hundreds of times rtol=1e-10 at the end).
        return s1

    def judge(self, step: StepResult, y0: torch.Tensor, s: float, s1: float, t: float) -> bool:
        h = s1 - s
        ratio = step.error_ratio  # a compiled step took the norm inside its graph
        if ratio is None:
            ratio = self.pi.error_ratio(no_graph(step.error), no_graph(y0), no_graph(step.y1))
        accept, h_next, state = self.pi.adapt(h, ratio, self.state, self.order)
        # The retry would be this very step again: only min_step holds h up (a step at
        # min_step that the landing stretched by rounding). h_next is at most 0.9 h
        # otherwise, so a landing that stretched a short proposal is retried.
        # (Rounding slack at this step's own times: the landing's slack is measured at the
        # next stop, which for an event search is 1e30 away and would excuse every step.)
        stuck = abs(h_next) >= abs(h) - 64 * math.ulp(max(abs(s), abs(s1)))
        if not accept and math.isfinite(ratio) and stuck:
            accept, state = True, ratio
        if not accept:
            # An infinite ratio may only be an overflowing scale (rtol tiny): look at the state.
            self._nonfinite = self._nonfinite or (not math.isfinite(ratio) and not bool(torch.isfinite(step.y1).all()))
            if stuck:
                # Pinned at min_step and still not finite: retrying cannot help.
                raise SolveError(t, f"the state or f became non-finite (NaN or inf) even at min_step={abs(h_next):.3g}",
                                 self.label)
            self.h = h_next
            return False
        if self._landed and abs(self._proposed) > abs(h_next):
            # The landing, not accuracy, shortened this step: keep the unshortened size.
            h_next = self._proposed
        self.h, self.state, self._nonfinite = h_next, state, False
        return True


class GridSteps:
    """Steps from point to point of a fixed grid, every one accepted (see
    :class:`StepSizeController`). ``points``: the clock times the steps end at, after the
    start, along the direction of integration, ending at the end (the grid and the
    landings together: the step sequence visits every point). ``h`` starts at
    ``first_step`` (or 0.0) and is then the last step's size; ``state`` passes through."""

    adaptive = False

    def __init__(self, points: Sequence[float], first_step: Optional[float], state: float):
        self.points: List[float] = list(points)
        self.h = first_step or 0.0
        self.state = state
        self._next = 0

    def start(self, f: Callable, t: float, y: torch.Tensor, f0: torch.Tensor) -> None:
        pass

    def end_of_step(self, s: float, stop: float, t: float) -> float:
        return self.points[self._next]

    def judge(self, step: StepResult, y0: torch.Tensor, s: float, s1: float, t: float) -> bool:
        self.h = s1 - s
        self._next += 1
        return True


def underflow_reason(nonfinite: bool, h: float, length: float, implicit: bool = False) -> str:
    """The message of a step-size underflow: ``h`` the step, ``length`` the interval's;
    ``nonfinite``: the rejected steps before it saw NaN or inf. What to change differs
    for an implicit method, whose steps stiffness does not hold down."""
    reason = f"step size underflow (h={abs(h):.3g} on an interval of length {abs(length):.6g})"
    if nonfinite:
        reason += ": the state or f became non-finite (NaN or inf) and smaller steps did not help"
    if not implicit:
        return reason + (
            " (the solution may blow up here, or the problem is too stiff for an explicit method); check f near "
            "this time, or loosen rtol/atol"
        )
    reason += (
        " (the solution may blow up here, or f may jump or lose smoothness here, where Newton's iteration fails to "
        "converge: give such times in jump_t); check f near this time, loosen rtol/atol, or try another method "
        "(stiffness is not the cause: it does not hold an implicit method's steps down)"
    )
    # (A backward solve's failure is told in the gradient method's terms, alternatives
    # such as gradient=Direct() included, by torchadjoint.adjoint.trust: the loop knows no gradients.)
    return reason
