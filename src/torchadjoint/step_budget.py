"""The step budget of one solve: ``max_num_steps``, the pace check that ends a hopeless
stiff solve early, and the message that says why a solve ran out of steps."""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .errors import SolveError
from .options import DEFAULT_MAX_NUM_STEPS
from .step import StepResult
from .step_size import no_graph
from .tableaux.base import ButcherTableau, real_stability_limit, stiffness_pair


class StepBudget:
    """Counts the steps of one solve (accepted and rejected) against ``max_num_steps``.

    Each landing before the end may cut one step in two: ``landings`` of them do not count
    against the limit. With ``pace_check`` (adaptive steps), the solve stops early, at
    1024, 2048, 4096, ... accepted steps, when it plainly cannot finish (:func:`hopeless`).
    ``t_end``: the public end time; ``label``: "forward" or "backward", for messages.
    """

    def __init__(self, max_num_steps: int, landings: int, tableau: ButcherTableau, t_end: float,
                 pace_check: bool, label: str):
        self.max_num_steps, self.limit = max_num_steps, max_num_steps + landings
        self.tableau, self.t_end, self.pace_check, self.label = tableau, t_end, pace_check, label
        self.steps = self.accepted = 0
        self.recent_h: List[float] = []  # the last 100 accepted |h|, for the diagnosis
        self.last_step = None  # (h, stages (s, n)) of the last accepted step
        self.last_y: Optional[torch.Tensor] = None  # (n,) the state it reached
        self._next_pace_check = 1024

    def take(self, t: float) -> None:
        """Count a step about to be taken from time ``t``; SolveError past the limit."""
        if self.steps >= self.limit:
            raise SolveError(t, self._message(t), self.label)
        self.steps += 1

    def accept(self, h: float, step: StepResult, t1: float, distance: float) -> None:
        """Record an accepted ``step`` of size ``h`` ending at ``t1``, ``distance`` (on the
        clock) short of the end; at a pace check, SolveError if the rest is hopeless."""
        self.accept_many([h], step.stages, step.y1, t1, distance)

    def accept_many(self, hs: List[float], stages: torch.Tensor, y1: torch.Tensor, t1: float, distance: float) -> None:
        """Record accepted steps of sizes ``hs``, the last with ``stages`` (s, n), ending at
        ``t1`` in ``y1``, ``distance`` short of the end (as :meth:`accept` of each; a pace
        check may fall on the last only: see :meth:`accepts_before_check`)."""
        self.accepted += len(hs)
        self.last_step, self.last_y = (hs[-1], stages), y1
        self.recent_h.extend(abs(h) for h in hs)
        del self.recent_h[:-100]
        if self.accepted == self._next_pace_check:
            self._next_pace_check *= 2
            if self.pace_check and hopeless(self.limit - self.steps, distance, self.recent_h, self.last_step,
                                            self.tableau):
                raise SolveError(t1, self._message(t1, early=True), self.label)

    def attempts_left(self) -> int:
        """Steps that may still be taken (:meth:`take` raises after them)."""
        return self.limit - self.steps

    def accepts_before_check(self) -> int:
        """Accepted steps up to and including the one the next pace check follows."""
        return self._next_pace_check - self.accepted

    def took(self, steps: int) -> None:
        """Count ``steps`` taken elsewhere (at most :meth:`attempts_left`), none past the limit."""
        self.steps += steps

    def stats(self) -> dict:
        return dict(steps=self.steps, accepted=self.accepted, rejected=self.steps - self.accepted)

    def _message(self, t: float, early: bool = False) -> str:
        return too_many_steps(self.max_num_steps, self.steps, t, self.t_end, self.recent_h, self.last_step,
                              self.tableau, early, self.last_y)


def near_overflow(y: Optional[torch.Tensor]) -> str:
    """A sentence for when the state ``y`` (n,) is within 10^4 of its dtype's largest value
    (else ""): the steps then stall on overflowing intermediate values, and neither
    tolerances nor a larger budget help."""
    if y is None or not y.numel():
        return ""
    with torch.no_grad():
        largest = float(no_graph(y).abs().max())
    limit = torch.finfo(y.dtype).max
    if not limit * 1e-4 <= largest < float("inf"):
        return ""
    name = str(y.dtype).replace("torch.", "")
    fix = "rescale the state" if y.dtype == torch.float64 else "solve in float64, or rescale the state"
    return (f". The state reached |y|={largest:.3g}, near the largest {name} ({limit:.3g}): the solution outgrows "
            f"{name} here, whatever the tolerances; {fix}")


def hopeless(steps_left: int, distance: float, recent_h: List[float], last_step, tableau) -> bool:
    """Whether a stiff solve cannot finish within its step budget: stability pins its
    steps (estimated ``|h·λ|`` at least half the method's stability limit), and at the
    recent pace the rest of the interval needs over 1000 times the steps left. Pinned
    steps do not grow while the stiffness lasts, so waiting for the budget to run out
    (minutes at 100 000 steps) would only delay the same error."""
    mean_h = sum(recent_h) / len(recent_h)
    if not mean_h > 0 or abs(distance) / mean_h <= 1000.0 * max(steps_left, 1):
        return False
    ratio = stiffness_ratio(last_step, tableau)
    return ratio is not None and ratio >= 0.5 * real_stability_limit(tableau)


def too_many_steps(max_num_steps: int, steps: int, t: float, t_end: float, recent_h: List[float], last_step, tableau,
                   early: bool = False, y: Optional[torch.Tensor] = None) -> str:
    """The ``max_num_steps`` message: how far the solve got, at what pace, and whether
    stability rather than accuracy held the steps down (stiffness) or the state ``y`` (n,)
    outgrew its dtype. ``early``: stopped before the budget ran out, because the pace
    showed it would (see :func:`hopeless`)."""
    default = " (the default)" if max_num_steps == DEFAULT_MAX_NUM_STEPS else ""
    if early:
        msg = (f"stopped after {steps} steps: at this pace the solve would exceed max_num_steps={max_num_steps}{default} "
               f"over 1000 times before t_end={t_end:.6g}")
    else:
        msg = f"max_num_steps={max_num_steps}{default} exceeded after {steps} steps, short of t_end={t_end:.6g}"
    if recent_h:
        mean_h = sum(recent_h) / len(recent_h)
        msg += f"; the last {len(recent_h)} accepted steps averaged |h|={mean_h:.3g}"
        if mean_h > 0:
            msg += f", a pace at which reaching t_end takes about {abs(t_end - t) / mean_h:.3g} more steps"
    ratio = stiffness_ratio(last_step, tableau)
    limit = real_stability_limit(tableau)
    overflow = near_overflow(y)
    if overflow:
        msg += overflow
    elif ratio is not None and ratio >= 0.5 * limit:
        msg += (
            f". This looks stiff: the last step had |h·λ|≈{ratio:.3g} against {tableau.name}'s stability limit "
            f"{limit:.3g}, so stability, not accuracy, holds the steps down; an explicit method cannot go faster. "
            f"Use an implicit (stiff) method, shorten the interval, or raise max_num_steps"
        )
    else:
        msg += "; raise max_num_steps, loosen rtol/atol, or shorten the interval"
    return msg


def stiffness_ratio(last_step, tableau: ButcherTableau) -> Optional[float]:
    """``|h·λ|`` estimated from the last accepted step's two stages at one time (see
    :func:`~torchadjoint.tableaux.base.stiffness_pair`), or None where it cannot be."""
    pair = stiffness_pair(tableau)
    if last_step is None or pair is None:
        return None
    h, stages = last_step
    i, j, row = pair
    stages = no_graph(stages)
    with torch.no_grad():
        dk = torch.linalg.vector_norm(stages[j] - stages[i])
        dy = abs(h) * torch.linalg.vector_norm(torch.tensor(row, dtype=stages.dtype, device=stages.device) @ stages)
    dk, dy = float(dk), float(dy)
    return abs(h) * dk / dy if dy > 0 and math.isfinite(dk) else None
