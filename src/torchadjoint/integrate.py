"""The integration loop: step, accept/reject, dense output, landings, statistics.

Everything here works on a flat state (n,) and host-side float times. The loop knows
nothing about gradients: the forward solve, every adjoint's backward solve and the
re-solves of the checkpointed adjoint all run through :func:`integrate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .controller import PIController
from .errors import SolveError
from .interpolation import interpolate, needs_f1
from .options import DEFAULT_MAX_NUM_STEPS
from .step import FlatFunc, rk_step
from .tableaux.base import ButcherTableau, real_stability_limit, stiffness_pair

LandingCallback = Callable[[float, torch.Tensor], Optional[torch.Tensor]]


@dataclass
class Landing:
    """A time every step sequence must land on exactly.

    ``callbacks`` run there in order, each ``(t, y) -> new y or None``; a new state (the
    adjoint's jump at an output time) makes the loop re-evaluate ``f``, unless the callback
    returns ``(new y, f(t, new y))`` (f there without a call, e.g. by linearity). ``restart=True``
    marks a discontinuity of ``f``: ``f`` is re-evaluated just past ``t`` (the FSAL stage
    from before the jump belongs to the other side).
    """

    t: float
    callbacks: List[LandingCallback] = field(default_factory=list)
    restart: bool = False


@dataclass
class StepInfo:
    """An accepted step, as passed to ``on_accept``: from ``(t0, y0)`` to ``(t1, y1)``;
    ``stages`` (s, n); ``h_next`` the step the controller proposes next."""

    t0: float
    t1: float
    y0: torch.Tensor
    y1: torch.Tensor
    stages: torch.Tensor
    f1: Optional[torch.Tensor]
    h_next: float
    controller_state: float
    h: Optional[float] = None  # the step's length, exact (t1 - t0 rounds at large |t|)


@dataclass
class IntegrateResult:
    """``ys`` (N, n) states at the requested output times; ``y_end`` (n,) the state at the
    end (after any landing callback there); ``f_end`` f at the end when it was computed;
    ``h_next`` and ``controller_state`` to continue the solve seamlessly; ``stats``."""

    ys: torch.Tensor
    y_end: torch.Tensor
    f_end: Optional[torch.Tensor]
    t_end: float
    h_next: float
    controller_state: float
    stats: dict


def merge_landings(landings: Sequence[Landing], direction: float) -> List[Landing]:
    """Sort landings along the direction of integration and merge equal times."""
    merged: dict = {}
    for landing in landings:
        entry = merged.setdefault(landing.t, Landing(landing.t))
        entry.callbacks.extend(landing.callbacks)
        entry.restart = entry.restart or landing.restart
    return sorted(merged.values(), key=lambda l: direction * l.t)


def _no_graph(x: torch.Tensor) -> torch.Tensor:
    return x.detach() if x.requires_grad else x


class TimeFrame:
    """The loop's clock. Usually the public times themselves; for an interval that is
    short against its distance from 0, offsets ``s = t - origin`` from the endpoint
    nearest 0.

    Step sizes, landings and the underflow test are judged on the clock, whose floats
    must resolve the interval: at ``t0 = 1e12`` an interval of 0.005 is only 40 float64
    spacings of ``t`` wide, but it is resolved to 1e-18 in ``s``. ``f`` is still called
    at public times (``origin + s``, exact at the start, the end and every landing, which
    are remembered), since that is all the caller's time can express.

    The offset clock is used only where public times cannot resolve the interval into
    ``2^26`` steps (an offset above ~1e7 times the interval's length), so ordinary solves
    keep public times bit for bit, and a solve restarted from one of its own accepted
    times (the checkpointed gradients' replays) retakes the same steps. (With the offset
    clock a restart from a public time rounds the clock: such replays are not bitwise.)
    """

    RESOLVED_STEPS = 2.0**26

    def __init__(self, t_start: float, t_end: float):
        length = abs(t_end - t_start)
        largest = max(abs(t_start), abs(t_end))
        if t_start * t_end <= 0 or length >= self.RESOLVED_STEPS * math.ulp(largest):
            self.origin = 0.0  # public times resolve the interval (or it holds 0, where they are finest)
        else:
            self.origin = t_start if abs(t_start) <= abs(t_end) else t_end
        self._exact: dict = {}

    def offset(self, t: float) -> float:
        """``t - origin``; remembers ``t`` so that :meth:`public` gives it back exactly."""
        if self.origin == 0.0:
            return t
        s = t - self.origin
        self._exact.setdefault(s, t)
        return s

    def public(self, s: float) -> float:
        if self.origin == 0.0:
            return s
        t = self._exact.get(s)
        return self.origin + s if t is None else t


def check_interval(t_start: float, t_end: float, label: str = "forward") -> None:
    """Refuse an interval whose length overflows float64 (e.g. [-1e308, 1e308]): no
    step size could be measured along it."""
    if not math.isfinite(t_end - t_start):
        raise ValueError(
            f"the {label} interval from t={t_start:.6g} to t={t_end:.6g} is longer than the largest float64 "
            f"({t_end - t_start}): its length overflows. Rescale time (solve over t/c with f multiplied by c) "
            f"so that t[-1] - t[0] is finite"
        )


def fixed_grid(t_start: float, t_end: float, step_size: float) -> List[float]:
    """Grid ``t_start + k·step_size`` towards ``t_end``, ending exactly at ``t_end``."""
    direction = 1.0 if t_end >= t_start else -1.0
    n = max(1, math.ceil(abs(t_end - t_start) / step_size - 1e-9))
    return [t_start + direction * k * step_size for k in range(1, n)] + [t_end]


def integrate(
    f: FlatFunc,
    y0: torch.Tensor,
    t_start: float,
    t_end: float,
    out_times: Sequence[float],
    tableau: ButcherTableau,
    *,
    controller: Optional[PIController] = None,
    grid: Optional[Sequence[float]] = None,
    landings: Sequence[Landing] = (),
    max_num_steps: int = DEFAULT_MAX_NUM_STEPS,
    linear_interpolation: bool = False,
    first_step: Optional[float] = None,
    controller_state: float = 1.0,
    f0: Optional[torch.Tensor] = None,
    on_accept: Optional[Callable[[StepInfo], Optional[bool]]] = None,
    label: str = "forward",
    compiled=None,
) -> IntegrateResult:
    """Integrate ``dy/dt = f(t, y)`` from ``t_start`` to ``t_end``.

    Args:
        f: ``f(t: float, y: (n,)) -> (n,)``.
        y0: (n,) state at ``t_start``.
        out_times: times in ``[t_start, t_end]``, monotone along the direction of
            integration; the result holds the state at each (dense output inside steps).
        tableau: the method. Adaptive methods need ``controller``; fixed-step methods
            need ``grid`` (times after ``t_start``, ending at ``t_end``).
        landings: times steps must land on, with callbacks (see :class:`Landing`); those
            at ``t_end`` run after the last step, those at ``t_start`` are ignored.
        max_num_steps: most steps (accepted and rejected) the solve may take, plus one
            for each landing before ``t_end`` (a landing may cut one step in two).
        first_step: signed first step (skips automatic selection); with
            ``controller_state`` and ``f0`` it continues an earlier solve seamlessly.
        on_accept: called after each accepted step with a :class:`StepInfo`; returning
            True ends the solve at that step's end (``t_end`` of the result says where).
        label: "forward" or "backward", for error messages.
        compiled: a :class:`~torchadjoint.compiled.CompiledSteps` to take the steps as compiled graphs.

    Times are public (the caller's) at every interface; inside, the loop keeps its clock
    in a :class:`TimeFrame`, so large offsets such as ``t_start = 1e12`` lose no step-size
    resolution.

    Raises:
        SolveError: step-size underflow, ``max_num_steps`` exceeded, or non-finite values.
        ValueError: an interval whose length overflows float64.
    """
    check_interval(t_start, t_end, label)
    direction = 1.0 if t_end >= t_start else -1.0
    dtype, device = y0.dtype, y0.device
    coeffs = tableau.as_tensors(dtype, device)
    adaptive = tableau.adaptive
    if adaptive and controller is None:
        raise ValueError(f"method {tableau.name!r} is adaptive and needs a step-size controller")
    if not adaptive and grid is None:
        raise ValueError(f"method {tableau.name!r} has a fixed step: give step_size or a grid")
    if adaptive:
        controller.limit_to_precision(dtype)
    want_f1_for_output = needs_f1(coeffs, tableau.stages) and not linear_interpolation
    # Implicit and multistep methods keep state for the solve (Newton's Jacobian and
    # factorisation; the history of f) in a stepper called like rk_step (see
    # torchadjoint.implicit, torchadjoint.multistep).
    stepper = tableau.make_stepper(controller, f) if hasattr(tableau, "make_stepper") else None
    if stepper is None and compiled is not None:
        stepper = compiled.stepper(tableau, controller)
    take_step = rk_step if stepper is None else stepper

    nfe = 0

    def count_f(t: float, y: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return f(t, y)

    # The loop runs on offsets s (see TimeFrame); `public` maps them back for f and callers.
    frame = TimeFrame(t_start, t_end)
    public = frame.public
    s_start, s_end = frame.offset(t_start), frame.offset(t_end)
    outs = [frame.offset(x) for x in out_times]
    ys = y0.new_empty((len(outs), y0.shape[0]))
    next_out = 0
    while next_out < len(outs) and outs[next_out] == s_start:
        ys[next_out] = y0
        next_out += 1

    stops = [
        l for l in merge_landings(landings, direction)
        if direction * (l.t - t_start) > 0 and direction * (l.t - t_end) <= 0
    ]
    if not stops or stops[-1].t != t_end:
        stops.append(Landing(t_end))
    stop_s = [frame.offset(l.t) for l in stops]
    if not adaptive:
        # The grid and the landings together; the step sequence visits every point.
        points = sorted({*grid, *(l.t for l in stops)}, key=lambda x: direction * x)
        points = [frame.offset(p) for p in points if direction * (p - t_start) > 0 and direction * (p - t_end) <= 0]
    # Each landing before the end may cut one step in two: it does not count against the limit.
    step_limit = max_num_steps + len(stops) - 1

    s, y = s_start, y0
    # Underflow is judged against the interval too: near s = 0 the spacing of floats is
    # denormal-small, and steps that small make no progress anyone could wait for.
    # (Capped at 1: a search with a far-away nominal end, as for events, keeps fine steps.)
    span = min(abs(s_end - s_start), 1.0)
    steps = accepted = rejected = 0
    nonfinite = False
    if t_start == t_end:
        return IntegrateResult(ys, y, f0, t_start, first_step or 0.0, controller_state,
                               dict(nfe=0, steps=0, accepted=0, rejected=0))
    if f0 is None:
        f0 = count_f(t_start, y)
    state = controller_state
    if adaptive:
        if first_step is not None:
            h = first_step
        else:
            if not bool(torch.isfinite(f0).all()):
                raise SolveError(t_start, "f returned non-finite values (NaN or inf) at the initial state", label)
            h, state = controller.init(count_f, t_start, y, f0, direction, tableau.order)
    stop_index = grid_index = 0
    order = tableau.order
    recent_h: List[float] = []  # the last accepted step sizes, for a max_num_steps diagnosis
    last_step = None
    next_pace_check = 1024  # then 2048, 4096, ...: see _hopeless

    while s != s_end:
        t = public(s)
        if f0 is None:
            f0 = count_f(t, y)
        next_stop = stop_s[stop_index]
        clamped = False
        slack = 0.0
        if adaptive:
            h_proposed = h
            s1 = s + h
            # Land on the next stop, also when a step would end a hair before it (rounding).
            slack = 64 * math.ulp(max(abs(s), abs(next_stop)))
            if direction * (s1 - next_stop) >= -slack:
                s1, clamped = next_stop, True
            elif abs(h) <= 16 * math.ulp(max(abs(s), abs(s1), span)):
                raise SolveError(t, _underflow_reason(nonfinite, h, s_end - s_start), label)
            # The step covers exactly the distance the clock advances: s + h rounds, and a
            # step of the unrounded h labelled s1 would drift by up to half a spacing of s
            # per step (1e-9 per step at t = 1e7, hundreds of times rtol=1e-10 at the end).
            h = s1 - s
        else:
            s1 = points[grid_index]
            h = s1 - s
        if steps >= step_limit:
            raise SolveError(t, _too_many_steps(max_num_steps, steps, t, t_end, recent_h, last_step, tableau), label)
        t1 = public(s1)
        # A step ending on a discontinuity of f (a restart landing) evaluates its end stages
        # just before it, on this side: f on the far side belongs to the next step.
        t1_side = math.nextafter(t1, t) if (s1 == next_stop and stops[stop_index].restart) else t1
        step = take_step(count_f, t, y, f0, h, t1_side, tableau, coeffs)
        steps += 1
        nfe += step.evaluations  # made inside a compiled graph, past count_f
        if adaptive:
            ratio = step.error_ratio
            if ratio is None:
                ratio = controller.error_ratio(_no_graph(step.error), _no_graph(y), _no_graph(step.y1))
            accept, h_next, new_state = controller.adapt(h, ratio, state, order)
            # The retry would be this very step again: only min_step holds h up (a step at
            # min_step that the landing stretched by rounding). h_next is at most 0.9 h
            # otherwise, so a landing that stretched a short proposal is retried.
            # (Rounding slack at this step's own times: the landing's slack is measured at the
            # next stop, which for an event search is 1e30 away and would excuse every step.)
            stuck = abs(h_next) >= abs(h) - 64 * math.ulp(max(abs(s), abs(s1)))
            if not accept and math.isfinite(ratio) and stuck:
                accept, new_state = True, ratio
            if not accept:
                rejected += 1
                # An infinite ratio may only be an overflowing scale (rtol tiny): look at the state.
                nonfinite = nonfinite or (not math.isfinite(ratio) and not bool(torch.isfinite(step.y1).all()))
                if stuck:
                    # Pinned at min_step and still not finite: retrying cannot help.
                    raise SolveError(t, f"the state or f became non-finite (NaN or inf) even at min_step={abs(h_next):.3g}", label)
                h = h_next
                continue
            state = new_state
            if clamped and abs(h_proposed) > abs(h_next):
                # The landing, not accuracy, shortened this step: keep the unshortened size.
                h_next = h_proposed
        else:
            h_next = h
            grid_index += 1
        accepted += 1
        nonfinite = False
        y1, f1 = step.y1, step.f1
        last_step = (h, step.stages)
        if len(recent_h) == 100:
            recent_h.pop(0)
        recent_h.append(abs(h))
        if accepted == next_pace_check:
            next_pace_check *= 2
            if adaptive and _hopeless(step_limit - steps, s_end - s1, recent_h, last_step, tableau):
                raise SolveError(t1, _too_many_steps(max_num_steps, steps, t1, t_end, recent_h, last_step, tableau,
                                                     early=True), label)

        j0 = next_out
        while next_out < len(outs) and direction * (outs[next_out] - s1) <= 0:
            next_out += 1
        if next_out > j0:
            if f1 is None and want_f1_for_output:
                f1 = count_f(t1_side, y1)
            fractions = [(outs[j] - s) / h for j in range(j0, next_out)]
            ys[j0:next_out] = interpolate(coeffs, y, y1, step.stages, f1, h, fractions, linear_interpolation)
            if outs[next_out - 1] == s1:
                ys[next_out - 1] = y1

        if on_accept is not None and on_accept(StepInfo(t, t1, y, y1, step.stages, f1, h_next, state, h)):
            # The caller has what it came for (an event inside this step): end the solve at
            # t1, before any landing there; outputs not reached are NaN.
            ys[next_out:] = float("nan")
            s, y, f0, h = s1, y1, f1, h_next
            break
        s, y, f0, h = s1, y1, f1, h_next

        if s == next_stop:
            stop = stops[stop_index]
            stop_index += 1
            changed = False
            f_new = None
            for callback in stop.callbacks:
                new_y = callback(stop.t, y)
                if new_y is not None:
                    # A (y, f) pair brings f at the new state along, sparing a re-evaluation.
                    y, f_new = new_y if isinstance(new_y, tuple) else (new_y, None)
                    changed = True
            if stop.restart and s != s_end:
                f0 = count_f(math.nextafter(stop.t, stop.t + direction), y)
            elif changed:
                f0 = f_new

    if not adaptive and not bool(torch.isfinite(y).all()):
        # Fixed steps are not checked one by one (a host sync per step); the outputs tell
        # between which times the state stopped being finite. .t is the last finite one.
        finite = torch.isfinite(ys[:next_out]).all(dim=1).tolist()
        first_bad = finite.index(False) if False in finite else next_out
        last_good = public(outs[first_bad - 1]) if first_bad > 0 else t_start
        seen_bad = public(outs[first_bad]) if first_bad < next_out else public(s)
        raise SolveError(
            last_good, f"the state became non-finite (NaN or inf) between t={last_good:.6g} and t={seen_bad:.6g}; "
            "use a smaller step_size or an adaptive method", label)
    stats = dict(nfe=nfe, steps=steps, accepted=accepted, rejected=rejected)
    if stepper is not None:
        stats.update(stepper.stats)
    return IntegrateResult(ys, y, f0, public(s), h, state, stats)


def _underflow_reason(nonfinite: bool, h: float, length: float) -> str:
    reason = f"step size underflow (h={abs(h):.3g} on an interval of length {abs(length):.6g})"
    if nonfinite:
        reason += ": the state or f became non-finite (NaN or inf) and smaller steps did not help"
    return reason + (
        " (the solution may blow up here, or the problem is too stiff for an explicit method); check f near "
        "this time, or loosen rtol/atol"
    )


def _hopeless(steps_left: int, distance: float, recent_h: List[float], last_step, tableau) -> bool:
    """Whether a stiff solve cannot finish within its step budget: stability pins its
    steps (estimated ``|h·λ|`` at least half the method's stability limit), and at the
    recent pace the rest of the interval needs over 1000 times the steps left. Pinned
    steps do not grow while the stiffness lasts, so waiting for the budget to run out
    (minutes at 100 000 steps) would only delay the same error."""
    mean_h = sum(recent_h) / len(recent_h)
    if not mean_h > 0 or abs(distance) / mean_h <= 1000.0 * max(steps_left, 1):
        return False
    ratio = _stiffness_ratio(last_step, tableau)
    return ratio is not None and ratio >= 0.5 * real_stability_limit(tableau)


def _too_many_steps(max_num_steps: int, steps: int, t: float, t_end: float, recent_h: List[float], last_step, tableau,
                    early: bool = False) -> str:
    """The ``max_num_steps`` message: how far the solve got, at what pace, and whether
    stability rather than accuracy held the steps down (stiffness). ``early``: stopped
    before the budget ran out, because the pace showed it would (see :func:`_hopeless`)."""
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
    ratio = _stiffness_ratio(last_step, tableau)
    limit = real_stability_limit(tableau)
    if ratio is not None and ratio >= 0.5 * limit:
        msg += (
            f". This looks stiff: the last step had |h·λ|≈{ratio:.3g} against {tableau.name}'s stability limit "
            f"{limit:.3g}, so stability, not accuracy, holds the steps down; an explicit method cannot go faster. "
            f"Use an implicit (stiff) method, shorten the interval, or raise max_num_steps"
        )
    else:
        msg += "; raise max_num_steps, loosen rtol/atol, or shorten the interval"
    return msg


def _stiffness_ratio(last_step, tableau: ButcherTableau) -> Optional[float]:
    """``|h·λ|`` estimated from the last accepted step's two stages at one time (see
    :func:`~torchadjoint.tableaux.base.stiffness_pair`), or None where it cannot be."""
    pair = stiffness_pair(tableau)
    if last_step is None or pair is None:
        return None
    h, stages = last_step
    i, j, row = pair
    stages = _no_graph(stages)
    with torch.no_grad():
        dk = torch.linalg.vector_norm(stages[j] - stages[i])
        dy = abs(h) * torch.linalg.vector_norm(torch.tensor(row, dtype=stages.dtype, device=stages.device) @ stages)
    dk, dy = float(dk), float(dy)
    return abs(h) * dk / dy if dy > 0 and math.isfinite(dk) else None
